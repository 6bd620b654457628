"""Per-(layer, head) attention-entropy statistics as a torchmetrics ``Metric`` (reduced across ranks)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

__all__ = ["HeadEntropyMean"]


class HeadEntropyMean(Metric):
    """Mean row entropy of each (layer, head) over every query row seen since the last ``reset``.

    Sums and counts are the states (float64, ``dist_reduce_fx="sum"``), so under data parallelism ``compute``
    gives the mean over all ranks' rows, as torchmetrics synchronizes them.

    Args:
        num_layers: L.
        num_heads: H.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, num_layers: int, num_heads: int) -> None:
        super().__init__()
        self.add_state("total", default=torch.zeros(num_layers, num_heads, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(num_layers, num_heads, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, row_entropies: Sequence[torch.Tensor] | torch.Tensor, query_mask: torch.Tensor | None = None):
        """Adds L row-entropy tensors [B, H, T] (or one [L, B, H, T]); ``query_mask`` [B, T] bool keeps real queries."""
        stacked = (
            torch.stack([e.detach() for e in row_entropies])
            if not isinstance(row_entropies, torch.Tensor)
            else row_entropies.detach()
        )
        stacked = stacked.to(self.total.device, torch.float64)  # [L, B, H, T]
        if query_mask is None:
            self.total += stacked.sum(dim=(1, 3))
            self.count += stacked.shape[1] * stacked.shape[3]
        else:
            keep = query_mask.to(stacked.device, torch.bool)[None, :, None, :]  # [1, B, 1, T]
            self.total += torch.where(keep, stacked, torch.zeros_like(stacked)).sum(dim=(1, 3))
            self.count += query_mask.sum().to(torch.float64)

    def compute(self) -> torch.Tensor:
        """[L, H] mean entropies (nats); NaN for a head with no row."""
        return self.total / self.count
