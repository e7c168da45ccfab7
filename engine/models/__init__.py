"""Model definitions (Qwen3)."""
