"""WatchEvents: the agent's event feed (`events` op) as kvstore.v1.Event messages, filtered per caller.

Events are polled from the agent with the last seq seen; an event of a namespace the caller may not see
is skipped, and `dropped` tells a watcher how many events the agent no longer had when it asked.
"""

from __future__ import annotations

import time
from typing import Iterator

from ..proto import kvstore_pb2 as pb
from ..vocab import Tier, split_keys
from ..wire.messages import Events, EventsReply
from .auth import Principal
from .catalog import Catalog
from .fanout import Nodes

_WATCH_POLL_S = 0.05  # how often a watcher asks the agent for new events when there were none
_PAGE = 1000


def watch(nodes: Nodes, catalog: Catalog, principal: Principal, namespace: bytes, since: int,
          active) -> Iterator[pb.Event]:
    """Events after `since` (0: only new ones) of `namespace` (b"": every namespace the caller may see),
    until `active()` turns false."""
    if not since:
        since = nodes.request(Events(0, 1), EventsReply, None).last
    while active():
        reply = nodes.request(Events(since, _PAGE), EventsReply, None)
        dropped = reply.dropped
        for event in reply.events:
            message = event_message(event, nodes.host, catalog, namespace, principal, dropped)
            if message is not None:
                dropped = 0
                yield message
        since = reply.next
        if not reply.events:
            time.sleep(_WATCH_POLL_S)


def event_message(event: dict, node: str, catalog: Catalog, only: bytes, principal: Principal,
                  dropped: int) -> pb.Event | None:
    """The kvstore.v1.Event of one agent event; None if it is not for this watcher."""
    digest = event["ns"]
    if only and digest != only:
        return None
    description = catalog.cached(digest)
    if description is None and digest:
        description = catalog.namespaces(None, refresh=True).get(digest)
    if description is None or not principal.may_see(str(description.get("tenant", ""))):
        return None
    message = pb.Event(seq=event["seq"], timestamp=event["time"], node=node, namespace=digest, dropped=dropped)
    hashes = split_keys(event["keys"])
    medium = Tier(event["tier"]).label.upper() if event["tier"] else ""
    if event["kind"] == "stored":
        message.stored.CopyFrom(pb.BlockStored(block_hashes=hashes, medium=medium,
                                               block_size=int(description.get("chunk_tokens") or 0)))
    elif event["kind"] == "removed":
        message.removed.CopyFrom(pb.BlockRemoved(block_hashes=hashes, medium=medium))
    else:
        message.cleared.SetInParent()
    return message
