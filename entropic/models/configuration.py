"""Configuration of the reduced-nonlinearity GPT-2 family studied in the entropy-guided attention papers.

One :class:`EntropicConfig` covers every architecture of the papers' ablations through independent switches
(LayerNorm positions, FFN activation, FFN fusion, FFN stabilizer, learnable temperature and thresholds).
:meth:`EntropicConfig.from_preset` builds them by the papers' names, e.g. ``"SM(t)+ScFuFFN"``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from transformers import PretrainedConfig

from entropic.functional import DEFAULT_THRESHOLD, REDUCTIONS

ACTIVATIONS = ("gelu", "relu", "identity")
FFN_STABILIZERS = ("none", "scaling", "weight_norm", "spectral_norm")
NORM_TARGETS = ("ffn", "qk", "qk+ffn", "qkv+ffn", "qkvo+ffn")
ATTN_TEMPERATURES = ("none", "head_query", "head")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "reference")

# Paper name -> the fields that differ from the defaults (the SM+LN+G baseline). Sizes come from overrides.
_SOFTMAX_ONLY = {"ln_attn": False, "ln_ffn": False, "activation": "identity"}
_SCALED_FUSED = {**_SOFTMAX_ONLY, "ffn_stabilizer": "scaling", "fuse_ffn": True}
PRESETS: dict[str, dict[str, Any]] = {
    "SM+LN+G": {},
    "SM+LN+R": {"activation": "relu"},
    "SM+LN": {"activation": "identity"},
    "SM+G": {"ln_attn": False, "ln_ffn": False},
    "SM+R": {"ln_attn": False, "ln_ffn": False, "activation": "relu"},
    "SM": dict(_SOFTMAX_ONLY),
    "SM+ScFFN": {**_SOFTMAX_ONLY, "ffn_stabilizer": "scaling"},
    "SM+ScFuFFN": dict(_SCALED_FUSED),
    # EReg(SM(t)+ScFuFFN) is this architecture trained with the entropy penalty, which reads the model's own
    # learnable thresholds; hence learnable_thresholds=True here.
    # t starts at the paper's 0.01 (its CodeParrot value): it multiplies the logits by 100, which lifts the
    # near-zero logits of a LayerNorm-free model at init off uniform attention (docs/reproduction.md: 7% lower
    # perplexity than t = 1 at CPU scale).
    "SM(t)+ScFuFFN": {
        **_SCALED_FUSED,
        "attn_temperature": "head_query",
        "temperature_init": 0.01,
        "learnable_thresholds": True,
    },
}
# The static-normalization ablation on the Softmax-only model: "SM+WNorm(QK+FFN)", "SM+SNorm(FFN)", ...
for _label, _stabilizer in (("WNorm", "weight_norm"), ("SNorm", "spectral_norm")):
    for _targets in NORM_TARGETS:
        PRESETS[f"SM+{_label}({_targets.upper()})"] = {
            **_SOFTMAX_ONLY,
            "ffn_stabilizer": _stabilizer,
            "norm_targets": _targets,
        }


def preset_names() -> list[str]:
    """The names accepted by :meth:`EntropicConfig.from_preset`, in the papers' order."""
    return list(PRESETS)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")


