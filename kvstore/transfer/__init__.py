"""Moving KV between an engine's paged cache and kvstore chunks.

An engine keeps each layer's KV in fixed-size blocks scattered through one tensor; kvstore keeps it in
chunks of consecutive tokens, laid out ``[layers, planes, tokens, heads, head_dim]`` (layout.py).
PagedLayout reads where every (plane, token, head) row lives from the engine tensor's shape and strides;
gather copies a request's rows into a chunk and scatter copies them back, one indexed copy per layer.
"""

from .kernels import array_backend, gather, scatter
from .paged import ORDERS, MLA_ORDERS, PagedLayout, UnsupportedLayout

__all__ = ["PagedLayout", "UnsupportedLayout", "gather", "scatter", "array_backend", "ORDERS", "MLA_ORDERS"]
