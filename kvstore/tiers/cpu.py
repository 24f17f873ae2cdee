"""CPU tier: one shared-memory arena per node that the agent and every client process map.

The arena is a file under `shm_dir` (tmpfs). Client processes map the same file, so a chunk moves
between an engine's memory and the store with one memcpy, and a reader can view a pinned chunk in
place. The file is unlinked when the agent stops (and a stale one from a killed agent is replaced).
"""

from __future__ import annotations

import itertools
import os
import secrets
from pathlib import Path

import numpy as np

from ..codec import HEADER_BYTES
from ..config import CpuConfig
from ..errors import ConfigError
from ..shm import LOCATION_UNIT, MAX_VALUE, map_arena, serial_word
from ..vocab import KEY_HALVES
from .index import CuckooIndex
from .memory import MemoryTier
from .slab import SMALL_ALIGN

PAGE = 4096
ARENA_PREFIX = "kvstore-arena-"


LOCATIONS_NAME = "kvstore-locations"
assert SMALL_ALIGN % LOCATION_UNIT == 0, "every slot offset must be a whole number of location units"
# shared files named <prefix><agent pid>-<random>
STALE_PREFIXES = (ARENA_PREFIX, "kvstore-directory-", f"{LOCATIONS_NAME}-")


def remove_stale_files(shm_dir: str) -> list[str]:
    """Unlink the agent's shared files (arena, directory, locations) whose agent, the pid in the name, is gone
    (e.g. after a SIGKILL)."""
    removed = []
    for prefix in STALE_PREFIXES:
        removed += _remove_stale(shm_dir, prefix)
    return removed


def _remove_stale(shm_dir: str, prefix: str) -> list[str]:
    removed = []
    for path in Path(shm_dir).glob(f"{prefix}*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                path.unlink()
                removed.append(str(path))
            except OSError:
                pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShmArena:
    """A tmpfs file of `capacity` bytes, mapped shared."""

    def __init__(self, capacity: int, shm_dir: str, prefault: bool, name: str | None = None):
        if capacity < PAGE:
            raise ConfigError(f"cpu.arena_bytes: {capacity} is below one page")
        directory = Path(shm_dir)
        if not directory.is_dir():
            raise ConfigError(f"cpu.shm_dir: {shm_dir} is not a directory")
        self.capacity = capacity
        remove_stale_files(shm_dir)
        self.path = str(directory / (name or f"{ARENA_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if prefault:
                # Allocate every page now: a full tmpfs fails here with a clear error instead of SIGBUS later.
                try:
                    os.posix_fallocate(fd, 0, capacity)
                except OSError as exc:
                    os.unlink(self.path)
                    raise ConfigError(f"cpu.arena_bytes: cannot allocate {capacity} bytes in {shm_dir}: {exc}")
            else:
                os.ftruncate(fd, capacity)
        finally:
            os.close(fd)
        self.mmap = map_arena(self.path, capacity, populate=prefault)
        self.array = np.frombuffer(self.mmap, dtype=np.uint8)
        self._closed = False

    def view(self, offset: int, nbytes: int) -> memoryview:
        return memoryview(self.mmap)[offset:offset + nbytes]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.array = None
        try:
            self.mmap.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with the process
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class CpuTier(MemoryTier):
    """The shared-memory arena tier.

    It also publishes where each chunk lies, so a client can copy a chunk out without a round trip to
    pin it: `locations`, a shared index of key -> slot offset / LOCATION_UNIT, and a serial stamped into
    the header of each published slot (docs/chunk-format.md). The serial is fresh for every publication
    and is zeroed before the slot is freed, so a reader who sees the same nonzero serial before and
    after its copy knows that no one wrote the slot meanwhile (client.py, LocalClient.get)."""

    def __init__(self, cfg: CpuConfig, capacity: int, on_evict=None):
        self.arena = ShmArena(capacity, cfg.shm_dir, cfg.prefault)
        super().__init__("cpu", self.arena, cfg.slab_bytes, cfg.policy, on_evict)
        self.locations = CuckooIndex(shm_dir=cfg.shm_dir, name=LOCATIONS_NAME)
        self._words = np.frombuffer(self.arena.mmap, dtype=np.uint64, count=capacity // 8)
        self._serials = itertools.count(secrets.randbits(48) + 1)  # never 0: 0 marks an unpublished slot

    @property
    def arena_path(self) -> str:
        return self.arena.path

    def insert(self, key: bytes, offset: int, nbytes: int, ns_id: int, flags: int = 0) -> bool:
        """Index the slot (MemoryTier.insert), then stamp and publish it: its bytes are all in place."""
        with self.lock:
            if not super().insert(key, offset, nbytes, ns_id, flags):
                return False
            # A slot too small for a chunk header, or past 256 GiB of arena, is read pinned only.
            if nbytes >= HEADER_BYTES and offset // LOCATION_UNIT <= MAX_VALUE:
                self._words[serial_word(offset)] = next(self._serials)
                low, high = KEY_HALVES.unpack(key)
                self.locations.set(low, high, offset // LOCATION_UNIT)
            return True

    def _remove(self, eid: int) -> bytes:
        # Unstamp first: from here on a reader's serial check fails, before anyone can reuse the slot.
        if self._nbytes[eid] >= HEADER_BYTES:
            self._words[serial_word(int(self._offset[eid]))] = 0
        self.locations.remove(int(self._lo[eid]), int(self._hi[eid]))
        return super()._remove(eid)

    def close(self) -> None:
        self.locations.close()
        self._words = None
        super().close()
