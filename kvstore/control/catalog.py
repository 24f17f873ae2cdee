"""The namespaces the controller's nodes know, and which of them a caller may see.

The controller is stateless: this is its only cache (digest -> description and geometry), refreshed from
the agents on a miss. A namespace whose tenant the caller's token is not scoped to is refused as
PERMISSION_DENIED; one no node knows is NOT_FOUND.
"""

from __future__ import annotations

from ..errors import InvalidArgument, KVStoreError, NotFound, PermissionDenied
from ..keys import Namespace
from ..wire.messages import List, Register
from .auth import Principal
from .fanout import Nodes, answers


class Catalog:
    def __init__(self, nodes: Nodes):
        self.nodes = nodes
        self._descriptions: dict[bytes, dict] = {}
        self._geometries: dict[bytes, list] = {}
        self._hashers: dict[bytes, Namespace] = {}

    def namespaces(self, context, refresh: bool = False) -> dict[bytes, dict]:
        """Every namespace registered on a node this controller speaks for: digest -> description."""
        if refresh or not self._descriptions:
            answered = answers(self.nodes.run(context, List()), tolerate=("not_found", "unavailable"))
            listed = [ns for namespaces in answered.values() for ns in namespaces]
            self._geometries = {ns["digest"]: ns["geometry"] for ns in listed}
            self._descriptions = {ns["digest"]: ns["description"] for ns in listed}
        return self._descriptions

    def cached(self, digest: bytes) -> dict | None:
        """The description of `digest` as last seen (None if never seen)."""
        return self._descriptions.get(digest)

    def describe(self, digest: bytes, principal: Principal, context) -> dict:
        """The namespace's description, if it exists and the caller may see its tenant."""
        if len(digest) != 16:
            raise InvalidArgument(f"namespace must be a 16-byte digest, got {len(digest)} bytes")
        description = self.namespaces(context).get(digest)
        if description is None:
            description = self.namespaces(context, refresh=True).get(digest)
        if description is None:
            raise NotFound(f"namespace {digest.hex()} is not registered on node {self.nodes.host}")
        if not principal.may_see(str(description.get("tenant", ""))):
            raise PermissionDenied(f"namespace {digest.hex()} belongs to a tenant this token is not scoped to")
        return description

    def visible(self, principal: Principal, context) -> dict[bytes, dict]:
        return {d: desc for d, desc in self.namespaces(context, refresh=True).items()
                if principal.may_see(str(desc.get("tenant", "")))}

    def registration(self, digest: bytes) -> Register:
        """What registers a described namespace on another node (a no-op where it is known)."""
        return Register(digest, self._geometries[digest], self._descriptions[digest])

    def ns_id(self, digest: bytes, context) -> int:
        """The agent's id of a described namespace (what the node directory stores), by registering it
        again with its own geometry: a no-op on the agent."""
        return self.nodes.request(Register(digest, self._geometries[digest]), None, context)

    def hasher(self, digest: bytes, description: dict) -> Namespace:
        """The Namespace whose digest is `digest`, rebuilt from its description (cached), to hash tokens."""
        namespace = self._hashers.get(digest)
        if namespace is None:
            fields = {k: v for k, v in description.items() if k in Namespace.__dataclass_fields__}
            try:
                namespace = Namespace(**fields)
            except (TypeError, KVStoreError):
                namespace = None
            if namespace is None or namespace.digest != digest:
                raise InvalidArgument("the namespace's description does not hash to its digest; send chunk hashes")
            self._hashers[digest] = namespace
        return namespace
