"""A trained run as a model directory: ``save_pretrained`` of the model plus its tokenizer.

``entropic fit`` ends by writing ``<run>/model``; ``entropic export RUN_DIR`` writes it for a run trained before,
from the run's ``checkpoints/last.ckpt`` and its ``config.yaml``. The directory loads with
``AutoModelForCausalLM.from_pretrained`` (after ``import entropic.models``) and ``AutoTokenizer.from_pretrained``,
and ``python -m pi_eval bench --checkpoint`` runs it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

__all__ = ["MODEL_DIR", "export_model", "export_run"]

MODEL_DIR = "model"
"""Name of the model directory inside a run directory."""


def export_model(model: Any, tokenizer: Any, out_dir: str | os.PathLike[str]) -> Path:
    """Writes ``model`` (a transformers ``PreTrainedModel``) and ``tokenizer`` to ``out_dir``, atomically.

    The tokenizer's special tokens become the model config's ``bos/eos/pad_token_id``, so ``generate()`` stops at
    the end-of-text token. The directory is built next to ``out_dir`` and swapped in whole.
    """
    target = Path(out_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(model.config, name, value)
    if model.config.pad_token_id is None and model.config.eos_token_id is not None:
        model.config.pad_token_id = model.config.eos_token_id
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def export_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> Path:
    """Writes ``<run_dir>/model`` (or ``out_dir``) from the run's last checkpoint and its recipe's tokenizer.

    Raises:
        FileNotFoundError: the run has no ``checkpoints/last.ckpt`` or no ``config.yaml``.
    """
    from entropic.data import EntropicDataModule
    from entropic.lightning_module import EntropicLM

    run = Path(run_dir)
    checkpoint = run / "checkpoints" / "last.ckpt"
    config_path = next(iter(sorted(run.glob("**/config.yaml"))), None)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"no checkpoint at {checkpoint}: is {run} a run directory of `entropic fit`?")
    if config_path is None:
        raise FileNotFoundError(f"no config.yaml under {run}: the tokenizer settings are read from the run's recipe")
    recipe = yaml.safe_load(config_path.read_text())
    data = {k: v for k, v in (recipe.get("data") or {}).items() if k != "max_block_size"}
    tokenizer = EntropicDataModule(**data).tokenizer
    module = EntropicLM.load_from_checkpoint(checkpoint, map_location="cpu")
    return export_model(module.model, tokenizer, out_dir or run / MODEL_DIR)
