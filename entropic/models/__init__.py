"""The reduced-nonlinearity GPT-2 family of the entropy-guided attention papers, as Hugging Face models.

Importing this package registers ``model_type="entropic"`` with ``AutoConfig`` and ``AutoModelForCausalLM``,
so ``AutoModelForCausalLM.from_pretrained(local_dir)`` and ``from_config`` work.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from entropic.models.configuration import PRESETS, EntropicConfig, preset_names
from entropic.models.modeling import (
    EntropicCausalLMOutput,
    EntropicForCausalLM,
    EntropicModel,
    EntropicPreTrainedModel,
)

__all__ = [
    "PRESETS",
    "EntropicCausalLMOutput",
    "EntropicConfig",
    "EntropicForCausalLM",
    "EntropicModel",
    "EntropicPreTrainedModel",
    "preset_names",
]

AutoConfig.register(EntropicConfig.model_type, EntropicConfig, exist_ok=True)
AutoModelForCausalLM.register(EntropicConfig, EntropicForCausalLM, exist_ok=True)
