"""Where attention layers leave their per-row entropies for losses, monitors and callbacks.

Every attention layer that runs :func:`entropic.ops.entropic_attention` (our models, and Hugging Face
models switched to the ``"entropic"`` attention implementation) stores the row entropy of its last
forward on itself, as attribute :data:`ROW_ENTROPY_ATTR`, together with its layer index. The tensor
keeps its autograd graph, so a penalty built from it back-propagates into the attention.
"""

from __future__ import annotations

import torch
from torch import nn

ROW_ENTROPY_ATTR = "entropic_row_entropy"
"""Attribute name: a [B, H, T] fp32 tensor of row entropies in nats from the module's last forward."""

NATIVE_RECORDING_ATTR = "records_attention_entropy"
"""Class attribute: True on models whose attention always runs the entropic op (no switching needed)."""

LAYER_INDEX_ATTR = "layer_idx"
"""Attribute name: the module's layer index (transformers' attention modules already carry it)."""


def record_row_entropy(module: nn.Module, row_entropy: torch.Tensor) -> None:
    """Stores ``row_entropy`` ([B, H, T]) on ``module`` for later collection."""
    setattr(module, ROW_ENTROPY_ATTR, row_entropy)


def entropy_recording_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that have recorded a row entropy, ordered by layer index.

    Raises:
        RuntimeError: two recording modules report the same layer index.
    """
    found = [m for m in model.modules() if getattr(m, ROW_ENTROPY_ATTR, None) is not None]
    indexed = [(getattr(m, LAYER_INDEX_ATTR, None), position, m) for position, m in enumerate(found)]
    if all(idx is not None for idx, _, _ in indexed):
        layer_ids = [idx for idx, _, _ in indexed]
        if len(set(layer_ids)) != len(layer_ids):
            raise RuntimeError(f"attention modules report duplicate layer indices {sorted(layer_ids)}")
        indexed.sort(key=lambda item: item[0])
    return [m for _, _, m in indexed]


def collect_row_entropies(model: nn.Module) -> list[torch.Tensor]:
    """Row entropies of the last forward, one [B, H, T] tensor per attention layer, in layer order.

    Returns an empty list when no layer of ``model`` has run the entropic attention yet.
    """
    return [getattr(m, ROW_ENTROPY_ATTR) for m in entropy_recording_modules(model)]


def clear_row_entropies(model: nn.Module) -> None:
    """Drops the stored entropies (and the autograd graphs they keep alive).

    Call it before ``copy.deepcopy(model)``: a stored entropy that is part of an autograd graph cannot be
    deep-copied.
    """
    for m in model.modules():
        if getattr(m, ROW_ENTROPY_ATTR, None) is not None:
            setattr(m, ROW_ENTROPY_ATTR, None)
