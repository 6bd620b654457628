"""The `entropic` command end to end on the debug recipe: training, checkpoints, logs, report, resume, bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

from entropic.cli import main
from entropic.report import read_run_metrics

REPO = Path(__file__).resolve().parent.parent
DEBUG = REPO / "recipes" / "debug.yaml"
ENTROPIC = [sys.executable, "-m", "entropic.cli"]

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _fit(root: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [*ENTROPIC, "fit", "--config", str(DEBUG), f"--trainer.default_root_dir={root}", *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _global_step(checkpoint: Path) -> int:
    return int(torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"])


def test_debug_recipe_trains_and_writes_checkpoint_logs_and_report(tmp_path):
    root = tmp_path / "run"
    result = _fit(root, "--throughput.window_size=2")  # Lightning's throughput needs a full window to log
    last = root / "checkpoints" / "last.ckpt"
    assert last.is_file() and _global_step(last) == 8
    rows = read_run_metrics(root)
    keys = set().union(*(r.keys() for r in rows))
    assert {"train/loss", "val/loss", "val/ppl", "train/entropy_penalty", "train/device/items_per_sec"} <= keys
    assert "entropy/layer_0/head_0" in keys and "entropy/layer_1/head_1" in keys
    throughput = [r for r in rows if r.get("train/device/items_per_sec") not in (None, "")]  # tokens/s of one rank
    assert throughput and all(float(r["train/device/items_per_sec"]) > 0 for r in throughput)
    assert all(float(r["train/device/flops_per_sec"]) > 0 for r in throughput)
    assert {f"entropy/bin_{k}_share" for k in range(4)} <= keys
    ppl = [float(r["val/ppl"]) for r in rows if r.get("val/ppl")]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert ppl and ppl[-1] == pytest.approx(torch.tensor(val[-1]).exp().item(), rel=1e-4)
    report = (root / "report.md").read_text()
    assert "SM(t)+ScFuFFN" in report and "| no |" in report  # the architecture, and it did not diverge
    assert "Report written" in result.stdout
    assert list(root.rglob("*.png")), "the entropy monitor wrote no figure"
    _check_model_directory(root / "model", last)


def _check_model_directory(model_dir: Path, checkpoint: Path) -> None:
    """The run's model directory loads with the Auto classes, generates, and holds the checkpoint's weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import entropic.models  # noqa: F401  (registers model_type "entropic" with the Auto classes)

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    torch.testing.assert_close(model.lm_head.weight, state["model.lm_head.weight"])
    assert model.config.eos_token_id == tokenizer.eos_token_id is not None
    prompt = tokenizer("def main(", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1] and isinstance(tokenizer.decode(out[0]), str)


def test_export_writes_the_model_directory_of_an_earlier_run(tmp_path, capsys):
    root = tmp_path / "run"
    _fit(root, "--trainer.max_steps=2")
    (root / "model").rename(tmp_path / "first")  # as if the run predated model directories
    assert main(["export", str(root)]) == 0
    assert "model and tokenizer written to" in capsys.readouterr().out
    _check_model_directory(root / "model", root / "checkpoints" / "last.ckpt")
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "nothing")])
    assert "no checkpoint at" in capsys.readouterr().err
    # The encrypted-inference harness runs the model directory as it is.
    bench = [sys.executable, "-m", "pi_eval", "bench", "--checkpoint", str(root / "model"), "--seq-len", "8"]
    result = subprocess.run(
        [*bench, "--threads", "1", "--out", str(tmp_path / "pi")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "pi" / "report.json").read_text())
    assert report["top1_agreement"] == 1.0 and report["max_abs_logit_error"] < 1e-3


def test_killed_run_resumes_from_last_checkpoint_without_losing_metrics(tmp_path):
    root = tmp_path / "run"
    cmd = [
        *ENTROPIC,
        "fit",
        "--config",
        str(DEBUG),
        f"--trainer.default_root_dir={root}",
        "--trainer.max_steps=400",
        "--checkpoint.every_n_train_steps=3",
    ]
    last = root / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=REPO)
    try:
        deadline = time.monotonic() + 240
        while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # let the checkpoint file be complete: it is written atomically, but be safe about the rename
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert last.is_file(), "no checkpoint was written before the deadline"
    killed_at = _global_step(last)
    assert 0 < killed_at < 400

    _fit(root, "--trainer.max_steps=12", "--ckpt_path=last", "--checkpoint.every_n_train_steps=3")
    assert _global_step(last) == 12
    rows = read_run_metrics(root)
    steps = sorted({int(float(r["step"])) for r in rows if r.get("train/loss")})
    # Steps logged before the kill are kept, and the resumed launch continues to the end.
    assert steps[0] < killed_at and steps[-1] >= 10
    assert len(list((root / "logs").glob("version_*"))) == 2
    with (root / "report.md").open() as handle:
        assert "12" in handle.read()


