"""entropic: entropy-guided training of private-inference-friendly transformers.

The public API is imported lazily, so ``import entropic`` stays cheap and the Lightning callbacks do not
import Lightning until they are used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY_ATTRIBUTES = {
    "AttentionEntropyMonitor": "entropic.callbacks",
    "EntropyRegularization": "entropic.callbacks",
    "EntropicConfig": "entropic.models",
    "EntropicForCausalLM": "entropic.models",
    "EntropicModel": "entropic.models",
    "entropic_attention": "entropic.ops",
    "entropy_penalty": "entropic.functional",
    "attention_entropy": "entropic.functional",
    "entropy_from_logits": "entropic.functional",
    "use_entropic_attention": "entropic.hf",
    "register_entropic_attention": "entropic.hf",
}

__all__ = [
    "AttentionEntropyMonitor",
    "EntropicConfig",
    "EntropicForCausalLM",
    "EntropicModel",
    "EntropyRegularization",
    "__version__",
    "attention_entropy",
    "entropic_attention",
    "entropy_from_logits",
    "entropy_penalty",
    "register_entropic_attention",
    "use_entropic_attention",
]

if TYPE_CHECKING:
    from entropic.callbacks import AttentionEntropyMonitor, EntropyRegularization
    from entropic.functional import attention_entropy, entropy_from_logits, entropy_penalty
    from entropic.hf import register_entropic_attention, use_entropic_attention
    from entropic.models import EntropicConfig, EntropicForCausalLM, EntropicModel
    from entropic.ops import entropic_attention


def __getattr__(name: str) -> Any:
    module_name = _LAZY_ATTRIBUTES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'entropic' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
