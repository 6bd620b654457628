"""Cost accounting in the paper's convention: nonlinear operations and FLOPs per forward pass.

Both functions read a config by duck typing, so any object with these attributes works
(:class:`entropic.models.EntropicConfig` has them):

* ``n_layer``, ``n_head``, ``n_embd``, ``n_positions``, ``ffn_mult`` (FFN width = ``ffn_mult·n_embd``);
* ``ln_attn``, ``ln_ffn`` (the two in-block LayerNorms), ``ln_final``;
* ``activation`` (``"gelu"``, ``"relu"`` or ``"identity"``) and ``fuse_ffn``.

The numbers are for one forward pass over ``seq_len`` tokens (one sequence), which is what the paper's
tables list for generating one output token from a ``T``-token prompt. ``tests/test_accounting.py``
checks every row of the paper's GPT-2 tables (T=128, 256, 512 and L=18).
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["ATTENTION_KINDS", "NONLINEAR_OPS", "OpCount", "flops", "nonlinear_ops"]

NONLINEAR_OPS = ("softmax", "layernorm", "gelu", "relu")
ATTENTION_KINDS = ("standard", "simplified")
_IDENTITY = ("identity", "none", "linear")


class OpCount(NamedTuple):
    """``count`` operations, each applied to a tensor of ``shape``; unpacks as ``(count, shape)``."""

    count: int
    shape: tuple[int, int]

    @property
    def elements(self) -> int:
        """Total number of elements the operations act on."""
        return self.count * self.shape[0] * self.shape[1]


def _check(config: Any, seq_len: int, ffn_layers: int | None) -> tuple[int, int]:
    """Validate ``seq_len`` and ``ffn_layers``; return ``(seq_len, number of layers with an FFN)``."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    if seq_len > config.n_positions:
        raise ValueError(
            f"seq_len={seq_len} is longer than the model's context n_positions={config.n_positions}; "
            f"use seq_len <= {config.n_positions}"
        )
    if ffn_layers is None:
        return seq_len, config.n_layer
    if isinstance(ffn_layers, bool) or not isinstance(ffn_layers, int) or not 0 <= ffn_layers <= config.n_layer:
        raise ValueError(f"ffn_layers must be an int in [0, n_layer={config.n_layer}], got {ffn_layers!r}")
    return seq_len, ffn_layers


def _activation(config: Any) -> str:
    """The FFN nonlinearity as "gelu", "relu" or "identity" (a fused FFN has none)."""
    if getattr(config, "fuse_ffn", False):
        return "identity"
    act = getattr(config, "activation", "gelu")
    name = "identity" if act is None else str(act).lower()
    if name in _IDENTITY:
        return "identity"
    for family in ("gelu", "relu"):
        if name.startswith(family):  # gelu_new, gelu_pytorch_tanh, ...
            return family
    raise ValueError(f"unknown FFN activation {act!r}; expected 'gelu', 'relu' or 'identity'")


def nonlinear_ops(
    config: Any, seq_len: int, *, include_final_ln: bool = False, ffn_layers: int | None = None
) -> dict[str, OpCount]:
    """Count the nonlinear operations of one forward pass, as in the paper's "#Nonlinear Ops" column.

    GPT-2 (L=12, H=12, d=768) at T=128: softmax 144×[128×128], layernorm 24×[128×768],
    gelu 12×[128×3072]; an AERO model such as SM+ScFuFFN keeps only the 144 softmaxes.

    * softmax: one per head and layer, over the ``[T, T]`` attention scores (the causal mask does not
      change the shape the paper reports).
    * layernorm: the in-block LayerNorms (``ln_attn``, ``ln_ffn``), each over ``[T, d]``. The final
      LayerNorm is **not** counted by default: the paper's baseline lists 24 LayerNorms for 12 layers,
      i.e. two per block and none after the last block (the authors' LN-free models even keep HF's
      final LayerNorm while the tables list no LayerNorm for them). Pass ``include_final_ln=True``
      to add it (the paper's He & Hofmann rows list that one ``[T, d]`` LayerNorm).
    * gelu / relu: one per layer with an FFN, over ``[T, ffn_mult·d]``; none for an identity or
      fused FFN.

    Args:
        config: an :class:`~entropic.models.EntropicConfig` or any object with the attributes listed
            in the module docstring.
        seq_len: tokens in the forward pass, ``1 <= seq_len <= config.n_positions``.
        include_final_ln: also count the final LayerNorm when ``config.ln_final`` is set.
        ffn_layers: how many layers keep their FFN (the paper's pruned "_i" variants); default all.

    Returns:
        ``{"softmax": OpCount, "layernorm": OpCount, "gelu": OpCount, "relu": OpCount}``; each
        ``OpCount`` unpacks as ``(count, (rows, cols))``.

    Raises:
        ValueError: ``seq_len`` outside ``[1, n_positions]``, a bad ``ffn_layers`` or an unknown activation.
    """
    seq_len, n_ffn = _check(config, seq_len, ffn_layers)
    d, n_layer = config.n_embd, config.n_layer
    d_ff = config.ffn_mult * d
    n_ln = n_layer * (int(bool(config.ln_attn)) + int(bool(config.ln_ffn)))
    if include_final_ln and getattr(config, "ln_final", False):
        n_ln += 1
    act = _activation(config)
    return {
        "softmax": OpCount(n_layer * config.n_head, (seq_len, seq_len)),
        "layernorm": OpCount(n_ln, (seq_len, d)),
        "gelu": OpCount(n_ffn if act == "gelu" else 0, (seq_len, d_ff)),
        "relu": OpCount(n_ffn if act == "relu" else 0, (seq_len, d_ff)),
    }


