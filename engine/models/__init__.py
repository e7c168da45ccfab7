"""Model definitions: the dense Qwen decoder (Qwen2, Qwen2.5, Qwen3)."""