def _refused(capsys, *args: str) -> str:
    """Runs the CLI in process and returns its one-line error (exit status 2, no traceback)."""
    with mock.patch.object(sys, "argv", ["entropic"]):
        assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("entropic: error: ")]
    return line


def test_unknown_architecture_is_refused_before_training(tmp_path, capsys):
    line = _refused(
        capsys, "fit", "--config", str(DEBUG), f"--trainer.default_root_dir={tmp_path}", "--model.arch=SM+XYZ"
    )
    assert re.search(r"unknown preset 'SM\+XYZ'.*SM\+LN\+G", line)
    assert not (tmp_path / "checkpoints").exists()


def test_empty_data_folder_is_refused_before_training(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _refused(
        capsys, "fit", "--config", str(DEBUG), f"--trainer.default_root_dir={tmp_path}", f"--data.source={empty}"
    )
    assert "empty" in line
    assert not (tmp_path / "checkpoints").exists()


def test_missing_data_path_is_one_clear_line(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    line = _refused(
        capsys, "fit", "--config", str(DEBUG), f"--trainer.default_root_dir={tmp_path}", f"--data.source={missing}"
    )
    assert str(missing) in line and "does not exist" in line


def test_block_size_above_the_model_context_is_refused(tmp_path, capsys):
    line = _refused(
        capsys, "fit", "--config", str(DEBUG), f"--trainer.default_root_dir={tmp_path}", "--data.block_size=64"
    )
    assert "block_size=64 is above the model's context" in line


def test_report_command_compares_runs_side_by_side(tmp_path, capsys):
    for name, loss in (("a", 2.0), ("b", float("nan"))):
        log_dir = tmp_path / name / "logs" / "version_0"
        log_dir.mkdir(parents=True)
        with (log_dir / "metrics.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["step", "train/loss", "val/loss", "val/ppl"])
            writer.writeheader()
            writer.writerow(
                {"step": 9, "train/loss": loss, "val/loss": loss, "val/ppl": torch.tensor(loss).exp().item()}
            )
        (log_dir / "hparams.yaml").write_text(f"arch: arch-{name}\n")
    main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path)])
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("| a ") or line.startswith("| b ")]
    assert "arch-a" in lines[0] and "7.389" in lines[0] and "| no |" in lines[0]
    assert "arch-b" in lines[1] and "| yes |" in lines[1]
    assert (tmp_path / "report.json").is_file()


@pytest.mark.parametrize("logger", ["false", "tensorboard"])
def test_report_comes_from_the_runs_state_with_any_logger_or_none(tmp_path, logger):
    root = tmp_path / "run"
    if logger == "tensorboard":
        options = [
            "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
            f"--trainer.logger.save_dir={tmp_path / 'tb'}",
        ]
    else:
        options = ["--trainer.logger=false"]
    result = _fit(root, "--trainer.max_steps=4", *options)
    assert not list(root.rglob("metrics.csv"))  # no CSV logger ran
    summary = json.loads((root / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["arch"] == "SM(t)+ScFuFFN" and summary["diverged"] is False
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-4)
    assert sum(summary["bin_shares"]) == pytest.approx(1.0) and summary["tokens_per_sec"] > 0
    assert "SM(t)+ScFuFFN" in (root / "report.md").read_text() and "Report written" in result.stdout
    if logger == "tensorboard":
        assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


def test_progress_bar_names_the_step_budget_not_a_negative_epoch():
    from types import SimpleNamespace

    from entropic.cli import StepProgressBar

    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=400)
    assert bar._get_train_description(0).strip() == "Epoch 0, step budget 400"
    bar._trainer = SimpleNamespace(max_epochs=3, max_steps=-1)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"


def test_help_names_every_command(capsys):
    with pytest.raises(SystemExit), mock.patch.object(sys, "argv", ["entropic", "--help"]):
        main()
    out = capsys.readouterr().out
    assert "entropic report" in out and "entropic export" in out and "fit" in out
