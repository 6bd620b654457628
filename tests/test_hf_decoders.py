"""Which Hugging Face decoders run the entropic attention: entropies and logits equal eager attention's.

The README's decoder table is generated from this module (``ENTROPIC_UPDATE_README=1 pytest
tests/test_hf_decoders.py`` rewrites it); the test fails when the README's table and the results differ.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from entropic.hf import use_entropic_attention
from entropic.ops import collect_row_entropies

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- decoders:start -->", "<!-- decoders:end -->"
TOLERANCE = 1e-5  # fp32: the entropies and logits of the two attentions agree to rounding

_COMMON = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
_GQA = {**_COMMON, "num_key_value_heads": 2}
_SMALL_GPT = {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 64, "n_positions": 64}

# name -> (config class, model class, tiny config, what it exercises)
DECODERS: dict[str, tuple[str, str, dict, str]] = {
    "GPT-2": ("GPT2Config", "GPT2LMHeadModel", _SMALL_GPT, "learned positions, fused qkv"),
    "GPT-J": ("GPTJConfig", "GPTJForCausalLM", {**_SMALL_GPT, "rotary_dim": 4}, "partial rotary"),
    "GPTBigCode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", _SMALL_GPT, "multi-query attention"),
    "GPT-NeoX": ("GPTNeoXConfig", "GPTNeoXForCausalLM", _COMMON, "rotary"),
    "OPT": (
        "OPTConfig",
        "OPTForCausalLM",
        {**{k: v for k, v in _COMMON.items() if k != "intermediate_size"}, "ffn_dim": 64, "word_embed_proj_dim": 32},
        "learned positions",
    ),
    "Llama": ("LlamaConfig", "LlamaForCausalLM", _GQA, "grouped-query attention"),
    "Mistral": ("MistralConfig", "MistralForCausalLM", _GQA, "grouped-query attention"),
    "Qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _GQA, "qkv bias"),
    "Qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_GQA, "head_dim": 8}, "q/k norm"),
    "Phi": ("PhiConfig", "PhiForCausalLM", _COMMON, "partial rotary"),
    "Phi3": ("Phi3Config", "Phi3ForCausalLM", {**_COMMON, "pad_token_id": 0, "eos_token_id": 0}, "fused qkv"),
    "OLMo": ("OlmoConfig", "OlmoForCausalLM", {**_COMMON, "pad_token_id": 0, "eos_token_id": 0}, "non-parametric norm"),
    "Gemma": ("GemmaConfig", "GemmaForCausalLM", {**_GQA, "head_dim": 8}, "grouped-query attention"),
    "Gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**_GQA, "head_dim": 8}, "logit soft-capping (dense path)"),
    "Gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {**_GQA, "head_dim": 8, "sliding_window": 4},
        "sliding-window layers (dense path)",
    ),
    "Falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4},
        "attention not in AttentionInterface",
    ),
    "Bloom": (
        "BloomConfig",
        "BloomForCausalLM",
        {"vocab_size": 64, "hidden_size": 32, "n_layer": 2, "n_head": 4},
        "attention not in AttentionInterface",
    ),
}


def check_decoder(name: str) -> tuple[str, float | None]:
    """("works", max abs difference of entropies and logits) or ("refused", None) with the error checked."""
    config_name, model_name, kwargs, _ = DECODERS[name]
    config = getattr(transformers, config_name)(**kwargs)
    cls = getattr(transformers, model_name)
    torch.manual_seed(0)
    eager = cls._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    ours = cls._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    ours.load_state_dict(eager.state_dict())
    try:
        use_entropic_attention(ours)
    except ValueError as error:
        assert "AttentionInterface" in str(error) and "entropic.models" in str(error), str(error)
        return "refused", None
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding in the second row
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = eager(ids, attention_mask=mask, output_attentions=True)
        logits = ours(ids, attention_mask=mask).logits
    entropies = collect_row_entropies(ours)
    assert len(entropies) == len(reference.attentions) == 2
    real = mask.bool()[:, None, :]  # padded query rows differ by design (see entropic.hf)
    errors = [float((logits - reference.logits)[mask.bool()].abs().max())]
    for ours_h, probs in zip(entropies, reference.attentions, strict=True):
        eager_h = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
        errors.append(float((ours_h - eager_h).masked_select(real).abs().max()))
    return "works", max(errors)


def decoder_table(results: dict[str, tuple[str, float | None]]) -> str:
    lines = [
        "| decoder | transformers class | entropic attention | exercises |",
        "|---|---|---|---|",
    ]
    for name, (_, model_name, _, note) in DECODERS.items():
        status, _ = results[name]
        cell = "yes: entropies and logits = eager's (fp32, ≤ 1e-5)" if status == "works" else "refused, with the reason"
        lines.append(f"| {name} | `{model_name}` | {cell} | {note} |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def results() -> dict[str, tuple[str, float | None]]:
    return {name: check_decoder(name) for name in DECODERS}


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_runs_the_entropic_attention_exactly_or_is_refused_with_a_reason(results, name):
    status, error = results[name]
    if "AttentionInterface" in DECODERS[name][3]:
        assert status == "refused"
    else:
        assert status == "works" and error <= TOLERANCE, f"{name}: {error}"


def test_readme_table_is_the_generated_one(results):
    text = README.read_text()
    assert START in text and END in text, f"README.md lacks the {START} ... {END} markers"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    table = decoder_table(results)
    if os.environ.get("ENTROPIC_UPDATE_README") == "1":
        README.write_text(f"{head}{START}\n{table}\n{END}{tail}")
    assert f"{START}\n{table}\n{END}" in README.read_text(), (
        "README's decoder table is stale: rerun with ENTROPIC_UPDATE_README=1"
    )
