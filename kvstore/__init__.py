"""kvstore: a tiered, distributed KV-cache store for LLM serving."""

__version__ = "0.1.0"
