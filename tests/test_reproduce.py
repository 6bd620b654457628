"""scripts/reproduce_cpu.py: runs train through the CLI per (arm, seed), finished runs are skipped, and the report
gives mean ± SE, paired differences and verdicts by the pass rule."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A tiny model on a 40-file slice of the corpus, so the runs train in seconds.
TINY = [
    "--set=model.n_layer=2",
    "--set=model.n_embd=32",
    "--set=model.n_positions=32",
    "--set=data.block_size=32",
    "--set=data.batch_size=4",
    "--set=data.max_files=40",
    "--set=data.vocab_size=512",
    "--set=data.val_fraction=0.2",
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
def test_seeded_arms_train_report_and_are_skipped_when_rerun(repro, tmp_path, capsys):
    args = [
        "--arms",
        "sm_ln_g,sm,ereg",
        "--seeds",
        "0,1",
        "--jobs",
        "2",
        "--steps",
        "4",
        *TINY,
        "--out",
        str(tmp_path / "runs"),
        "--docs",
        str(tmp_path / "docs"),
    ]
    assert repro.main(args) == 0
    results = json.loads((tmp_path / "docs" / "results.json").read_text())
    runs = {(r["key"], r["seed"]): r for r in results["runs"]}
    # ereg's control sm_t_scfuffn is reported only if it ran: it did not
    assert set(runs) == {(k, s) for k in ("sm_ln_g", "sm", "ereg") for s in (0, 1)}
    for r in runs.values():
        assert r["steps"] == 4
        assert r["tokens"] == 4 * 4 * 32  # steps x batch x block: the same token budget for every run
        assert sum(r["bin_shares"]) == pytest.approx(1.0)
        assert len(r["head_means"]) == 2 and len(r["head_means"][0]) == 4  # [L, H]
        assert 0 < r["val_ppl"] < 512 * 2  # a real validation pass ran (vocab 512)
        assert r["wall_minutes"] > 0
    assert runs[("sm", 0)]["val_ppl"] != runs[("sm", 1)]["val_ppl"]  # the seed changes init and data order
    assert runs[("ereg", 0)]["thresholds"] is not None and runs[("sm", 0)]["thresholds"] is None
    recipe = (tmp_path / "runs" / "sm" / "seed1" / "recipe.yaml").read_text()
    assert "seed_everything: 1338" in recipe
    assert len(results["findings"]) == len(repro.FINDINGS)
    table = (tmp_path / "docs" / "results.md").read_text()
    assert "SM+LN+G (baseline)" in table and "SM (softmax-only)" in table and "| 0,1 |" in table
    for name in ("entropy_bins", "loss_curves", "layer_entropy", "thresholds"):
        assert (tmp_path / "docs" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    trained_log = (tmp_path / "runs" / "sm" / "seed0" / "train.log").read_text()

    capsys.readouterr()
    assert repro.main(args) == 0  # second run: nothing retrains
    out = capsys.readouterr().out
    assert "[sm_ln_g/seed0] finished earlier (4 steps), skipped" in out and "[sm/seed1] finished earlier" in out
    assert (tmp_path / "runs" / "sm" / "seed0" / "train.log").read_text() == trained_log

    # The archive in the docs carries the study to a machine without the runs: nothing retrains, same results.
    assert (tmp_path / "docs" / "runs" / "ereg" / "seed1" / "thresholds.json").is_file()
    moved = [a if a != str(tmp_path / "runs") else str(tmp_path / "elsewhere") for a in args]
    assert repro.main(moved) == 0
    assert capsys.readouterr().out.count("finished earlier") == 6 and not (tmp_path / "elsewhere").exists()
    again = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert sorted(again["runs"], key=lambda r: (r["key"], r["seed"])) == sorted(
        results["runs"], key=lambda r: (r["key"], r["seed"])
    )


def test_pass_rule(repro):
    assert repro.pass_rule([1.0, 1.2, 0.9]) == 1
    assert repro.pass_rule([-1.0, -1.2, -0.9]) == -1
    assert repro.pass_rule([1.0, -0.1, 2.0]) == 0  # signs differ
    assert repro.pass_rule([0.1, 5.0, 0.2]) == 0  # same sign but |mean| <= 2 SE
    assert repro.pass_rule([3.0]) == 0  # one seed shows nothing
    assert repro.pass_rule([0.0, 1.0, 1.0]) == 0


def _run(repro, key, seed, ppl, leaves=100, collapsed=False):
    return repro.RunResult(
        key=key, seed=seed, steps=10, tokens=10, val_loss=1.0, val_ppl=ppl, diverged=False, wall_minutes=1.0,
        tokens_per_sec=1.0, bin_shares=[0, 0, 0, 1], top_bin=1.0, layer_means=[1.0], head_means=[[1.0]],
        entropy_max=3.0, collapsed_layers=int(collapsed), collapsed=float(collapsed),
        collapse_step=60 if collapsed else None, leaves_uniform_step=leaves, thresholds=None,
    )  # fmt: skip


def test_verdicts_follow_the_pass_rule_and_uniform_attention_is_untested(repro):
    finding = next(f for f in repro.FINDINGS if f.arm == "ereg")
    control = {("sm_t_scfuffn", s): _run(repro, "sm_t_scfuffn", s, 100.0 + s) for s in range(3)}
    better = {("ereg", s): _run(repro, "ereg", s, 95.0 + s) for s in range(3)}
    text, comparison = repro.verdict(finding, {**control, **better})
    assert text == "reproduces" and comparison.differences == pytest.approx([-5.0, -5 / 1.01, -5 / 1.02])
    worse = {("ereg", s): _run(repro, "ereg", s, 110.0 + s) for s in range(3)}
    assert repro.verdict(finding, {**control, **worse})[0] == "opposite"
    mixed = {("ereg", s): _run(repro, "ereg", s, p) for s, p in enumerate((99.0, 103.0, 102.5))}
    assert repro.verdict(finding, {**control, **mixed})[0].startswith("does not reproduce")
    uniform = {("ereg", s): _run(repro, "ereg", s, 90.0, leaves=None) for s in range(3)}
    assert repro.verdict(finding, {**control, **uniform})[0] == "untested (attention never left uniform)"
    one = {("ereg", 0): better[("ereg", 0)]}
    assert repro.verdict(finding, {**control, **one})[0] == "untested (1 paired seed(s))"
    diverged = {("ereg", s): _run(repro, "ereg", s, None if s else 95.0, collapsed=bool(s)) for s in range(3)}
    text = repro.verdict(finding, {**control, **diverged})[0]
    assert text == "untested (no finite val_ppl in 2 of 3 pairs: a run diverged)"


def test_prevention_claims_need_a_control_that_collapses(repro):
    finding = next(f for f in repro.FINDINGS if f.arm == "sm_scfuffn_hi" and f.metric == "collapsed")
    collapsing = {("sm_hi", s): _run(repro, "sm_hi", s, None, leaves=None, collapsed=True) for s in range(2)}
    stable = {("sm_scfuffn_hi", s): _run(repro, "sm_scfuffn_hi", s, 40.0) for s in range(2)}
    text, comparison = repro.verdict(finding, {**collapsing, **stable})
    assert text == "reproduces" and comparison.differences == [-1.0, -1.0]
    both_collapse = {("sm_scfuffn_hi", s): _run(repro, "sm_scfuffn_hi", s, None, collapsed=True) for s in range(2)}
    assert repro.verdict(finding, {**collapsing, **both_collapse})[0].startswith("does not reproduce")
    neither = {("sm_hi", s): _run(repro, "sm_hi", s, 45.0) for s in range(2)}
    assert repro.verdict(finding, {**neither, **stable})[0] == "untested (the control did not collapse)"
    # the collapse claim itself: a run that collapsed counts as having left uniform, even with no finite entropy
    collapse_claim = next(f for f in repro.FINDINGS if f.number == 3 and f.arm == "sm_hi")
    baseline = {("sm_ln_g_hi", s): _run(repro, "sm_ln_g_hi", s, 30.0) for s in range(2)}
    assert repro.verdict(collapse_claim, {**collapsing, **baseline})[0] == "reproduces"


def test_collapse_step_is_the_first_collapsed_layer_or_non_finite_loss(repro):
    uniform, sharp = np.full((4, 2), 3.5), np.full((4, 2), 3.5)
    sharp[2:] = 0.01  # both deep layers collapsed
    heads = [(0, uniform), (25, uniform), (50, sharp), (75, sharp)]
    finite_losses = ([0, 25, 50, 75], [7.0, 6.0, 5.0, 5.0])
    assert repro._collapse_step(heads, finite_losses, 128) == 50
    assert repro._collapse_step(heads[:2], finite_losses, 128) is None
    assert repro._collapse_step(heads[:2], ([0, 25, 50], [7.0, float("nan"), float("nan")]), 128) == 25
    nan_heads = [(0, uniform), (25, np.full((4, 2), np.nan))]
    assert repro._collapse_step(nan_heads, finite_losses, 128) == 25


def test_splice_page_replaces_only_between_markers(repro, tmp_path):
    page = tmp_path / "reproduction.md"
    page.write_text("intro\n<!-- study:arms -->\nold arms\n<!-- /study:arms -->\nmiddle\n"
                    "<!-- study:findings -->\nold\n<!-- /study:findings -->\nend\n")  # fmt: skip
    assert repro.splice_page(page, {"arms": "| new arms |\n", "findings": "| new findings |"})
    assert page.read_text() == (
        "intro\n<!-- study:arms -->\n| new arms |\n<!-- /study:arms -->\nmiddle\n"
        "<!-- study:findings -->\n| new findings |\n<!-- /study:findings -->\nend\n"
    )
    before = page.read_text()
    assert not repro.splice_page(page, {"arms": "x", "verdicts": "y"}) and page.read_text() == before


def test_unknown_arm_and_bad_seeds_are_rejected_before_anything_runs(repro, tmp_path, capsys):
    with pytest.raises(SystemExit):
        repro.main(["--arms", "sm,sm_gelu", "--out", str(tmp_path / "runs")])
    assert "unknown arm(s) ['sm_gelu']" in capsys.readouterr().err
    for seeds in ("0,0", "-1", "a,b", ""):
        with pytest.raises(SystemExit):
            repro.main(["--seeds", seeds, "--out", str(tmp_path / "runs")])
        assert "--seeds must be distinct integers >= 0" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_bad_override_steps_and_jobs_are_rejected(repro, tmp_path, capsys):
    with pytest.raises(SystemExit):
        repro.main(["--set", "trainer", "--out", str(tmp_path / "runs")])
    assert "must be KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        repro.main(["--set", "nosuch.max_steps=3", "--out", str(tmp_path / "runs")])
    assert "'nosuch' is not a section" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        repro.main(["--steps", "0", "--out", str(tmp_path / "runs")])
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        repro.main(["--jobs", "0", "--out", str(tmp_path / "runs")])
    assert "--jobs must be >= 1, got 0" in capsys.readouterr().err


def test_every_arm_has_a_recipe_in_the_regime_with_its_seed(repro, tmp_path):
    for arm in repro.ARMS:
        recipe = repro.run_recipe(arm, 2, tmp_path / arm.key, steps=None, overrides={})
        assert recipe["trainer"]["max_steps"] == 1500  # the same token budget for every arm
        assert recipe["data"]["batch_size"] * recipe["data"]["block_size"] == 32 * 128
        assert recipe["model"]["n_layer"] == 6 and recipe["data"]["vocab_size"] == 2048
        assert recipe["seed_everything"] == 1339 and recipe["data"]["seed"] == 2
        regs = [c for c in recipe["trainer"]["callbacks"] if c["class_path"].endswith("EntropyRegularization")]
        assert bool(regs) == (arm.recipe == "ereg_sm_t_scfuffn")
        if arm.regularization is not None:
            assert regs[0]["init_args"] == arm.regularization
        assert arm.control is None or arm.control in repro.ARMS_BY_KEY
    for finding in repro.FINDINGS:
        assert finding.arm in repro.ARMS_BY_KEY and finding.control in repro.ARMS_BY_KEY


def test_library_defaults_are_the_studied_setting_and_the_earlier_default_is_pinned(repro):
    """EntropyRegularization() is exactly arm ``ereg_weak`` (the setting the study did not find worse), and the
    arms that test other settings spell out every option the defaults would otherwise fill in."""
    import inspect

    from entropic import EntropyRegularization

    defaults = {
        name: p.default
        for name, p in inspect.signature(EntropyRegularization.__init__).parameters.items()
        if name
        in ("loss_coeff", "tolerance", "reduction", "threshold_init", "start_when_entropy_below", "warmup_steps")
    }
    assert repro.ARMS_BY_KEY["ereg_weak"].regularization == defaults
    for key in ("ereg_before", "ereg_paper_lambda", "ereg_per_query", "ereg_frozen_theta"):
        settings = repro.ARMS_BY_KEY[key].regularization
        assert settings["threshold_init"] == 0.35
        assert {"start_when_entropy_below", "warmup_steps"} <= settings.keys()
    assert repro.ARMS_BY_KEY["ereg_before"].regularization["start_when_entropy_below"] is None


def test_wall_time_is_kept_while_a_run_trains_and_adds_up_over_resumes(repro, tmp_path, monkeypatch):
    """A run stopped from outside (a session's end kills the study) keeps the time it trained, up to one flush."""
    monkeypatch.setattr(repro, "WALL_TIME_FLUSH_SECONDS", 0.05)
    wall = tmp_path / "wall_time.json"
    # the child reads the wall time recorded while it is still running
    child = f"import time; time.sleep(0.6); print('seen', open({str(wall)!r}).read())"
    code, seconds = repro.run_timed([sys.executable, "-c", child], tmp_path, env={})
    assert code == 0 and seconds >= 0.6
    seen = json.loads((tmp_path / "train.log").read_text().split("seen", 1)[1])
    assert 0.3 < seen["seconds"] < seconds
    first = json.loads(wall.read_text())["seconds"]
    assert first == pytest.approx(seconds, abs=0.01)
    code, more = repro.run_timed([sys.executable, "-c", "raise SystemExit(3)"], tmp_path, env={})
    assert code == 3
    assert json.loads(wall.read_text())["seconds"] == pytest.approx(first + more, abs=0.01)
