"""The client's put pipeline: chunks copied into arena slots, then published by the agent's commit.

A put writes each chunk once, straight into its slot (a strided source is gathered into place), then
commits. Slots usually come from a **credit**: keyless slots that the previous commit reserved in the
same round trip, so a put costs one round trip; the keys are named at commit. A big credit put commits
all its chunks but the last while it copies the last, so the agent's commit overlaps the copy.
`put_async` returns once the chunks are in the arena and the commits are sent; at most _PUT_WINDOW puts
are in flight, with credits for as many (docs/local-protocol.md, Put).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .. import codec
from ..bytecopy import as_numpy, byte_rows
from ..codec import HEADER_BYTES, ChunkHeader
from ..errors import InvalidArgument, LeaseExpired
from ..wire.messages import (RESERVE_EXISTS, RESERVE_NO_SPACE, Abort, Commit, CommitReply, Reserve, ReserveReply)
from .binding import Binding
from .connection import PendingReply
from .results import PutResult

_LEASE_MARGIN_S = 1.0  # stop touching a slot this long before the agent may reclaim it
_MAX_CREDIT = 64  # slots a client keeps reserved for its next put
# Puts of one client in flight at once (put_async), and so credits it may hold: while the agent commits
# one put, the next is copied into slots reserved by the commit before.
_PUT_WINDOW = 2
_CREDIT_MEMORY = 16  # puts whose sizes the next credit's size is chosen from
# A credit put of at least this many bytes commits all its chunks but the last while it copies the last
# (the agent's ~1 ms commit then overlaps the copy); a smaller one is not worth a second message.
PIPELINE_MIN_BYTES = 8 << 20


def lease_deadline(sent: float, ttl: float) -> float:
    """When this client must stop touching slots granted by a request sent at `sent` (monotonic)."""
    return sent + ttl - min(_LEASE_MARGIN_S, ttl / 4)


@dataclass(frozen=True)
class _Credit:
    """Keyless arena slots reserved for a later put."""

    rid: int
    offsets: list[int]
    size: int  # bytes of each slot
    deadline: float  # monotonic

    def fits(self, sizes: list[int]) -> bool:
        """Still valid, enough slots, and of the right size for a put of `sizes`."""
        return time.monotonic() < self.deadline and len(self.offsets) >= len(sizes) \
            and all(size == self.size for size in sizes)


@dataclass
class PendingPut:
    """Arena slots granted to one put (`begin_put`), filled by the caller, then committed."""

    rid: int
    keys: list[bytes]
    offsets: list[int]  # slot offset of each key, or RESERVE_EXISTS / RESERVE_NO_SPACE
    sizes: list[int]  # chunk sizes, header included
    group: int  # quantisation group of the codec (0 for raw)
    named: dict[int, bytes] | None  # credit slot -> key, when the slots came from a credit
    deadline: float  # monotonic time after which the slots may no longer be touched
    credit: _Credit | None = None  # the credit the slots came from (kept if nothing is written)

    def slots(self) -> list[tuple[int, int]]:
        """(index, offset) of each chunk that must be written."""
        return [(i, offset) for i, offset in enumerate(self.offsets) if offset >= 0]

    def outcome(self, replies: list[CommitReply]) -> tuple[int, int, int, list]:
        """(stored, existing, no_space, errors) from its reservation and its commits' replies."""
        existing = sum(1 for o in self.offsets if o == RESERVE_EXISTS)
        no_space = sum(1 for o in self.offsets if o == RESERVE_NO_SPACE)
        return (sum(r.stored for r in replies), existing + sum(r.existing for r in replies), no_space,
                [tuple(e) for r in replies for e in r.errors])


@dataclass
class _Commits:
    """The commits sent for one PendingPut; its outcome reads their replies."""

    pending: PendingPut
    replies: list[PendingReply]

    def outcome(self) -> tuple[int, int, int, list]:
        """(stored, existing, no_space, errors); raises a commit's typed error."""
        return self.pending.outcome([reply.result() for reply in self.replies])


