"""The local protocol's messages, one frozen dataclass per request and reply (docs/local-protocol.md).

A request travels as ``[op, args]``: `to_wire()` makes the args map, and the agent rebuilds the request
with `Request.decode(args)`, which checks every field's type and fills in defaults, so a handler never
sees a malformed argument (InvalidArgument names it). A reply travels as the result of an ``ok`` frame:
the agent's side makes it with `to_wire()`, the client's side reads it with `Reply.decode`, trusting the
agent for types. Field names are the wire's keys, except where a class's WIRE_NAMES says otherwise;
optional fields left None are not sent.

These classes are the only place where the shape of a message is written down; framing.py puts them on
the stream. The chunk bytes themselves never travel in messages: they move through the arena.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

from ..errors import InvalidArgument
from ..vocab import Op

_NO_DEFAULT = object()


@dataclass(frozen=True)
class _FieldSpec:
    name: str
    wire: str
    kinds: tuple[type, ...]  # what isinstance accepts
    optional: bool  # None allowed (and not sent)
    default: Any  # _NO_DEFAULT: required
    factory: Any  # makes the default (a fresh list or map), or None
    to_float: bool


def _spec(cls: type) -> tuple[_FieldSpec, ...]:
    hints = get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
        optional = type(None) in args
        kinds = tuple(get_origin(a) or a for a in args if a is not type(None))
        to_float = float in kinds
        if to_float:
            kinds = (*kinds, int)  # a float argument may come as an int
        factory = None if f.default_factory is dataclasses.MISSING else f.default_factory
        default = f.default if f.default is not dataclasses.MISSING else None if factory else _NO_DEFAULT
        specs.append(_FieldSpec(f.name, cls.WIRE_NAMES.get(f.name, f.name), kinds, optional, default, factory,
                                to_float))
    return tuple(specs)


class Message:
    """A request or reply: a frozen dataclass whose fields are the message's keys."""

    WIRE_NAMES: ClassVar[dict[str, str]] = {}  # field -> wire key, where they differ
    _specs: ClassVar[tuple[_FieldSpec, ...]] = ()  # set by @message

    def to_wire(self) -> dict:
        out = {}
        for spec in self._specs:
            value = getattr(self, spec.name)
            if value is None:
                continue
            out[spec.wire] = value.to_wire() if isinstance(value, Message) else value
        return out


REQUESTS: dict[Op, type["Request"]] = {}  # every request class by its op


def message(cls):
    """Make `cls` a frozen, slotted dataclass message and record its field specs (and a request's op)."""
    cls = dataclass(frozen=True, slots=True)(cls)
    cls._specs = _spec(cls)
    if issubclass(cls, Request):
        REQUESTS[cls.OP] = cls
    return cls


class Request(Message):
    OP: ClassVar[Op]

    def to_wire(self) -> dict:
        """The args map: fields left at their default are not sent (the agent fills them in again)."""
        return {spec.wire: value for spec in self._specs
                if (value := getattr(self, spec.name)) is not None and (spec.factory or value != spec.default)}

    @classmethod
    def decode(cls, args: Any) -> "Request":
        """The request whose wire args are `args` (the agent's side): InvalidArgument for a missing
        argument or one of the wrong type. Unknown keys are ignored."""
        if not isinstance(args, dict):
            raise InvalidArgument(f"{cls.OP.value}: arguments must be a map")
        values = {}
        for spec in cls._specs:
            value = args.get(spec.wire, _NO_DEFAULT)
            if value is _NO_DEFAULT:
                if spec.default is _NO_DEFAULT:
                    raise InvalidArgument(f"missing argument {spec.wire!r}")
                values[spec.name] = spec.factory() if spec.factory else spec.default
                continue
            if value is None:
                if not spec.optional:
                    raise InvalidArgument(f"argument {spec.wire!r} must not be nil")
            elif not isinstance(value, spec.kinds) or isinstance(value, bool) and bool not in spec.kinds:
                raise InvalidArgument(f"argument {spec.wire!r} has the wrong type {type(value).__name__}")
            elif spec.to_float:
                value = float(value)
            values[spec.name] = value
        return cls(**values)


class Reply(Message):
    @classmethod
    def decode(cls, result: dict) -> "Reply":
        """The reply whose wire form is `result` (the client's side; the agent is trusted for types)."""
        values = {}
        for spec in cls._specs:
            value = result.get(spec.wire, _NO_DEFAULT)
            if value is _NO_DEFAULT:
                if spec.default is _NO_DEFAULT:
                    raise KeyError(f"{cls.__name__}: the agent's reply has no {spec.wire!r}")
                value = spec.factory() if spec.factory else spec.default
            values[spec.name] = value
        return cls(**values)


# ---- requests --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class KeysRequest(Request):
    """A request about some chunks of one namespace: its digest and their keys as one blob."""

    ns: bytes
    keys: bytes


@message
class Hello(Request):
    OP = Op.HELLO
    version: int


@message
class Register(Request):
    """Declare a namespace and its chunk geometry ([layers, heads, head_dim, tokens, planes, dtype]);
    the reply is the namespace's id on this agent (an int)."""

    OP = Op.REGISTER
    ns: bytes
    geometry: list
    description: dict = field(default_factory=dict)


@message
class Lookup(KeysRequest):
    OP = Op.LOOKUP
    cluster: bool = False  # a cluster agent: the prefix held anywhere in the cluster


@message
class Contains(KeysRequest):
    """The reply is one tier code per key (bytes), 0 where absent."""

    OP = Op.CONTAINS


@message
class Reserve(Request):
    OP = Op.RESERVE
    ns: bytes
    sizes: list
    keys: bytes | None = None  # None: a credit, whose keys are named at commit


