"""Slab allocator over a fixed byte region (memcached style), independent of what backs the region.

The region is cut into equal slabs. A slab is given to one size class on first need and cut into equal
slots of that class; when its last slot is freed it returns to the free-slab list, so memory moves
between classes as the workload changes. Classes step by 1/16 of a power of two, so a slot wastes at
most ~6% of its size; fixed-geometry chunks of one namespace all land in one class.

Every operation is O(1) except `alloc` for a class with many partly used slabs, which pops from a
per-class list of slabs that have room.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SMALL_ALIGN = 64  # slots below one page: cache-line aligned
PAGE = 4096  # slots of a page or more are page aligned (O_DIRECT reads land straight in them)


def size_class(nbytes: int) -> int:
    """The slot size that holds `nbytes`: rounded up to 1/16 of its power of two, 64- or 4096-aligned."""
    if nbytes <= 0:
        raise ValueError("size must be positive")
    step = max(1 << (nbytes.bit_length() - 1) >> 4, SMALL_ALIGN if nbytes < PAGE else PAGE)
    return -(-nbytes // step) * step


def largest_fit(slab_bytes: int) -> int:
    """The largest request whose size class fits in one slab (size_class is monotonic: binary search)."""
    low, high = 1, slab_bytes
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if size_class(mid) <= slab_bytes else (low, mid - 1)
    return low


@dataclass
class _Slab:
    slot_bytes: int = 0  # 0: free slab
    nslots: int = 0
    used: int = 0
    bump: int = 0  # slots below `bump` have been handed out at least once
    free: list[int] = field(default_factory=list)  # freed slot indexes below bump
    taken: bytearray = field(default_factory=bytearray)  # 1 per slot handed out: catches double frees

    @property
    def has_room(self) -> bool:
        return bool(self.free) or self.bump < self.nslots


class SlabPool:
    """Hands out slot offsets in [0, capacity) for chunk sizes up to `slab_bytes`."""

    def __init__(self, capacity: int, slab_bytes: int):
        if slab_bytes <= 0 or slab_bytes % PAGE:
            raise ValueError(f"slab_bytes must be a positive multiple of {PAGE}, got {slab_bytes}")
        self.slab_bytes = slab_bytes
        self.max_alloc = largest_fit(slab_bytes)  # the largest request a slot can hold
        self.slabs = [_Slab() for _ in range(capacity // slab_bytes)]
        self.capacity = len(self.slabs) * slab_bytes
        self._free_slabs = list(range(len(self.slabs) - 1, -1, -1))
        self._with_room: dict[int, set[int]] = {}  # class -> slabs of that class with a free slot
        self.used_bytes = 0  # bytes of slots handed out


    def alloc(self, nbytes: int) -> int | None:
        """Offset of a free slot for `nbytes`, or None when no slot of its class and no free slab is left."""
        cls = size_class(nbytes)
        if cls > self.slab_bytes:
            return None
        room = self._with_room.setdefault(cls, set())
        if room:
            index = next(iter(room))
        elif self._free_slabs:
            index = self._free_slabs.pop()
            nslots = self.slab_bytes // cls
            self.slabs[index] = _Slab(slot_bytes=cls, nslots=nslots, taken=bytearray(nslots))
            room.add(index)
        else:
            return None
        slab = self.slabs[index]
        if slab.free:
            slot = slab.free.pop()
        else:
            slot, slab.bump = slab.bump, slab.bump + 1
        slab.used += 1
        slab.taken[slot] = 1
        if not slab.has_room:
            room.discard(index)
        self.used_bytes += cls
        return index * self.slab_bytes + slot * cls

    def free(self, offset: int) -> None:
        if not 0 <= offset < self.capacity:
            raise ValueError(f"offset {offset} is outside the pool")
        index, within = divmod(offset, self.slab_bytes)
        slab = self.slabs[index]
        slot, misaligned = divmod(within, slab.slot_bytes) if slab.slot_bytes else (0, 1)
        if misaligned or slot >= slab.nslots or not slab.taken[slot]:
            raise ValueError(f"offset {offset} is not an allocated slot")
        slab.taken[slot] = 0
        slab.free.append(slot)
        slab.used -= 1
        self.used_bytes -= slab.slot_bytes
        room = self._with_room[slab.slot_bytes]
        if slab.used == 0:  # whole slab is free again: give it back so any class may use it
            room.discard(index)
            self.slabs[index] = _Slab()
            self._free_slabs.append(index)
        else:
            room.add(index)

    def slot_bytes(self, offset: int) -> int:
        return self.slabs[offset // self.slab_bytes].slot_bytes

    def slab_of(self, offset: int) -> int:
        return offset // self.slab_bytes

    def can_alloc(self, nbytes: int) -> bool:
        cls = size_class(nbytes)
        return cls <= self.slab_bytes and (bool(self._with_room.get(cls)) or bool(self._free_slabs))