class PutHandle:
    """A put whose chunks are in the arena and whose commits are on their way to the agent (put_async)."""

    def __init__(self, batches: list[tuple[int, _Commits]]):
        self._batches = batches  # (index of the batch's first key in the put, its commits)

    def _replies(self) -> Iterator[PendingReply]:
        return (reply for _, commits in self._batches for reply in commits.replies)

    def done(self) -> bool:
        """Every commit is answered: result() returns without waiting."""
        return all(reply.done() for reply in self._replies())

    def wait(self) -> None:
        """Wait until every commit is answered (errors are kept for result())."""
        for reply in self._replies():
            reply.wait()

    def result(self) -> PutResult:
        """The put's outcome, once the agent has published its chunks; raises a commit's typed error."""
        totals = [0, 0, 0]
        errors: list[tuple[int, str, str]] = []
        for start, commits in self._batches:
            stored, existing, no_space, errs = commits.outcome()
            totals = [totals[0] + stored, totals[1] + existing, totals[2] + no_space]
            errors.extend((start + i, code, msg) for i, code, msg in errs)
        return PutResult(*totals, errors=tuple(errors))


class PutPipeline:
    """Puts of one namespace. `begin_put` and `commit_put` may run on different threads."""

    def __init__(self, binding: Binding):
        self.binding = binding
        # Arena slots reserved by earlier commits for the next puts (at most _PUT_WINDOW), and the
        # replies that will reserve more. Lock order: the connection's lock, then this one.
        self._credits: deque[_Credit] = deque()
        self._renewals: deque[PendingReply] = deque()
        self._in_flight: deque[PutHandle] = deque()  # puts whose commits may be unanswered
        self._lock = threading.Lock()
        self._recent_puts: deque[int] = deque(maxlen=_CREDIT_MEMORY)  # chunks in each recent put
        self._header_packers: dict[tuple[int, int], Callable[[bytes], bytes]] = {}

    @property
    def _conn(self):
        return self.binding.conn

    def forget_credits(self) -> None:
        """A new connection: the slots of the old one are gone."""
        with self._lock:
            self._credits.clear()
            self._renewals.clear()

    def wait_in_flight(self) -> None:
        """Wait for the commits of puts still in flight (so their chunks are published)."""
        for handle in self._in_flight:
            handle.wait()
        self._in_flight.clear()

    # ---- whole puts -------------------------------------------------------------------------------
    def put(self, keys: Sequence[bytes], chunks: torch.Tensor | Sequence[torch.Tensor], overlap: bool) -> PutHandle:
        """Copy the chunks in and send their commits; `overlap`: the caller goes on before the replies."""
        geometry = self.binding.geometry
        if isinstance(chunks, torch.Tensor):
            if chunks.dim() == len(geometry.shape):
                chunks = chunks.unsqueeze(0)
            self._check_chunks(tuple(chunks.shape[1:]), chunks.dtype, chunks.device)  # all at once
        else:
            for chunk in chunks:
                self._check_chunks(tuple(chunk.shape), chunk.dtype, chunk.device)
        if len(chunks) != len(keys):
            raise InvalidArgument(f"{len(keys)} keys but {len(chunks)} chunks")
        self._wait_for_window()
        step = self._conn.max_batch
        handle = PutHandle([(start, self._put_batch(keys[start:start + step], chunks[start:start + step], overlap))
                            for start in range(0, len(keys), step)])
        with self._lock:
            self._in_flight.append(handle)
        return handle

    def _wait_for_window(self) -> None:
        """Forget answered puts; with _PUT_WINDOW still in flight, wait for the oldest."""
        while True:
            with self._lock:
                if not self._in_flight:
                    return
                oldest = self._in_flight[0]
                if not oldest.done() and len(self._in_flight) < _PUT_WINDOW:
                    return
                self._in_flight.popleft()
            oldest.wait()

    def _check_chunks(self, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
        geometry = self.binding.geometry
        if shape != geometry.shape or dtype != geometry.torch_dtype:
            raise InvalidArgument(f"chunk of shape {shape} {dtype}; this namespace holds {geometry.shape} "
                                  f"{geometry.torch_dtype}")
        if device.type != "cpu":
            raise InvalidArgument("LocalClient.put takes CPU tensors")

    def _put_batch(self, keys, chunks, overlap: bool) -> _Commits:
        arena = self._conn.arena_np
        if self.binding.codec == "raw":
            pending = self.begin_put(keys)
            rows = byte_rows(chunks) if isinstance(chunks, torch.Tensor) else None

            def write(slots: list[tuple[int, int]]) -> None:
                if rows is not None:  # contiguous chunks: each is one flat copy into its slot
                    for i, offset in slots:
                        np.copyto(arena[offset + HEADER_BYTES:offset + HEADER_BYTES + rows.shape[1]], rows[i])
                    return
                for i, slot in self.raw_slot_views(pending, slots):
                    # gather the (possibly strided) chunk straight into its slot, in its own dtype's width
                    np.copyto(as_numpy(slot), as_numpy(chunks[i]), casting="no")

            slots = pending.slots()
            if (pending.named is not None and len(slots) > 1
                    and sum(pending.sizes[i] for i, _ in slots) >= PIPELINE_MIN_BYTES):
                return self._commit_ahead(pending, slots, write, overlap)
            write(slots)
            return self._commit(pending, overlap)
        encoded = [codec.encode(chunk, self.binding.codec) for chunk in chunks]
        pending = self.begin_put(keys, [HEADER_BYTES + payload.numel() for payload, _ in encoded],
                                 group=encoded[0][1] if encoded else 0)
        for i, offset in pending.slots():
            payload = as_numpy(encoded[i][0])
            arena[offset + HEADER_BYTES:offset + HEADER_BYTES + payload.size] = payload
        return self._commit(pending, overlap)

    # ---- slots ------------------------------------------------------------------------------------
    def begin_put(self, keys: Sequence[bytes], sizes: list[int] | None = None, group: int = 0) -> PendingPut:
        """Arena slots for `keys` (chunk sizes `sizes`, header included; raw chunks by default), to be
        filled by the caller and then published with `commit_put`. Keys the shared directory shows as
        stored get no slot. Costs no round trip when an earlier commit left a credit that fits."""
        if len(keys) > self._conn.max_batch:
            raise InvalidArgument(f"a put takes at most {self._conn.max_batch} keys at once")
        keys = list(keys)
        if sizes is None:
            sizes = [HEADER_BYTES + self.binding.geometry.nbytes] * len(keys)
        credit = self._next_credit(sizes)
        if credit is not None:
            # Write into slots reserved by an earlier commit and name the keys at commit. Chunks the
            # shared directory shows as stored are skipped (the agent re-checks at commit).
            free = iter(enumerate(credit.offsets))
            offsets, named = [], {}
            for key, skip in zip(keys, self.binding.stored(keys)):
                if skip:
                    offsets.append(RESERVE_EXISTS)
                    continue
                slot, offset = next(free)
                offsets.append(offset)
                named[slot] = key
            return PendingPut(credit.rid, keys, offsets, sizes, group, named, credit.deadline, credit)
        sent = time.monotonic()
        reply = self._conn.request(Reserve(self.binding.namespace.digest, sizes, b"".join(keys)), ReserveReply)
        return PendingPut(reply.rid, keys, reply.offsets, sizes, group, None, lease_deadline(sent, reply.ttl))

    def raw_slot_views(self, pending: PendingPut, slots: list[tuple[int, int]] | None = None
                       ) -> list[tuple[int, torch.Tensor]]:
        """(index, chunk-shaped tensor view of the arena slot) of each raw chunk `pending` must write
        (or of `slots`, some of pending.slots())."""
        shape, dtype = self.binding.geometry.shape, self.binding.geometry.torch_dtype
        arena = self._conn.arena
        return [(i, arena[offset + HEADER_BYTES:offset + pending.sizes[i]].view(dtype).view(shape))
                for i, offset in (pending.slots() if slots is None else slots)]

    def commit_put(self, pending: PendingPut) -> tuple[int, int, int, list]:
        """Write the chunk headers and publish the filled slots of `pending`:
        (stored, existing, no_space, errors)."""
        return self._commit(pending).outcome()

    # ---- commits and credits ----------------------------------------------------------------------
    def _commit(self, pending: PendingPut, overlap: bool = False) -> _Commits:
        """Write the chunk headers of `pending` and send its commit (renewing the credit); `overlap`: the
        caller goes on before the reply (put_async)."""
        if pending.credit is not None and not pending.named:
            self._keep_credit(pending.credit)  # nothing written: the slots serve the next put
            return _Commits(pending, [])
        if not pending.slots():  # every key stored already or without space
            return _Commits(pending, [])
        self._abort_if_expired(pending)
        self._write_headers(pending, pending.slots())
        renew = self._credit_sizes(pending.sizes)
        commits = _Commits(pending, [self._submit_commit(Commit(pending.rid, pending.named, renew or None),
                                                         pending.sizes[0])])
        if overlap:
            self._top_up_credits(renew, pending.sizes[0])
        return commits

    def _commit_ahead(self, pending: PendingPut, slots: list[tuple[int, int]], write, overlap: bool) -> _Commits:
        """Write and commit a credit put in two parts: the agent publishes every chunk but the last, and
        reserves the next put's credit, while this process copies the last chunk; so only the last
        chunk's commit is left to wait for. (Measured with the credit still renewed by the last commit,
        8 chunks of 5.9 MB per put: 38.2 ms per 32 chunks, against 39.4 ms committing the first half
        ahead and 41.7 ms all at the end; moving the renewal ahead took bench tiers' put from
        0.743-0.771 to 0.772-0.778 x memcpy.)"""
        ahead = len(slots) - 1
        named = list(pending.named.items())  # (credit slot, key) in the order of `slots`
        renew = self._credit_sizes(pending.sizes)
        replies = []
        for part, commit in ((slice(0, ahead), lambda named_part: Commit(pending.rid, named_part, renew or None,
                                                                           keep=True)),
                             (slice(ahead, None), lambda named_part: Commit(pending.rid, named_part))):
            write(slots[part])
            self._write_headers(pending, slots[part])
            self._abort_if_expired(pending)
            replies.append(self._submit_commit(commit(dict(named[part])), pending.sizes[0]))
        if overlap:
            self._top_up_credits(renew, pending.sizes[0])
        return _Commits(pending, replies)

    def _keep_credit(self, credit: _Credit) -> None:
        """Hold `credit` for a later put; past _PUT_WINDOW held, the oldest is given back."""
        with self._lock:
            self._credits.append(credit)
            extra = self._credits.popleft() if len(self._credits) > _PUT_WINDOW else None
        if extra is not None:
            self._conn.request(Abort(extra.rid))

    def _credit_sizes(self, sizes: list[int]) -> list[int]:
        """Sizes of the credit to reserve for the next put, if this one's chunks have one size: as many
        slots as the largest of the last _CREDIT_MEMORY puts (so a short put, such as the tail of a
        prompt, does not leave a credit too small for the next full one), at most _MAX_CREDIT (bigger
        puts amortise their round trips) and 1/16 of the arena."""
        if not sizes or any(size != sizes[0] for size in sizes) or len(sizes) > _MAX_CREDIT:
            return []
        self._recent_puts.append(len(sizes))
        return [sizes[0]] * min(max(self._recent_puts), max(1, self._conn.arena_bytes // 16 // sizes[0]))

    def _next_credit(self, sizes: list[int]) -> _Credit | None:
        """A held credit that serves a put of `sizes` (waiting, if none is held, for a commit already sent
        that reserves one), or None. Credits too small or expired are given back."""
        while True:
            unfit, credit, renewal = [], None, None
            with self._lock:
                while self._credits and credit is None:
                    candidate = self._credits.popleft()
                    if candidate.fits(sizes):
                        credit = candidate
                    else:
                        unfit.append(candidate)
                while self._renewals and self._renewals[0].done():
                    self._renewals.popleft()
                if credit is None and self._renewals:
                    renewal = self._renewals[0]
            for stale in unfit:
                self._conn.request(Abort(stale.rid))
            if renewal is None:
                return credit
            renewal.wait()

    def _top_up_credits(self, sizes: list[int], size: int) -> None:
        """For puts that overlap (put_async): while fewer credits are held or coming than puts may be in
        flight, reserve one more without waiting, so the next put need not wait for this one's reply."""
        with self._lock:
            short = len(self._credits) + sum(not r.done() for r in self._renewals) < _PUT_WINDOW
        if sizes and short:
            self._credit_reply(Reserve(self.binding.namespace.digest, sizes), ReserveReply,
                               lambda reply: reply, size)

    def _submit_commit(self, commit: Commit, size: int) -> PendingReply:
        """Send a commit of chunks of `size` bytes; with a `renew` it reserves a credit, kept when its
        reply is read."""
        if not commit.renew:
            return self._conn.submit(commit, CommitReply)
        return self._credit_reply(commit, CommitReply, lambda reply: reply.next, size)

    def _credit_reply(self, request, reply_type, granted: Callable[[object], ReserveReply | None], size: int):
        """Send a request that reserves a credit (`granted` picks it from the reply) and keep the credit
        when the reply is read; until then, begin_put may wait for it."""
        sent = time.monotonic()
        pending = self._conn.submit(request, reply_type,
                                    on_result=lambda reply: self._take_credit(granted(reply), size, sent))
        with self._lock:
            self._renewals.append(pending)
        return pending

    def _take_credit(self, granted: ReserveReply | None, size: int, sent: float) -> None:
        """Keep the credit a request reserved for a later put, or give back one the arena could not fill."""
        if granted and all(o >= 0 for o in granted.offsets):
            self._keep_credit(_Credit(granted.rid, granted.offsets, size, lease_deadline(sent, granted.ttl)))
        elif granted:
            self._conn.request(Abort(granted.rid))

    def _abort_if_expired(self, pending: PendingPut) -> None:
        """Past its deadline the agent may hand the slots to someone else: give them back and raise
        LeaseExpired instead of committing what they hold."""
        if time.monotonic() > pending.deadline:
            self._conn.request(Abort(pending.rid))
            raise LeaseExpired("reservation expired before the chunks were written")

    def _write_headers(self, pending: PendingPut, slots: list[tuple[int, int]]) -> None:
        arena = self._conn.arena_np
        for i, offset in slots:
            pack = self._header_packer(pending.sizes[i] - HEADER_BYTES, pending.group)
            arena[offset:offset + HEADER_BYTES] = np.frombuffer(pack(pending.keys[i]), dtype=np.uint8)

    def _header_packer(self, payload_len: int, group: int):
        """Packs this client's chunk header for a key (ChunkHeader.key_packer), one per payload size and
        quantisation group: a namespace's raw chunks all share one."""
        packer = self._header_packers.get((payload_len, group))
        if packer is None:
            if len(self._header_packers) >= 64:  # sizes of encoded chunks vary: keep the cache small
                self._header_packers.clear()
            packer = self._header_packers[payload_len, group] = ChunkHeader(
                codec=self.binding.codec, geometry=self.binding.geometry, payload_len=payload_len,
                namespace=self.binding.namespace.digest, group=group).key_packer()
        return packer