def _real(name: str, value: Any, *, low: float | None = None, high: float | None = None, open_low=False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (open_low and value == low)):
        raise ValueError(f"{name} must be {'>' if open_low else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


class EntropicConfig(PretrainedConfig):
    """A pre-LN GPT-2 decoder with switches for every nonlinearity-reduced variant of the papers.

    Args:
        vocab_size: number of tokens.
        n_positions: context length T (learned position embeddings; longer inputs are refused).
        n_embd: model width d.
        n_layer: number of blocks L.
        n_head: attention heads H per block; must divide ``n_embd``.
        ffn_mult: FFN hidden width as a multiple of d (4 in GPT-2).
        ln_attn: LayerNorm before attention (``h[i].ln_1``).
        ln_ffn: LayerNorm before the FFN (``h[i].ln_2``).
        ln_final: final LayerNorm (``ln_f``). The papers' LN-free models drop only the block LayerNorms, as the
            authors' code does (their LayerNorm counts include no final LN), so every preset keeps it.
        activation: FFN activation, ``"gelu"``, ``"relu"`` or ``"identity"``.
        fuse_ffn: with an identity activation W_in·W_out is a single d×d matrix; store it as one linear
            (8x fewer FFN FLOPs at ``ffn_mult=4``). Requires ``activation="identity"``.
        ffn_stabilizer: ``"none"``; ``"scaling"``: X_out = β·X + (1/α)·FFN(X) with learnable scalars α, β per
            block (the papers' Eq. 8); ``"weight_norm"`` / ``"spectral_norm"``: static reparameterizations of the
            linears named by ``norm_targets``.
        norm_targets: where weight/spectral norm applies: ``"ffn"``, ``"qk"``, ``"qk+ffn"``, ``"qkv+ffn"`` or
            ``"qkvo+ffn"`` (the papers' ablation; q/k/v/o are the attention projections).
        attn_temperature: learnable softmax temperature: ``"none"``, ``"head_query"`` (one per head and query
            position, [H, n_positions], the paper) or ``"head"`` ([H]).
        temperature_init: initial temperature t (> 0). 1.0 starts as standard attention; the ``SM(t)+ScFuFFN``
            preset uses the paper's 0.01, which multiplies the logits by 100. In a LayerNorm-free model the logits
            at init are near zero (std-0.02 weights on an unnormalized stream), so attention still starts close to
            uniform, but with gradients large enough to leave it.
        learnable_thresholds: give the model an [L, H] parameter ``entropy_thresholds`` (fractions of log T) for
            the entropy penalty of EReg training.
        threshold_init: initial threshold fraction θ, in [0, 1]; default
            :data:`entropic.functional.DEFAULT_THRESHOLD`, the default of every penalty owner.
        entropy_coeff: λ of the model's own loss: with thresholds and ``labels``, forward returns
            ``loss = cross-entropy + entropy_coeff · entropy_penalty`` (like a router loss). 0 (default) adds
            nothing; the Lightning callback schedules λ itself and needs 0 here.
        entropy_tolerance: γ of the model's penalty (paper: 0.2).
        entropy_reduction: ``"paper"`` or ``"per_query"`` (see :func:`entropic.functional.entropy_penalty`).
        ffn_scale_alpha_init: initial α of the FFN scaling (> 0).
        ffn_scale_beta_init: initial β of the FFN scaling.
        attention_backend: backend of :func:`entropic.ops.entropic_attention`.
        dropout: dropout on the embeddings and on both residual branches (attention probabilities are never
            dropped, so the recorded entropies are those of the real attention).
        bias: biases in the linears and LayerNorms.
        layer_norm_epsilon: LayerNorm epsilon.
        initializer_range: standard deviation of the normal weight init (GPT-2: 0.02).
        use_cache: must stay False; the model recomputes the prefix at each generation step.
    """

    model_type = "entropic"
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    ffn_mult: int = 4
    ln_attn: bool = True
    ln_ffn: bool = True
    ln_final: bool = True
    activation: str = "gelu"
    fuse_ffn: bool = False
    ffn_stabilizer: str = "none"
    norm_targets: str = "ffn"
    attn_temperature: str = "none"
    temperature_init: float = 1.0
    learnable_thresholds: bool = False
    threshold_init: float = DEFAULT_THRESHOLD
    entropy_coeff: float = 0.0
    entropy_tolerance: float = 0.2
    entropy_reduction: str = "paper"
    ffn_scale_alpha_init: float = 1.0
    ffn_scale_beta_init: float = 1.0
    attention_backend: str = "auto"
    dropout: float = 0.0
    bias: bool = True
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        self.check()
        super().__post_init__(**kwargs)

    def check(self) -> None:
        """Validates every architecture field.

        Raises:
            ValueError: a value outside its allowed range or set, or inconsistent switches.
            TypeError: a switch that is not a bool.
        """
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "ffn_mult"):
            _positive_int(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        for name in ("ln_attn", "ln_ffn", "ln_final", "fuse_ffn", "learnable_thresholds", "bias"):
            _boolean(name, getattr(self, name))
        if self.use_cache:
            raise ValueError("use_cache=True is not supported: the model recomputes the prefix at every step")
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("ffn_stabilizer", self.ffn_stabilizer, FFN_STABILIZERS)
        _choice("norm_targets", self.norm_targets, NORM_TARGETS)
        _choice("attn_temperature", self.attn_temperature, ATTN_TEMPERATURES)
        _choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.fuse_ffn and self.activation != "identity":
            raise ValueError(
                f"fuse_ffn=True needs activation='identity' (W_in·W_out collapses only without a nonlinearity), "
                f"got activation={self.activation!r}"
            )
        if self.norm_targets != "ffn" and self.ffn_stabilizer not in ("weight_norm", "spectral_norm"):
            raise ValueError(
                f"norm_targets={self.norm_targets!r} has an effect only with ffn_stabilizer 'weight_norm' or "
                f"'spectral_norm', got ffn_stabilizer={self.ffn_stabilizer!r}"
            )
        _real("temperature_init", self.temperature_init, low=0.0, open_low=True)
        _real("threshold_init", self.threshold_init, low=0.0, high=1.0)
        _real("entropy_coeff", self.entropy_coeff, low=0.0)
        _real("entropy_tolerance", self.entropy_tolerance, low=0.0)
        if self.entropy_tolerance >= 1:
            raise ValueError(f"entropy_tolerance must be < 1 (a fraction of log T), got {self.entropy_tolerance!r}")
        _choice("entropy_reduction", self.entropy_reduction, REDUCTIONS)
        if self.entropy_coeff and not self.learnable_thresholds:
            raise ValueError(
                f"entropy_coeff={self.entropy_coeff!r} needs learnable_thresholds=True (the model's own θ); "
                "or regularize with entropic.EntropyRegularization / entropic.regularizer.EntropyPenalty"
            )
        _real("ffn_scale_alpha_init", self.ffn_scale_alpha_init, low=0.0, open_low=True)
        _real("ffn_scale_beta_init", self.ffn_scale_beta_init)
        _real("dropout", self.dropout, low=0.0, high=1.0)
        if self.dropout == 1.0:
            raise ValueError("dropout must be < 1, got 1.0")
        _real("layer_norm_epsilon", self.layer_norm_epsilon, low=0.0, open_low=True)
        _real("initializer_range", self.initializer_range, low=0.0, open_low=True)

    @classmethod
    def field_names(cls) -> list[str]:
        """Every keyword the config accepts as a field (its own and Hugging Face's)."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> EntropicConfig:
        """The config of one of the papers' architectures.

        Args:
            name: one of :func:`preset_names`, e.g. ``"SM+LN+G"`` (GPT-2 baseline), ``"SM+ScFuFFN"``,
                ``"SM(t)+ScFuFFN"`` or ``"SM+WNorm(QK+FFN)"``.
            **overrides: any config field, typically ``n_layer``, ``n_head``, ``n_embd``, ``vocab_size`` and
                ``n_positions``; applied over the preset.

        Raises:
            ValueError: unknown preset name or override key, or an invalid resulting config.

        Example::

            config = EntropicConfig.from_preset("SM(t)+ScFuFFN", n_layer=12, n_embd=768, n_positions=128)
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        known = set(cls.field_names())
        unknown = sorted(set(overrides) - known)
        if unknown:
            own = [f for f in cls.__annotations__ if f in known]
            raise ValueError(f"unknown config override(s) {unknown}; allowed: {', '.join(own)}")
        return cls(**{**PRESETS[name], **overrides})
