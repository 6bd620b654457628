"""A GPT-2-style pre-LN decoder whose every nonlinearity can be switched off, with entropy-recording attention.

Layout follows GPT-2 (``transformer.wte/wpe/h[i].{ln_1, attn, ln_2, mlp}/ln_f``, ``lm_head`` tied to ``wte``), so
Hugging Face tooling and the module paths of the papers' code carry over. Each attention layer runs
:func:`entropic.ops.entropic_attention`; forward returns the per-query-row entropies of every layer, with their
autograd graph, and hands them to the model's :class:`entropic.ops.recording.EntropyRecorder` for callbacks that
only see the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from entropic.functional import entropy_penalty
from entropic.models.configuration import EntropicConfig
from entropic.models.stabilizers import AttentionTemperature, FFNScaling, apply_static_normalization
from entropic.ops import entropic_attention, record_row_entropy
from entropic.ops.recording import attach_recorder

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "identity": nn.Identity}

_RESIDUAL_PROJECTION = "_entropic_residual_projection"
"""Marks the linears that write into the residual stream, which get GPT-2's depth-scaled init."""


def _mark_residual_projection(linear: nn.Linear) -> nn.Linear:
    setattr(linear, _RESIDUAL_PROJECTION, True)
    return linear


@dataclass
class EntropicModelOutput(BaseModelOutput):
    """BaseModelOutput plus ``row_entropies``: one [B, H, T] fp32 tensor (nats) per layer, with grad."""

    row_entropies: tuple[torch.Tensor, ...] | None = None


@dataclass
class EntropicCausalLMOutput(CausalLMOutput):
    """CausalLMOutput plus ``row_entropies`` (one [B, H, T] fp32 tensor, nats, per layer, with grad) and
    ``entropy_penalty`` (the unweighted penalty of this forward, scalar fp32, when the model owns thresholds)."""

    row_entropies: tuple[torch.Tensor, ...] | None = None
    entropy_penalty: torch.Tensor | None = None


class EntropicAttention(nn.Module):
    """Causal multi-head self-attention that also yields each query row's entropy.

    Separate q/k/v projections (rather than GPT-2's fused ``c_attn``) so that weight or spectral norm can target
    Q, K and V individually, as in the papers' ablation.
    """

    def __init__(self, config: EntropicConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.backend = config.attention_backend
        d = config.n_embd
        self.q_proj = nn.Linear(d, d, bias=config.bias)
        self.k_proj = nn.Linear(d, d, bias=config.bias)
        self.v_proj = nn.Linear(d, d, bias=config.bias)
        self.c_proj = _mark_residual_projection(nn.Linear(d, d, bias=config.bias))
        self.resid_dropout = nn.Dropout(config.dropout)
        self.temperature = None
        if config.attn_temperature != "none":
            per_query = config.attn_temperature == "head_query"
            self.temperature = AttentionTemperature(
                config.n_head, config.n_positions, per_query, config.temperature_init
            )

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, key_padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> (output [B, T, d], row entropy [B, H, T])."""
        B, T, C = x.shape
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (
            proj(x).view(B, T, self.n_head, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        temperature = None if self.temperature is None else self.temperature(position_ids)
        if temperature is not None and temperature.dim() == 3:
            # Rows sit at different positions (left padding): dividing the logits of query i by t_i is the
            # same as dividing q_i by t_i, which handles a per-row [B, H, T] temperature.
            q = q / temperature.unsqueeze(-1).to(q.dtype)
            temperature = None
        y, row_entropy = entropic_attention(
            q, k, v, causal=True, temperature=temperature, key_padding_mask=key_padding_mask, backend=self.backend
        )
        record_row_entropy(self, row_entropy)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), row_entropy


class EntropicMLP(nn.Module):
    """The FFN: d -> ffn_mult·d -> d with an activation, or one d×d linear when fused (identity activation)."""

    def __init__(self, config: EntropicConfig) -> None:
        super().__init__()
        d = config.n_embd
        if config.fuse_ffn:
            # W_out·(W_in·x + b_in) + b_out == (W_out·W_in)·x + (W_out·b_in + b_out): one d×d linear.
            self.c_fused = _mark_residual_projection(nn.Linear(d, d, bias=config.bias))
        else:
            self.c_fc = nn.Linear(d, config.ffn_mult * d, bias=config.bias)
            self.act = _ACTIVATIONS[config.activation]()
            self.c_proj = _mark_residual_projection(nn.Linear(config.ffn_mult * d, d, bias=config.bias))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d]."""
        y = self.c_fused(x) if hasattr(self, "c_fused") else self.c_proj(self.act(self.c_fc(x)))
        return self.dropout(y)


def _layer_norm(config: EntropicConfig, enabled: bool) -> nn.Module:
    if not enabled:
        return nn.Identity()
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)


