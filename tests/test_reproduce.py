"""scripts/reproduce_cpu.py: arms train through the CLI, finished arms are skipped, results and figures are written."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A tiny model on a 40-file slice of the corpus, so two arms train in seconds.
TINY = [
    "--set=model.n_layer=2",
    "--set=model.n_embd=32",
    "--set=model.n_positions=32",
    "--set=data.block_size=32",
    "--set=data.batch_size=4",
    "--set=data.max_files=40",
    "--set=data.vocab_size=512",
    "--set=trainer.val_check_interval=2",
    "--set=trainer.limit_val_batches=2",
    "--set=trainer.log_every_n_steps=2",
]


@pytest.fixture(scope="module")
def repro():
    spec = importlib.util.spec_from_file_location("reproduce_cpu", REPO / "scripts" / "reproduce_cpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_cpu"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_two_arms_train_report_and_are_skipped_when_rerun(repro, tmp_path, capsys):
    args = [
        "--arms",
        "sm_ln_g,sm",
        "--steps",
        "4",
        *TINY,
        "--out",
        str(tmp_path / "runs"),
        "--docs",
        str(tmp_path / "docs"),
    ]
    assert repro.main(args) == 0
    results = json.loads((tmp_path / "docs" / "results.json").read_text())["arms"]
    assert [r["key"] for r in results] == ["sm_ln_g", "sm"]
    for r in results:
        assert r["steps"] == 4
        assert r["tokens"] == 4 * 4 * 32  # steps x batch x block: the same token budget for every arm
        assert sum(r["bin_shares"]) == pytest.approx(1.0)
        assert len(r["head_means"]) == 2 and len(r["head_means"][0]) == 4  # [L, H]
        assert 0 < r["val_ppl"] < 512 * 2  # a real validation pass ran (vocab 512)
    assert results[0]["arch"] == "SM+LN+G" and results[1]["arch"] == "SM"
    table = (tmp_path / "docs" / "results.md").read_text()
    assert "SM+LN+G (baseline)" in table and "SM (softmax-only)" in table
    for name in ("entropy_bins", "loss_curves", "layer_entropy", "head_heatmaps"):
        assert (tmp_path / "docs" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    trained_log = (tmp_path / "runs" / "sm" / "train.log").read_text()

    capsys.readouterr()
    assert repro.main(args) == 0  # second run: nothing retrains
    out = capsys.readouterr().out
    assert "[sm_ln_g] finished earlier (4 steps), skipped" in out and "[sm] finished earlier" in out
    assert (tmp_path / "runs" / "sm" / "train.log").read_text() == trained_log


def test_unknown_arm_is_rejected_before_anything_runs(repro, tmp_path, capsys):
    with pytest.raises(SystemExit):
        repro.main(["--arms", "sm,sm_gelu", "--out", str(tmp_path / "runs")])
    assert "unknown arm(s) ['sm_gelu']" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_bad_override_and_steps_are_rejected(repro, tmp_path, capsys):
    with pytest.raises(SystemExit):
        repro.main(["--set", "trainer", "--out", str(tmp_path / "runs")])
    assert "must be KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        repro.main(["--set", "nosuch.max_steps=3", "--out", str(tmp_path / "runs")])
    assert "'nosuch' is not a section" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        repro.main(["--steps", "0", "--out", str(tmp_path / "runs")])
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err


def test_lambda_arm_sets_the_regularization_weight(repro, tmp_path):
    arm = repro.lambda_arm(0.3)
    recipe = repro.arm_recipe(arm, tmp_path / arm.key, steps=10, overrides={})
    (reg,) = [c for c in recipe["trainer"]["callbacks"] if c["class_path"].endswith("EntropyRegularization")]
    assert reg["init_args"]["loss_coeff"] == 0.3
    assert recipe["trainer"]["max_steps"] == 10
    assert recipe["trainer"]["default_root_dir"] == str(tmp_path / arm.key)
    with pytest.raises(ValueError, match=r"must be a finite number > 0, got -1\.0"):
        repro.lambda_arm(-1.0)
    no_reg = repro.Arm("x", "sm", "SM", loss_coeff=0.1)
    with pytest.raises(ValueError, match="has no EntropyRegularization"):
        repro.arm_recipe(no_reg, tmp_path / "x", steps=None, overrides={})


def test_every_arm_has_a_recipe(repro, tmp_path):
    for arm in repro.ARMS:
        recipe = repro.arm_recipe(arm, tmp_path / arm.key, steps=None, overrides={})
        assert recipe["trainer"]["max_steps"] == 600  # the same token budget for every arm
        assert recipe["seed_everything"] == 1337