def flops(config: Any, seq_len: int, *, attention: str = "standard", ffn_layers: int | None = None) -> dict[str, int]:
    """FLOPs of one forward pass in the FFN and attention sublayers, in the paper's convention.

    Convention: 2 FLOPs per multiply-accumulate; nonlinearities (see :func:`nonlinear_ops`), embeddings,
    the LM head and biases are not counted, whatever ``config.bias`` says (the authors' models have no
    FFN bias, and counting one would turn the printed 21.7B at L=18 into 21.8B). Per layer, with
    ``d = n_embd``, ``d_ff = ffn_mult·d`` and ``T = seq_len``:

    * FFN: ``2·T·(d·d_ff + d_ff·d)`` for the two linear layers, or ``2·T·d²`` when fused (one
      ``d×d`` matrix), plus ``T·d`` for adding the output into the residual stream.
      GPT-2 at T=128: 14.5B, fused 1.8B.
    * attention, ``"standard"``: ``2·T·4d²`` for the Q, K, V and output projections, ``2·T²·d`` for
      the scores ``QKᵀ`` over the full ``T×T`` square, and ``2·d·T(T+1)/2`` for the value product
      over the causal triangle. GPT-2 at T=128: 7.7B.
    * attention, ``"simplified"`` (He & Hofmann's blocks, the paper's "SOTA" rows: identity value and
      output projections): ``2·T·2d²`` for Q and K plus ``2·T²·d`` for ``QKᵀ``. GPT-2 at T=128: 3.9B.

    The paper does not state its convention. This one reproduces every FFN and attention entry of its
    GPT-2 tables to the printed digit. Two details decide single rows: the residual add is what lifts
    the fused FFN at T=512 from 7.248B to the printed 7.3B, and the mixed dense/causal score count is
    the only simple one that fits all attention rows within 5% (a fully dense count, ``4·T²·d``, is
    6.8% over the printed 36.2B at T=512; a fully causal one is 6.6% under).

    Args:
        config: an :class:`~entropic.models.EntropicConfig` or any object with the attributes listed in
            the module docstring.
        seq_len: tokens in the forward pass, ``1 <= seq_len <= config.n_positions``.
        attention: ``"standard"`` or ``"simplified"`` (see above).
        ffn_layers: how many layers keep their FFN (the pruned "_i" variants); default all.

    Returns:
        ``{"ffn": int, "attention": int}`` in FLOPs (divide by 1e9 for the paper's "B").

    Raises:
        ValueError: ``seq_len`` outside ``[1, n_positions]``, a bad ``ffn_layers`` or ``attention``.
    """
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
    t, n_ffn = _check(config, seq_len, ffn_layers)
    d, n_layer = config.n_embd, config.n_layer
    d_ff = config.ffn_mult * d
    ffn_macs = d * d if getattr(config, "fuse_ffn", False) else 2 * d * d_ff
    ffn = n_ffn * (2 * t * ffn_macs + t * d)
    n_proj = 4 if attention == "standard" else 2
    attn = 2 * t * n_proj * d * d + 2 * t * t * d
    if attention == "standard":
        attn += d * t * (t + 1)  # value product over the causal triangle: 2 FLOPs · d · T(T+1)/2
    return {"ffn": ffn, "attention": n_layer * attn}
