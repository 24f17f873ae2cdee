"""The engine side of the node agent: `LocalClient` (local.py) and what it is made of.

connection.py: the socket to the agent and the mappings of what it shares; puts.py: the put pipeline;
reads.py: lookups and gets; results.py: what the calls return. The client never imports the agent:
it speaks the local protocol (kvstore/wire) and reads shared memory (kvstore/shm.py).
"""

from .connection import AgentConnection, PendingReply
from .local import LocalClient
from .puts import PIPELINE_MIN_BYTES, PendingPut, PutHandle
from .results import ClusterLookupResult, GetResult, LookupResult, PutResult

__all__ = ["AgentConnection", "ClusterLookupResult", "GetResult", "LocalClient", "LookupResult", "PIPELINE_MIN_BYTES",
           "PendingPut", "PendingReply", "PutHandle", "PutResult"]
