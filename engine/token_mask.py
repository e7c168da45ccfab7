"""The tokens each grammar-constrained row of a step may take, as a bitmask on the device, and its application."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class TokenMask:
    """Rows of a step under a grammar and the tokens each may take: bit t % 32 of word t // 32 is token t.

    Words past the model's vocabulary are ignored; tokens past the mask's words are not allowed.
    """

    rows: torch.Tensor  # [R] int64: rows of the batch
    bitmask: torch.Tensor  # [R, W] int32, W = ceil(vocabulary / 32)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] with every token a masked row may not take at -inf (a new tensor)."""
        vocab_size = logits.shape[1]
        # Little-endian words: byte k of word w holds tokens 32w + 8k ... 32w + 8k + 7, lowest bit first.
        shifts = torch.arange(8, dtype=torch.uint8, device=logits.device)
        bits = (self.bitmask.view(torch.uint8)[:, :, None] >> shifts) & 1  # [R, 4W, 8]
        allowed = bits.view(len(self.rows), -1)[:, :vocab_size].bool()  # [R, <= V]
        x = logits[self.rows]  # [R, V]
        x[:, : allowed.shape[1]].masked_fill_(~allowed, float("-inf"))
        x[:, allowed.shape[1] :] = float("-inf")
        return logits.index_put((self.rows,), x)
