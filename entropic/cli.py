"""The ``entropic`` command: ``fit``/``validate``/``test`` a recipe with LightningCLI, and ``report`` runs.

Examples::

    entropic fit --config recipes/default.yaml
    entropic fit --config recipes/debug.yaml --trainer.max_steps=20 --trainer.default_root_dir=runs/debug
    entropic fit --config recipes/debug.yaml --trainer.default_root_dir=runs/debug --ckpt_path last   # resume
    entropic report runs/cpu/*
    entropic export runs/default        # writes runs/default/model for a run trained before
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# matplotlib (imported by Lightning's dependencies) writes a font cache to the home directory unless told
# otherwise; keep it in the project cache like every other cache of a run.
os.environ.setdefault("MPLCONFIGDIR", os.path.join(os.environ.get("ENTROPIC_CACHE", ".cache/entropic"), "matplotlib"))

from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from entropic.callbacks.run_record import RunRecord
from entropic.callbacks.throughput import TokenThroughputMonitor
from entropic.data import EntropicDataModule
from entropic.env import env_flag
from entropic.export import MODEL_DIR, export_model, export_run
from entropic.lightning_module import EntropicLM
from entropic.report import write_report

DEFAULT_ROOT_DIR = "runs/default"

DESCRIPTION = (
    "Train the paper's architectures from a recipe (fit, validate, test). Two more commands: "
    "`entropic report RUN_DIR...` (side-by-side table of runs) and `entropic export RUN_DIR` (the model directory "
    "of a finished run). Set ENTROPIC_DEBUG=1 to see tracebacks of input errors."
)


class StepProgressBar(RichProgressBar):
    """Rich progress bar that shows the step budget instead of "Epoch 0/-2" when training is bounded by steps."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs in (None, -1) and trainer.max_steps and trainer.max_steps > 0:
            return f"Epoch {current_epoch}, step budget {trainer.max_steps}"
        return super()._get_train_description(current_epoch)


def _checkpoint_dir(root: str | None) -> str:
    return os.path.join(root or DEFAULT_ROOT_DIR, "checkpoints")


class EntropicCLI(LightningCLI):
    """LightningCLI with the entropic conventions.

    - Checkpoints go to ``<default_root_dir>/checkpoints`` with ``last.ckpt``, so ``--ckpt_path last`` resumes.
    - Metrics go to a CSV logger under ``<default_root_dir>/logs/version_N`` (one version per launch; the report
      stitches them together), unless the recipe configures its own logger.
    - The data module's vocabulary size and the model's context are linked, and a block size above the
      model's context is refused before training starts.
    - After ``fit``, ``report.md``/``report.json`` are written next to the checkpoints, and ``model/`` holds the
      trained model and its tokenizer (``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained``).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(RunRecord, "run_record")  # the report's source: works with any logger
        parser.add_lightning_class_args(TokenThroughputMonitor, "throughput")  # train/device/items_per_sec = tokens/s
        # last.ckpt every 100 optimizer steps (and at the end), so a killed run resumes with --ckpt_path last.
        # With save_top_k=0 Lightning writes `last` only on this step cadence, not at validation or epoch end.
        parser.set_defaults(
            {"checkpoint.save_last": True, "checkpoint.save_top_k": 0, "checkpoint.every_n_train_steps": 100}
        )
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=_checkpoint_dir)
        parser.link_arguments("model.n_positions", "data.max_block_size")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        bar = trainer.progress_bar_callback
        if type(bar) is RichProgressBar:  # Lightning's default one: swap in the step-aware description
            trainer.callbacks[trainer.callbacks.index(bar)] = StepProgressBar()
        return trainer

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config["trainer"]
        if not trainer.get("default_root_dir"):
            trainer["default_root_dir"] = DEFAULT_ROOT_DIR
        if trainer.get("logger") in (None, True):
            trainer["logger"] = {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": trainer["default_root_dir"], "name": "logs"},
            }

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            root = Path(self.trainer.default_root_dir)
            table = write_report([root], out_dir=root)
            model_dir = export_model(self.model.model, self.datamodule.tokenizer, root / MODEL_DIR)
            print(f"\nReport written to {root / 'report.md'}; model and tokenizer in {model_dir}\n\n{table}")


def _report_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="entropic report", description="Side-by-side table of training runs.")
    parser.add_argument("run_dirs", nargs="+", help="run directories (a recipe's trainer.default_root_dir)")
    parser.add_argument("--out", default=None, help="directory for report.md and report.json (default: none)")
    args = parser.parse_args(argv)
    print(write_report(args.run_dirs, out_dir=args.out), end="")
    return 0


def _export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="entropic export", description="Writes RUN_DIR/model (save_pretrained + tokenizer) from a finished run."
    )
    parser.add_argument("run_dir", help="a run directory of `entropic fit` (its trainer.default_root_dir)")
    parser.add_argument("--out", default=None, help=f"model directory to write (default: RUN_DIR/{MODEL_DIR})")
    args = parser.parse_args(argv)
    try:
        path = export_run(args.run_dir, args.out)
    except FileNotFoundError as error:
        parser.error(str(error))
    print(f"model and tokenizer written to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``entropic`` console script."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] == "report":
        return _report_main(args[1:])
    if args and args[0] == "export":
        return _export_main(args[1:])
    try:
        EntropicCLI(
            EntropicLM,
            EntropicDataModule,
            args=argv,  # None: LightningCLI reads sys.argv itself (passing both makes it warn)
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": DESCRIPTION},
        )
    except (FileNotFoundError, ValueError) as error:  # bad paths and settings: one line, not a traceback
        if env_flag("ENTROPIC_DEBUG"):
            raise
        print(f"entropic: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