@message
class Commit(Request):
    OP = Op.COMMIT
    rid: int
    named: dict | None = None  # credit slot index -> key
    renew: list | None = None  # sizes of the next credit, reserved in the same round trip
    keep: bool = False  # the unnamed slots of a credit stay reserved for a later commit


@message
class Abort(Request):
    OP = Op.ABORT
    rid: int


@message
class Acquire(KeysRequest):
    OP = Op.ACQUIRE
    prefix: bool = True


@message
class Release(Request):
    OP = Op.RELEASE
    lid: int


@message
class Touch(KeysRequest):
    """The reply (to a request that gets one) is how many of the chunks are still held."""

    OP = Op.TOUCH


@message
class Evict(KeysRequest):
    OP = Op.EVICT
    tiers: list = field(default_factory=lambda: ["cpu", "disk"])


@message
class Clear(Request):
    OP = Op.CLEAR
    ns: bytes


@message
class Flush(Request):
    OP = Op.FLUSH
    timeout: float = 60.0


@message
class Stats(Request):
    """The reply is the agent's statistics document (a map; docs/local-protocol.md)."""

    OP = Op.STATS


@message
class List(Request):
    """The reply is a list of {digest, geometry, description} maps, one per registered namespace."""

    OP = Op.LIST


@message
class Events(Request):
    OP = Op.EVENTS
    since: int = 0
    limit: int = 1000


@message
class Chunks(Request):
    OP = Op.CHUNKS
    ns: bytes | None = None
    tier: int = 0
    start: int = 0
    limit: int = 1000
    pinned: bool = False


@message
class Pin(Request):
    OP = Op.PIN
    ns: bytes
    ttl: float
    keys: bytes | None = None
    renew: int | None = None  # a live pin lease to extend instead of keys to pin


@message
class Unpin(Request):
    OP = Op.UNPIN
    lease: int
    ns: bytes | None = None  # when given, the lease must belong to this namespace


@message
class Move(KeysRequest):
    OP = Op.MOVE
    tier: str
    timeout: float = 60.0


@message
class Prefetch(KeysRequest):
    OP = Op.PREFETCH


@message
class Pull(KeysRequest):
    OP = Op.PULL


@message
class OnMembers(Request):
    """The reply maps node id -> that node's wire reply (["ok", result] or ["err", code, message])."""

    OP = Op.ON_MEMBERS
    op: str
    args: dict | None = None  # the same args for every member
    calls: dict | None = None  # node id -> args, for those nodes only
    timeout: float | None = None


# ---- replies ---------------------------------------------------------------------------------------
@message
class HelloReply(Reply):
    version: int
    arena_path: str
    arena_bytes: int
    lease_ttl_s: float
    chunk_tokens: int
    pid: int
    prefault: bool
    max_batch_chunks: int
    busy_poll_us: int = 0
    directory_path: str | None = None  # the shared node directory (lookups without a round trip)
    locations_path: str | None = None  # the shared locations index (gets without a round trip)
    cluster: bool = False
    node: str = ""  # a cluster member's Ray node id
    members: list | None = None  # a cluster member: the node ids it knows now, sorted


@message
class LookupReply(Reply):
    WIRE_NAMES = {"node": "self"}
    matched: int
    tiers: bytes
    nodes: dict | None = None  # a cluster lookup: node -> {"chunks": n, "tiers": bytes}
    node: str | None = None  # a cluster lookup: the answering agent's node


@message
class ReserveReply(Reply):
    """Per key an arena offset, or RESERVE_EXISTS / RESERVE_NO_SPACE; `rid` names the reservation."""

    rid: int
    offsets: list
    ttl: float


RESERVE_EXISTS = -1  # already stored (or being written by someone else): nothing to write
RESERVE_NO_SPACE = -2  # nothing evictable: everything is pinned, reserved or queued


@message
class CommitReply(Reply):
    stored: int
    existing: int
    errors: list  # [index, error code, message] of each refused chunk
    next: ReserveReply | None = None  # the credit a `renew` reserved

    @classmethod
    def decode(cls, result: dict) -> "CommitReply":
        reply = Reply.decode.__func__(cls, result)  # no zero-argument super() in a slotted dataclass
        if reply.next is not None:
            object.__setattr__(reply, "next", ReserveReply.decode(reply.next))
        return reply


@message
class AcquireReply(Reply):
    lid: int
    offsets: list  # arena offset per key, -1 for a miss
    sizes: list  # chunk bytes per key, 0 for a miss
    ttl: float
    reasons: dict  # index -> MissReason, for misses
    promoted: list = field(default_factory=list)  # indexes read up from disk for this request
    remote: list | None = None  # a cluster agent: indexes pulled from peers for this request


@message
class EvictReply(Reply):
    cpu: int
    disk: int
    pinned: int = 0


@message
class FlushReply(Reply):
    flushed: bool
    queued: int = 0


@message
class EventsReply(Reply):
    events: list  # {"seq", "time", "kind", "ns", "tier", "keys"}
    next: int
    dropped: int
    last: int


@message
class ChunksReply(Reply):
    chunks: list  # [key, namespace digest, tier bits]
    next: int  # `start` of the next page, 0 on the last


@message
class PinReply(Reply):
    WIRE_NAMES = {"nbytes": "bytes"}
    lease: int  # 0: nothing of it is stored here
    pinned: int
    nbytes: int
    ttl: float


@message
class UnpinReply(Reply):
    unpinned: int


@message
class MoveReply(Reply):
    moved: int
    pinned: int | None = None  # to disk: kept in the arena, pinned
    pending: int | None = None  # to disk: not written by the deadline


@message
class PrefetchReply(Reply):
    missing: int


@message
class PullReply(Reply):
    pulled: int
    failed: dict  # index -> MissReason
    tiers: bytes  # this node's tier code of each key afterwards
