"""The lease string Pin returns: one string for per-node agent leases of one namespace.

"<namespace hex>-<id>" on one node; "<namespace hex>-<id>@<node>+<id>@<node>..." in a cluster; "" when
nothing was pinned. "<id>" alone names a lease of the node the controller fronts.
"""

from __future__ import annotations

from typing import Callable

from ..errors import InvalidArgument


def lease_string(digest: bytes, leases: dict[str, int], cluster: bool, own_node: str) -> str:
    if not leases:
        return ""
    if not cluster:
        return f"{digest.hex()}-{leases[own_node]}"
    return f"{digest.hex()}-" + "+".join(f"{lid}@{node}" for node, lid in sorted(leases.items()))


def parse_lease(lease: str, own_node: Callable[[], str]) -> tuple[bytes, dict[str, int]]:
    """(namespace digest, node -> agent lease id) of a lease string; InvalidArgument for anything else.
    `own_node()` names the node of an "<id>" alone."""
    ns_hex, _, parts = lease.partition("-")
    leases: dict[str, int] = {}
    try:
        digest = bytes.fromhex(ns_hex)
        for part in parts.split("+"):
            lid, _, node = part.partition("@")
            if not lid.isdigit() or node in leases:
                raise ValueError(part)
            leases[node] = int(lid)
    except ValueError:
        digest = b""
    if len(digest) != 16 or not leases:
        raise InvalidArgument(f"{lease!r} is not a lease from Pin (<namespace hex>-<id>[@<node>][+...])")
    if "" in leases:  # "<id>" alone: a lease of the node this controller fronts
        leases[own_node()] = leases.pop("")
    return digest, leases
