"""The node agent: one process per node that owns the node's tiers and serves the engine processes on it.

store.py composes the rooms (namespaces, directory, puts, reads, leases, write-behind) over the tiers;
ops.py answers the local protocol's requests (docs/local-protocol.md); server.py serves them on a Unix
socket; run.py runs it all in the foreground.
"""

from .ops import AgentOps, Peers
from .run import close_agent, open_agent, run_agent
from .server import AgentServer
from .store import NodeStore

__all__ = ["AgentOps", "AgentServer", "NodeStore", "Peers", "close_agent", "open_agent", "run_agent"]
