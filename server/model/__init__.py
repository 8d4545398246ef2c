"""Our compact Llama-family forward over a packed varlen batch with a paged KV cache."""
