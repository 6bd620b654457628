"""Every recipe parses through the CLI, names a known architecture, and the generated ones are up to date."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from entropic.cli import EntropicCLI
from entropic.data import EntropicDataModule
from entropic.lightning_module import EntropicLM
from entropic.models import EntropicConfig

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


class _ParseOnlyCLI(EntropicCLI):
    """Parses and links the recipe exactly like `entropic fit`, but builds and runs nothing."""

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def _parse(recipe: Path, *overrides: str):
    # LightningCLI warns when it is given args while sys.argv also holds pytest's arguments.
    with mock.patch.object(sys, "argv", ["entropic"]):
        cli = _ParseOnlyCLI(EntropicLM, EntropicDataModule, args=["fit", "--config", str(recipe), *overrides])
    return cli.config.fit


def test_recipes_exist_for_both_scales_and_every_paper_architecture():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    assert {"default.yaml", "debug.yaml"} <= names
    for scale in ("cpu", "gpt2-small"):
        for stem in ("sm_ln_g", "sm_ln_r", "sm_ln", "sm_g", "sm_r", "sm", "sm_scffn", "sm_scfuffn"):
            assert f"{scale}/{stem}.yaml" in names
        assert f"{scale}/ereg_sm_t_scfuffn.yaml" in names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_recipe_parses_and_builds_a_valid_model_config(recipe: Path):
    config = _parse(recipe)
    model = config.model
    # The architecture name and sizes must make a valid model configuration (cheap: no weights are built).
    EntropicConfig.from_preset(
        model.arch,
        n_layer=model.n_layer,
        n_head=model.n_head,
        n_embd=model.n_embd,
        n_positions=model.n_positions,
        vocab_size=config.data.vocab_size,
    )
    assert config.data.block_size <= model.n_positions
    assert config.data.max_block_size == model.n_positions  # linked by the CLI
    assert config.checkpoint.dirpath.endswith("checkpoints")


def test_gpt2_small_recipes_use_the_paper_shape_and_optimizer():
    config = _parse(REPO / "recipes" / "gpt2-small" / "sm_ln_g.yaml")
    assert (config.model.n_layer, config.model.n_head, config.model.n_embd, config.model.n_positions) == (
        12,
        12,
        768,
        128,
    )
    assert config.model.learning_rate == pytest.approx(1e-3)
    assert config.model.weight_decay == pytest.approx(0.1)
    assert config.model.warmup_fraction == pytest.approx(0.05)
    assert config.trainer.gradient_clip_val == pytest.approx(1.0)
    assert config.data.batch_size * config.trainer.accumulate_grad_batches == 512


def test_unknown_recipe_key_is_rejected_by_the_parser(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "recipes" / "debug.yaml").read_text().replace("n_layer: 2", "n_layers: 2"))
    with pytest.raises(SystemExit):
        _parse(bad)
    assert "n_layers" in capsys.readouterr().err


def test_generated_recipes_are_up_to_date():
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "generate_recipes.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
