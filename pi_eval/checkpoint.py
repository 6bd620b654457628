"""What ``--checkpoint`` accepts, and the architecture name a report gives a trained model.

``--checkpoint PATH`` may be

* a ``save_pretrained`` directory (``config.json`` inside), used as it is;
* an ``entropic fit`` run directory: its ``model/`` directory (``entropic fit`` writes it at the end), or, when that
  is missing or older than ``checkpoints/last.ckpt``, an export of the last checkpoint into ``model/``
  (:func:`entropic.export.export_run`, as ``entropic export RUN_DIR`` does);
* a run's ``checkpoints/last.ckpt``: the same as its run directory.

:func:`architecture_name` names a config by the preset whose architecture fields it has (``"SM+LN+G"``, ...), so a
report or plot of a checkpoint says what was trained instead of the CLI's default preset.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["architecture_name", "resolve_checkpoint"]

# the EntropicConfig fields the presets differ in (sizes, initialisation and training settings excluded)
_ARCH_FIELDS = (
    "ln_attn",
    "ln_ffn",
    "activation",
    "fuse_ffn",
    "ffn_stabilizer",
    "norm_targets",
    "attn_temperature",
    "learnable_thresholds",
)


def _run_model(run: Path, given: str) -> Path:
    """The save_pretrained directory of run directory ``run`` (exported from its last checkpoint if needed)."""
    from entropic.export import MODEL_DIR, export_run

    model, ckpt = run / MODEL_DIR, run / "checkpoints" / "last.ckpt"
    if (model / "config.json").is_file():
        stale = ckpt.is_file() and ckpt.stat().st_mtime > (model / "config.json").stat().st_mtime
        if not stale:
            return model
        print(f"pi_eval: {model} is older than {ckpt}; exporting the last checkpoint", file=sys.stderr, flush=True)
    elif not ckpt.is_file():
        raise FileNotFoundError(f"--checkpoint {given!r}: run directory {run} has neither {MODEL_DIR}/ nor {ckpt}")
    else:
        print(f"pi_eval: exporting {ckpt} to {model} (entropic export)", file=sys.stderr, flush=True)
    return export_run(run)


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """``--checkpoint PATH`` -> the ``save_pretrained`` directory to load (see the module docstring).

    Raises:
        FileNotFoundError: PATH does not exist or is none of the accepted forms (the message names them).
        ValueError: PATH is a ``.ckpt`` file other than a run's ``checkpoints/last.ckpt``.
    """
    given = str(path)
    p = Path(path)
    if p.is_file():
        if p.suffix != ".ckpt":
            raise FileNotFoundError(
                f"--checkpoint {given!r} is a file but not a checkpoint (.ckpt); give a save_pretrained directory, "
                "an `entropic fit` run directory or its checkpoints/last.ckpt"
            )
        if p.name != "last.ckpt" or p.parent.name != "checkpoints":
            raise ValueError(
                f"--checkpoint {given!r}: only a run's checkpoints/last.ckpt is accepted (it is exported with the "
                "run's recipe); export another checkpoint with `entropic export` first"
            )
        return _run_model(p.parent.parent, given)
    if not p.is_dir():
        raise FileNotFoundError(f"--checkpoint {given!r} is not a save_pretrained directory: it does not exist")
    if (p / "config.json").is_file():
        return p
    if (p / "model" / "config.json").is_file() or (p / "checkpoints" / "last.ckpt").is_file():
        return _run_model(p, given)
    raise FileNotFoundError(
        f"--checkpoint {given!r} is not a save_pretrained directory: it has no config.json (nor model/config.json "
        "or checkpoints/last.ckpt of an `entropic fit` run directory)"
    )


def architecture_name(config: Any) -> str:
    """The preset whose architecture ``config`` has (e.g. ``"SM+ScFuFFN"``), or ``"custom"`` if none matches.

    Compares the fields the presets set (:data:`_ARCH_FIELDS`); sizes, initial temperatures and training settings
    do not change the name.
    """
    from entropic.models import EntropicConfig
    from entropic.models.configuration import preset_names

    for name in preset_names():
        ref = EntropicConfig.from_preset(name)
        if all(getattr(config, f, None) == getattr(ref, f, None) for f in _ARCH_FIELDS):
            return name
    return "custom"
