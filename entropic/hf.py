"""Hugging Face integration: an ``"entropic"`` attention implementation for transformers models.

After :func:`register_entropic_attention` (or :func:`use_entropic_attention`), any transformers model
that dispatches attention through ``AttentionInterface`` (GPT-2, the Llama family, ...) can run
``attn_implementation="entropic"``. Each attention layer then runs
:func:`entropic.ops.entropic_attention` and stores its per-row entropies ([B, H, T], nats, with their
autograd graph) on the attention module (see :mod:`entropic.ops.recording`), so an entropy penalty
needs neither ``output_attentions=True`` nor the eager [B, H, T, T] attention.

How masks arrive. transformers only builds a mask for implementation names that are registered in
``AttentionMaskInterface``; an unregistered custom name receives ``attention_mask=None`` (no causal
mask, no padding). We therefore register a mask builder under the same name: transformers'
``sdpa_mask``, i.e. a bool [B, 1, Tq, Tk] mask (True = attend) or ``None`` when the mask is purely
causal (or, for bidirectional models, full) with no padding. We chose the bool sdpa mask over
``eager_mask`` because it is 4× smaller, lets the common unpadded causal case skip mask creation,
and decodes exactly. The attention function then:

* ``None`` mask: ``causal = module.is_causal`` (a ``is_causal`` keyword overrides it), no padding;
* bool (or 0/-inf float) mask equal to ``causal ∧ key_padding`` or to ``key_padding`` alone (checked
  exactly, element by element): the fused op with ``causal`` and ``key_padding_mask``;
* any other mask (sliding windows, packed sequences, block masks, additive biases): the dense
  fallback below, which applies the mask as given. It materializes [B, H, Tq, Tk] and warns once.

Attention dropout. With ``dropout > 0`` in training, the entropy must come from the pre-dropout
probabilities while the output uses the dropped-out ones (as eager attention does). The fused
kernels do not apply dropout, so such calls use the dense fallback (exact eager semantics: entropy
from softmax probabilities, ``out = dropout(p) @ v``), with a one-time warning that memory is O(T²).
Set ``attn_pdrop``/``attention_dropout`` to 0 to stay on the O(T) path.

Fully masked query rows (e.g. left-padding positions under a causal mask) get output 0 and entropy 0,
whereas eager attention spreads them uniformly over all keys; the hidden states of padding positions
therefore differ from eager's, while every non-padding position matches.

Logit soft-capping (``softcap``, Gemma 2) also runs the dense fallback, with the capped logits.

``output_attentions=True`` yields ``None`` for each layer (the point is not to materialize them);
read :func:`entropic.ops.collect_row_entropies` instead (the model's recorder, attached by
:func:`use_entropic_attention`). Attention sinks (``s_aux``) are not supported and raise.
Models whose attention does not go through ``AttentionInterface`` (Falcon, Bloom, ...) are refused by
:func:`use_entropic_attention` with the reason.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from entropic.ops import entropic_attention
from entropic.ops.recording import NATIVE_RECORDING_ATTR, attach_recorder, record_row_entropy
from entropic.ops.reference import reference_entropic_attention

__all__ = [
    "ATTN_IMPLEMENTATION",
    "entropic_attention_forward",
    "entropic_attention_mask",
    "is_entropic_attention",
    "register_entropic_attention",
    "use_entropic_attention",
]

ATTN_IMPLEMENTATION = "entropic"
"""The name under which the attention and its mask builder are registered with transformers."""

BACKEND = "auto"
"""Backend passed to :func:`entropic.ops.entropic_attention` by the HF attention function."""

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def entropic_attention_mask(*args, **kwargs):
    """Mask builder for ``AttentionMaskInterface``: transformers' ``sdpa_mask`` (bool, or None when not needed)."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def _to_bool_mask(mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(bool mask, None) when ``mask`` is bool or a pure 0/-large float mask; else (None, additive float bias)."""
    if mask.dtype == torch.bool:
        return mask, None
    if mask.is_floating_point():
        # Values at or below half the dtype's min count as "masked" (eager_mask uses finfo.min, others -inf).
        blocked = mask <= torch.finfo(mask.dtype).min / 2
        if bool(((mask == 0) | blocked).all()):
            return ~blocked, None
        return None, mask
    raise TypeError(f"attention_mask must be bool or floating point, got {mask.dtype}")