class EntropicBlock(nn.Module):
    """Pre-LN block: X̂ = X + MHA(LN1(X)); X_out = X̂ + FFN(LN2(X̂)), or β·X̂ + FFN(LN2(X̂))/α when scaled."""

    def __init__(self, config: EntropicConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = _layer_norm(config, config.ln_attn)
        self.attn = EntropicAttention(config, layer_idx)
        self.ln_2 = _layer_norm(config, config.ln_ffn)
        self.mlp = EntropicMLP(config)
        self.ffn_scale = None
        if config.ffn_stabilizer == "scaling":
            self.ffn_scale = FFNScaling(config.ffn_scale_alpha_init, config.ffn_scale_beta_init)

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, key_padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> (x_out [B, T, d], row entropy [B, H, T])."""
        attn_out, row_entropy = self.attn(self.ln_1(x), position_ids, key_padding_mask)
        x = x + attn_out
        ffn_out = self.mlp(self.ln_2(x))
        x = x + ffn_out if self.ffn_scale is None else self.ffn_scale(x, ffn_out)
        return x, row_entropy


class EntropicPreTrainedModel(PreTrainedModel):
    """Weight init and Hugging Face plumbing shared by :class:`EntropicModel` and :class:`EntropicForCausalLM`."""

    config_class = EntropicConfig
    config: EntropicConfig
    base_model_prefix = "transformer"
    _no_split_modules: ClassVar[list[str]] = ["EntropicBlock"]
    supports_gradient_checkpointing = False
    # Our attention always runs entropic_attention, so entropic.hf never needs to switch its implementation.
    records_attention_entropy: ClassVar[bool] = True

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init: N(0, initializer_range), residual projections scaled by 1/√(2L); the papers' scalars."""
        super()._init_weights(module)
        std = self.config.initializer_range
        # Transformers calls this once per module that owns parameters directly, so the depth scaling is keyed
        # on the residual linears themselves, not on the attention/FFN modules that hold them.
        if isinstance(module, nn.Linear) and getattr(module, _RESIDUAL_PROJECTION, False):
            # Two residual branches per block add up over depth (GPT-2 paper).
            init.normal_(module.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
        elif isinstance(module, AttentionTemperature):
            init.constant_(module.log_temperature, math.log(module.init_value))
        elif isinstance(module, FFNScaling):
            init.constant_(module.alpha, module.alpha_init)
            init.constant_(module.beta, module.beta_init)
        elif isinstance(module, EntropicModel) and module.entropy_thresholds is not None:
            init.constant_(module.entropy_thresholds, self.config.threshold_init)


class EntropicModel(EntropicPreTrainedModel):
    """The decoder stack: token and position embeddings, L blocks, optional final LayerNorm.

    When ``config.learnable_thresholds``, it owns ``entropy_thresholds`` [L, H]: per-(layer, head) target entropies
    as fractions θ of log T, read by the entropy penalty (``entropic.functional.entropy_penalty``). They are
    unused by forward, so they get gradient only from that penalty (with DDP, use ``find_unused_parameters`` or
    always add the penalty). They start at ``config.threshold_init`` (default
    :data:`entropic.functional.DEFAULT_THRESHOLD`).
    """

    def __init__(self, config: EntropicConfig) -> None:
        super().__init__(config)
        config.check()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(EntropicBlock(config, i) for i in range(config.n_layer))
        self.ln_f = _layer_norm(config, config.ln_final)
        if config.learnable_thresholds:
            self.entropy_thresholds = nn.Parameter(torch.full((config.n_layer, config.n_head), config.threshold_init))
        else:
            self.register_parameter("entropy_thresholds", None)
        self.post_init()
        # After the weight init, so that weight norm starts from g = ‖W‖ (same function) and spectral norm from
        # W/σ(W) of the initialized W.
        if config.ffn_stabilizer in ("weight_norm", "spectral_norm"):
            apply_static_normalization(self.h, config.ffn_stabilizer, config.norm_targets)
        attach_recorder(self)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> EntropicModelOutput:
        """Runs the decoder.

        Args:
            input_ids: [B, T] token ids, T <= n_positions.
            attention_mask: [B, T], 1 for real tokens and 0 for padding; padded keys are never attended.
            position_ids: [B, T] or [1, T] absolute positions; default 0..T-1. For left-padded batches pass
                ``(attention_mask.cumsum(-1) - 1).clamp(min=0)`` so real tokens keep their positions.
            output_hidden_states: also return the input of every block and the final output.

        Returns:
            last_hidden_state [B, T, d], hidden_states (L+1 of [B, T, d]) if asked, and row_entropies
            (L of [B, H, T]).

        Raises:
            ValueError: inputs of the wrong rank or shape, or T > n_positions.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        batch, seq_len = input_ids.shape
        if seq_len > self.config.n_positions:
            raise ValueError(
                f"sequence length {seq_len} exceeds the context n_positions={self.config.n_positions}; "
                f"truncate the input to at most {self.config.n_positions} tokens"
            )
        key_padding_mask = None
        if attention_mask is not None:
            if attention_mask.shape != (batch, seq_len):
                raise ValueError(
                    f"attention_mask must be [batch, seq_len] = {(batch, seq_len)} (1 = token, 0 = padding), "
                    f"got shape {tuple(attention_mask.shape)}"
                )
            key_padding_mask = attention_mask.to(torch.bool)
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=input_ids.device).unsqueeze(0)
        position_ids = position_ids.view(-1, seq_len)

        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))  # [B, T, d]
        hidden_states = []
        row_entropies = []
        for block in self.h:
            if output_hidden_states:
                hidden_states.append(x)
            x, row_entropy = block(x, position_ids, key_padding_mask)
            row_entropies.append(row_entropy)
        x = self.ln_f(x)
        if output_hidden_states:
            hidden_states.append(x)
        return EntropicModelOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            row_entropies=tuple(row_entropies),
        )


class EntropicForCausalLM(EntropicPreTrainedModel, GenerationMixin):
    """:class:`EntropicModel` with a language-modelling head tied to the token embedding.

    ``generate()`` works without a KV cache: every step recomputes the whole prefix, so generation is O(T²) per
    token and bounded by ``n_positions``; it is meant for evaluation and samples, not serving.

    Example::

        config = EntropicConfig.from_preset("SM(t)+ScFuFFN", n_layer=2, n_head=2, n_embd=64, vocab_size=256)
        model = EntropicForCausalLM(config)
        out = model(input_ids, labels=input_ids)  # out.loss, out.logits, out.row_entropies
    """

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: EntropicConfig) -> None:
        super().__init__(config)
        self.transformer = EntropicModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()
        attach_recorder(self)

    @property
    def entropy_thresholds(self) -> nn.Parameter | None:
        """The [L, H] learnable entropy thresholds (fractions of log T), or None when the config has none."""
        return self.transformer.entropy_thresholds

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # no KV cache: generate() recomputes the prefix

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> dict[str, torch.Tensor | None]:
        """The whole prefix at every step; left padding gets positions counted from each row's first token."""
        position_ids = None
        if attention_mask is not None and not bool(attention_mask.all()):
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> EntropicCausalLMOutput | tuple:
        """Logits, and the next-token loss when ``labels`` are given.

        Args:
            input_ids: [B, T] token ids.
            attention_mask: [B, T], 1 for tokens, 0 for padding.
            position_ids: see :meth:`EntropicModel.forward`.
            labels: [B, T]; the loss is the mean cross-entropy of predicting ``labels[:, 1:]`` from positions
                ``:-1`` (shifted inside, like GPT-2), ignoring -100. Set padded labels to -100.
            output_hidden_states: also return the hidden states.
            output_attentions: unsupported (attention probabilities are never materialized; use
                ``row_entropies``); True raises.
            return_dict: False returns a tuple.
            **kwargs: generation bookkeeping (``use_cache``, ``cache``, ...), ignored.

        Returns:
            loss (scalar, fp32) if labels: the cross-entropy, plus ``entropy_coeff · entropy_penalty`` when the
            config sets a coefficient; logits [B, T, vocab]; hidden_states if asked; row_entropies (L of
            [B, H, T]); entropy_penalty (unweighted, padded queries left out, E_max = log T of this input) when
            the model owns thresholds.
        """
        if output_attentions:
            raise ValueError(
                "output_attentions=True is not supported: entropic attention never materializes the [T, T] "
                "probabilities; read the per-row entropies from out.row_entropies instead"
            )
        out = self.transformer(input_ids, attention_mask, position_ids, output_hidden_states=bool(output_hidden_states))
        logits = self.lm_head(out.last_hidden_state)  # [B, T, vocab]
        penalty = None
        thresholds = self.entropy_thresholds
        if thresholds is not None and input_ids.shape[1] >= 2:
            penalty = entropy_penalty(
                out.row_entropies,
                thresholds,
                context_size=input_ids.shape[1],
                tolerance=self.config.entropy_tolerance,
                reduction=self.config.entropy_reduction,
                query_mask=None if attention_mask is None else attention_mask.to(torch.bool),
            )
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
            if penalty is not None and self.config.entropy_coeff:
                loss = loss + self.config.entropy_coeff * penalty
        result = EntropicCausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=out.hidden_states,
            row_entropies=out.row_entropies,
            entropy_penalty=penalty,
        )
        return result.to_tuple() if return_dict is False else result
