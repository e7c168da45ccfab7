"""Tensor parallelism: rank 0 (the scheduler's process) drives ranks 1..N-1, each a process running
the same model step on its shard. Control messages cross a shared-memory channel; tensors move
through torch.distributed (NCCL on GPU, gloo on CPU)."""