def _decode_mask(mask: torch.Tensor, batch: int, t_q: int, t_k: int) -> tuple[bool, torch.Tensor | None] | None:
    """Expresses a bool [B|1, 1, Tq, Tk] mask as (causal, key_padding_mask [B, Tk] or None), or None if impossible."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (t_q, t_k) or mask.shape[0] not in (1, batch):
        return None
    m = mask[:, 0].expand(batch, t_q, t_k)
    tri = torch.ones(t_q, t_k, dtype=torch.bool, device=mask.device).tril(diagonal=t_k - t_q)
    # Causal: query i sees keys 0..i + Tk - Tq, so the last query row sees every unpadded key.
    pad = m[:, -1, :]
    if bool(torch.equal(m, tri & pad[:, None, :])):
        return True, (None if bool(pad.all()) else pad.contiguous())
    pad = m[:, 0, :]
    if bool(torch.equal(m, pad[:, None, :].expand_as(m))):
        return False, (None if bool(pad.all()) else pad.contiguous())
    return None


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def entropic_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function: q, k, v [B, H, T, D] -> ([B, T, H, D], None); records row entropies."""
    softcap = kwargs.get("softcap")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError('attn_implementation="entropic" does not support attention sinks (s_aux)')
    if key.shape[1] != query.shape[1]:  # grouped-query attention
        if query.shape[1] % key.shape[1]:
            raise ValueError(f"query heads {query.shape[1]} not a multiple of key/value heads {key.shape[1]}")
        n_rep = query.shape[1] // key.shape[1]
        key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    batch, _, t_q, dim = query.shape
    t_k = key.shape[-2]
    scale = dim**-0.5 if scaling is None else float(scaling)
    is_causal = kwargs.get("is_causal")
    module_causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    dropout = float(dropout or 0.0)
    training = bool(getattr(module, "training", False))
    use_dropout = dropout > 0 and training

    causal, padding, bool_mask, bias = module_causal, None, None, None
    if attention_mask is not None:
        bool_mask, bias = _to_bool_mask(attention_mask)
        decoded = None if bool_mask is None else _decode_mask(bool_mask, batch, t_q, t_k)
        if decoded is None:
            causal = False  # the mask as given is the whole truth
        else:
            causal, padding = decoded
            bool_mask = None

    if bool_mask is not None or bias is not None or use_dropout or softcap is not None:
        if softcap is not None:
            _warn_once(
                "softcap",
                "entropic attention: logit soft-capping (e.g. Gemma 2) runs a materialized [B, H, T, T] attention.",
            )
        elif use_dropout:
            _warn_once(
                "dropout",
                "entropic attention: attention dropout > 0 in training runs a materialized [B, H, T, T] attention "
                "(entropy from pre-dropout probabilities); set the attention dropout to 0 for the O(T)-memory path.",
            )
        else:
            _warn_once(
                "mask",
                "entropic attention: a mask that is not causal + key padding (e.g. sliding window, packed sequences "
                "or an additive bias) runs a materialized [B, H, T, T] attention.",
            )
        out, row_entropy = reference_entropic_attention(
            query,
            key,
            value,
            scale=scale,
            causal=causal,
            key_padding_mask=padding,
            attn_mask=bool_mask,
            bias=bias,
            softcap=None if softcap is None else float(softcap),
            dropout=dropout,
            training=training,
        )
    else:
        out, row_entropy = entropic_attention(
            query, key, value, causal=causal, scale=scale, key_padding_mask=padding, backend=BACKEND
        )
    record_row_entropy(module, row_entropy)
    return out.transpose(1, 2).contiguous(), None


def register_entropic_attention() -> None:
    """Registers ``"entropic"`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, entropic_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, entropic_attention_mask)


def is_entropic_attention(model: nn.Module) -> bool:
    """Whether ``model`` (a transformers ``PreTrainedModel``) runs the ``"entropic"`` attention."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == ATTN_IMPLEMENTATION


def use_entropic_attention(model: nn.Module) -> bool:
    """Switches a transformers model to ``attn_implementation="entropic"``; returns whether anything changed.

    Models whose attention records entropies natively (entropic's own) are left as they are. Either way the model
    gets an :class:`~entropic.ops.recording.EntropyRecorder` that collects the entropies of each forward.

    Raises:
        ValueError: the model does not dispatch attention through ``AttentionInterface``.
    """
    register_entropic_attention()
    if is_entropic_attention(model) or getattr(model, NATIVE_RECORDING_ATTR, False):
        attach_recorder(model)
        return False
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"{type(model).__name__} is not a transformers PreTrainedModel (no set_attn_implementation)")
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} computes attention in its own code instead of dispatching through transformers' "
            "AttentionInterface, so entropic cannot run its attention or record entropies. Use a decoder from the "
            "README's table (GPT-2, Llama, Qwen, Mistral, Gemma, ...) or one of entropic's models "
            "(entropic.models.EntropicForCausalLM)."
        )
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if not is_entropic_attention(model):
        raise ValueError(f"{type(model).__name__} did not accept attn_implementation={ATTN_IMPLEMENTATION!r}")
    attach_recorder(model)
    return True
