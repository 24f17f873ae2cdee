"""Engine and framework integrations: each turns an engine's KV cache into kvstore chunks and back."""
