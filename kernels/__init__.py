"""Attention and KV-cache kernels. Each kernel has a torch reference with the same signature
(`*_ref`), used on CPU and by the tests. This package imports nothing else of nanoserve."""
