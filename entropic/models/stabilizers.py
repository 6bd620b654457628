"""The learnable pieces the papers add to a LayerNorm-free GPT-2: temperature, FFN scaling, static norms."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrizations


class AttentionTemperature(nn.Module):
    """Learnable softmax temperature t > 0 that divides the scaled attention logits: softmax(q·kᵀ / (√d·t)).

    Parameterized as ``t = exp(log_temperature)``:

    - t stays positive with no clamp, and the update of log t is relative (d logits / d log t = -logits/t), so
      heads with very different temperatures learn at the same pace;
    - ``init`` maps exactly to t at start. 1.0 makes the layer start as ordinary attention; the paper's t = 0.01
      (the ``SM(t)+ScFuFFN`` preset) scales the logits by 100, which in a LayerNorm-free model lifts the near-zero
      logits at init off the flat, uniform-attention start (with large logits it would instead give one-hot rows);
    - weight decay on log t pulls t toward 1, i.e. toward ordinary attention.

    Args:
        n_head: heads H.
        n_positions: context length; the per-query variant holds one value per absolute query position.
        per_query: [H, n_positions] temperatures (the paper) instead of [H].
        init: initial temperature (> 0).
    """

    def __init__(self, n_head: int, n_positions: int, per_query: bool, init: float) -> None:
        super().__init__()
        self.init_value = init
        shape = (n_head, n_positions) if per_query else (n_head,)
        self.log_temperature = nn.Parameter(torch.full(shape, math.log(init)))

    @property
    def temperature(self) -> torch.Tensor:
        """t = exp(log_temperature): [H, n_positions] or [H]."""
        return self.log_temperature.exp()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.log_temperature, math.log(self.init_value))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Temperatures for the queries at ``position_ids`` ([1, T] or [B, T]).

        Returns:
            [H] (per head), [H, T] when every row shares the positions, or [B, H, T].
        """
        t = self.log_temperature.exp()
        if t.dim() == 1:
            return t
        if position_ids.shape[0] == 1:
            return t[:, position_ids[0]]
        return t[:, position_ids].transpose(0, 1)


class FFNScaling(nn.Module):
    """The papers' scaled FFN residual (Eq. 8): X_out = β·X + (1/α)·FFN(X), one learnable α and β per block.

    The papers do not state the initial α, β. The defaults α = β = 1 start the block as the unscaled residual
    block, so a scaled model differs from its unscaled counterpart only by what the scalars learn. He & Hofmann's
    simplified transformers, which the papers compare against, start their FFN-branch gain at 0.1 (α = 10).
    """

    def __init__(self, alpha_init: float, beta_init: float) -> None:
        super().__init__()
        self.alpha_init, self.beta_init = alpha_init, beta_init
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.beta = nn.Parameter(torch.tensor(float(beta_init)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha_init)
        nn.init.constant_(self.beta, self.beta_init)

    def forward(self, x: torch.Tensor, ffn_out: torch.Tensor) -> torch.Tensor:
        """x, ffn_out: [B, T, d] -> β·x + ffn_out/α."""
        return self.beta * x + ffn_out / self.alpha


def normalization_targets(block: nn.Module, norm_targets: str) -> list[nn.Linear]:
    """The linears of one block that ``norm_targets`` ("ffn", "qk", "qk+ffn", "qkv+ffn", "qkvo+ffn") names."""
    projections = {"q": block.attn.q_proj, "k": block.attn.k_proj, "v": block.attn.v_proj, "o": block.attn.c_proj}
    linears: list[nn.Linear] = []
    for part in norm_targets.split("+"):
        if part == "ffn":
            linears += [m for m in block.mlp.modules() if isinstance(m, nn.Linear)]
        else:
            linears += [projections[letter] for letter in part]
    return linears


def apply_static_normalization(blocks: nn.ModuleList, kind: str, norm_targets: str) -> None:
    """Reparameterizes the targeted weights of every block with weight or spectral normalization.

    Both are "static": at inference the weight is a fixed matrix, so they add no nonlinearity to encrypted
    inference. Weight norm (per output row, W = g·V/‖V‖) starts from g = ‖W‖ and leaves the function unchanged;
    spectral norm divides W by its largest singular value, estimated by power iteration (one step per training
    forward; the iteration vectors are buffers saved with the model).

    Args:
        blocks: the model's blocks ``h``.
        kind: ``"weight_norm"`` or ``"spectral_norm"``.
        norm_targets: see :func:`normalization_targets`.
    """
    apply = {"weight_norm": parametrizations.weight_norm, "spectral_norm": parametrizations.spectral_norm}[kind]
    for block in blocks:
        for linear in normalization_targets(block, norm_targets):
            apply(linear)
