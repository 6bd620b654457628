"""AttentionEntropyMonitor and EntropyRegularization on a LightningModule written the way users write one.

The module wraps a tiny Hugging Face GPT-2 with its default (sdpa) attention, returns ``model(**batch).loss`` and
optimizes ``self.parameters()``. The reference penalty is computed independently, from the probabilities of an
eager copy of the same weights (``output_attentions=True``), with the paper's Algorithm 1 written out here.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import textwrap
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from transformers import GPT2Config, GPT2LMHeadModel

from entropic.callbacks import AttentionEntropyMonitor, EntropyRegularization
from entropic.functional import DEFAULT_THRESHOLD
from entropic.regularizer import EntropyPenalty, entropy_penalty_from_model, prepare_model

VOCAB, T, B = 64, 16, 4
CONFIG = GPT2Config(
    n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
)  # fmt: skip
THETA = torch.tensor([[0.15, 0.35], [0.55, 0.8]])  # thresholds both below and above the heads' entropies


class UserLM(pl.LightningModule):
    def __init__(self, state_dict: dict[str, torch.Tensor], lr: float = 0.0) -> None:
        super().__init__()
        self.model = GPT2LMHeadModel(copy.deepcopy(CONFIG))
        self.model.load_state_dict(state_dict)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def validation_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class GradProbe(Callback):
    """Keeps the (unscaled, accumulated) gradients seen just before each optimizer step, and each step's loss."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.losses: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        for callback in trainer.callbacks:  # θ of a foreign model is the callback's, not the module's
            if isinstance(callback, EntropyRegularization) and callback.thresholds.grad is not None:
                grads["entropy_thresholds"] = callback.thresholds.grad.detach().clone()
        self.grads.append(grads)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    name = "memory"
    version = 0

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def initial_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(copy.deepcopy(CONFIG)).state_dict()


def make_batches(n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (B, T), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def loader(batches):
    return torch.utils.data.DataLoader(batches, batch_size=None)


def trainer(tmp_path, callbacks=(), **kwargs):
    options = dict(
        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=tmp_path, log_every_n_steps=1,
    )  # fmt: skip
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)


def reference_penalty(probs: tuple[torch.Tensor, ...], theta: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Algorithm 1 from eager attention probabilities [B, H, T, T] per layer, written out independently."""
    e_max = math.log(probs[0].shape[-1])
    layer_terms = []
    for layer, p in enumerate(probs):
        p = p.float()
        plogp = p * torch.log(p.clamp_min(1e-30))  # 0·log(tiny) = 0, and finite gradients at p = 0
        head_entropy = (-plogp.sum(-1)).mean(dim=(0, 2))  # [H]
        dev = head_entropy - theta[layer] * e_max
        layer_terms.append(torch.where(dev.abs() > tolerance * e_max, dev**2, torch.zeros_like(dev)).mean())
    return torch.stack(layer_terms).mean()


def reference_grads(weights, batches, theta, tolerance, coeff, autocast_dtype=None):
    """Gradients of mean over micro-batches of (CE + coeff · penalty), on an eager copy of the same weights."""
    model = GPT2LMHeadModel._from_config(copy.deepcopy(CONFIG), attn_implementation="eager")
    model.load_state_dict(weights)
    theta = theta.clone().requires_grad_(True)
    for batch in batches:
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            out = model(**batch, output_attentions=True)
            loss = out.loss + coeff * reference_penalty(out.attentions, theta, tolerance)
        (loss / len(batches)).backward()
    grads = {f"model.{n}": p.grad for n, p in model.named_parameters()}
    grads["entropy_thresholds"] = theta.grad
    return grads


def run_step(tmp_path, weights, batches, callbacks=(), **kwargs):
    probe = GradProbe()
    module = UserLM(weights)
    trainer(tmp_path, [*callbacks, probe], **kwargs).fit(module, loader(batches))
    return probe.grads[0], module


def assert_grad_delta(with_cb, without_cb, expected_delta, atol, rtol=0.0):
    for name, grad in without_cb.items():
        delta = with_cb[name] - grad
        torch.testing.assert_close(delta, expected_delta[name], atol=atol, rtol=rtol, msg=f"gradient of {name}")


@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradients_change_by_exactly_lambda_grad_penalty(tmp_path, accumulate):
    weights, batches = initial_weights(), make_batches(accumulate)
    coeff, tol = 5.0, 0.1
    plain, _ = run_step(tmp_path, weights, batches, accumulate_grad_batches=accumulate)
    reg = EntropyRegularization(
        loss_coeff=coeff, tolerance=tol, threshold_init=THETA, start_when_entropy_below=None, warmup_steps=0
    )
    regularized, module = run_step(
        tmp_path, weights, batches, [AttentionEntropyMonitor(), reg], accumulate_grad_batches=accumulate
    )
    assert module.model.config._attn_implementation == "entropic"
    with_pen = reference_grads(weights, batches, THETA, tol, coeff)
    without_pen = reference_grads(weights, batches, THETA, tol, 0.0)
    delta = {n: with_pen[n] - without_pen[n] for n in with_pen}
    assert delta["model.transformer.h.0.attn.c_attn.weight"].abs().max() > 1e-4  # the term is not negligible
    assert_grad_delta(regularized, plain, delta, atol=1e-6)
    torch.testing.assert_close(regularized["entropy_thresholds"], with_pen["entropy_thresholds"], atol=1e-7, rtol=1e-5)


def same_path_grads(weights, batch, theta, tol, coeff, dtype, loss_scale=1.0):
    """Plain-PyTorch autocast step on the entropic attention: CE + coeff · penalty via entropic.regularizer,
    back-propagated as ``loss_scale · loss`` and unscaled afterwards (what a GradScaler does)."""
    model = GPT2LMHeadModel(copy.deepcopy(CONFIG))
    model.load_state_dict(weights)
    prepare_model(model)
    theta = theta.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        loss = model(**batch).loss + coeff * entropy_penalty_from_model(model, theta, tolerance=tol)
    (loss * loss_scale).backward()
    grads = {f"model.{n}": p.grad / loss_scale for n, p in model.named_parameters()}
    grads["entropy_thresholds"] = theta.grad / loss_scale
    return grads


def low_precision_case(tmp_path, dtype, loss_scale=1.0, **trainer_kwargs):
    """Gradient change from λ under autocast.

    Baseline: the same callback with λ = 0, because the no-callback run (sdpa) and the callback run (entropic
    attention) differ by low-precision rounding of the attention path, which at this size is as large as the term.
    Expected change: the same step written in plain PyTorch under autocast, so the Lightning mechanism adds exactly
    λ·∇penalty (no unscaled term under a GradScaler, no lost autocast). The agreement of that penalty with the
    independent eager reference is established in fp32 above; under autocast the eager probabilities are rounded
    to bf16/fp16 before the entropy is taken, which changes its gradient by tens of percent at this size.
    """
    weights, (batch,) = initial_weights(), make_batches(1)
    coeff, tol = 5.0, 0.1
    runs = []
    for lam in (0.0, coeff):
        reg = EntropyRegularization(
            loss_coeff=lam, tolerance=tol, threshold_init=THETA, start_when_entropy_below=None, warmup_steps=0
        )
        runs.append(run_step(tmp_path, weights, [batch], [reg], **trainer_kwargs)[0])
    baseline, regularized = runs
    plain_with = same_path_grads(weights, batch, THETA, tol, coeff, dtype, loss_scale)
    plain_without = same_path_grads(weights, batch, THETA, tol, 0.0, dtype, loss_scale)
    for name, grad in baseline.items():
        got = regularized[name] - grad
        want = plain_with[name] - plain_without[name]
        # Parameters after the last attention (last MLP, ln_f) get no penalty gradient: both sides are then 0.
        assert (got - want).norm() <= 0.01 * want.norm() + 1e-9, (
            f"{name}: {(got - want).norm():.3g} vs {want.norm():.3g}"
        )


def test_bf16_mixed(tmp_path):
    low_precision_case(tmp_path, torch.bfloat16, precision="bf16-mixed")


def test_fp16_grad_scaler_scales_the_penalty_too(tmp_path):
    """`precision="16-mixed"` on CPU is turned into bf16-mixed by Lightning 2.6 (with a warning), so the fp16
    GradScaler path is exercised with the same MixedPrecision plugin built explicitly, scaler included (torch
    runs fp16 autocast on CPU). The probe sees unscaled gradients: a term added outside the scaled loss would come
    out divided by the scale (1024)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    low_precision_case(tmp_path, torch.float16, loss_scale=2.0**10, plugins=[plugin])


def test_logs_keys_and_monitor_means(tmp_path):
    weights, batches = initial_weights(), make_batches(2)
    logger = MemoryLogger()
    monitor = AttentionEntropyMonitor(write_figures=False)
    reg = EntropyRegularization(loss_coeff=0.1, threshold_init=THETA, start_when_entropy_below=None, warmup_steps=0)
    trainer(tmp_path, [monitor, reg], max_steps=2, logger=logger, log_every_n_steps=2).fit(
        UserLM(weights), loader(batches)
    )
    keys = set().union(*(m.keys() for _, m in logger.records))
    for key in ("entropy/layer_0/head_1", "entropy/layer_1/mean", "entropy/mean", "train/entropy_penalty"):
        assert key in keys
    assert {f"entropy/bin_{k}_share" for k in range(4)} <= keys
    logged = [m for _, m in logger.records if "entropy/layer_0/head_0" in m]
    assert len(logged) == 1  # one window of two batches at log_every_n_steps=2
    assert sum(logged[0][f"entropy/bin_{k}_share"] for k in range(4)) == pytest.approx(1.0)
    # Mean over both batches of the eager entropies, with the weights each batch saw (lr=0: unchanged).
    eager = GPT2LMHeadModel._from_config(copy.deepcopy(CONFIG), attn_implementation="eager")
    eager.load_state_dict(weights)
    with torch.no_grad():
        ents = [
            torch.stack([-(p * p.clamp_min(1e-30).log()).sum(-1).mean(dim=(0, 2)) for p in eager(**b, output_attentions=True).attentions])
            for b in batches
        ]  # fmt: skip
    expected = torch.stack(ents).mean(0)
    for layer in range(2):
        for head in range(2):
            assert logged[0][f"entropy/layer_{layer}/head_{head}"] == pytest.approx(
                float(expected[layer, head]), abs=1e-5
            )


class LoggingLM(UserLM):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss)
        return loss


def test_monitor_logs_on_lightnings_steps_with_accumulation(tmp_path):
    """The monitor's cadence (read from trainer.global_step) matches the steps Lightning logs its own metrics at,
    never logs mid-accumulation, and each logged mean covers every batch of its window."""
    weights, batches = initial_weights(), make_batches(8)
    logger, monitor = MemoryLogger(), AttentionEntropyMonitor(write_figures=False)
    trainer(tmp_path, [monitor], max_steps=4, logger=logger, log_every_n_steps=2, accumulate_grad_batches=2).fit(
        LoggingLM(weights), loader(batches)
    )
    entropy_steps = [step for step, m in logger.records if "entropy/mean" in m]
    loss_steps = [step for step, m in logger.records if "train/loss" in m]
    assert entropy_steps == loss_steps == [1, 3]
    assert [h["step"] for h in monitor.history] == [1, 3]
    eager = GPT2LMHeadModel._from_config(copy.deepcopy(CONFIG), attn_implementation="eager")
    eager.load_state_dict(weights)
    with torch.no_grad():
        per_batch = [
            torch.stack([-(p * p.clamp_min(1e-30).log()).sum(-1).mean() for p in eager(**b, output_attentions=True).attentions]).mean()
            for b in batches
        ]  # fmt: skip
    for window, (_, metrics) in enumerate(r for r in logger.records if "entropy/mean" in r[1]):
        expected = torch.stack(per_batch[4 * window : 4 * window + 4]).mean()
        assert metrics["entropy/mean"] == pytest.approx(float(expected), abs=1e-5)


def test_resume_gives_same_thresholds_and_next_loss(tmp_path):
    weights, batches = initial_weights(), make_batches(2)

    def callbacks():
        reg = EntropyRegularization(
            loss_coeff=0.5,
            tolerance=0.0,
            threshold_init=THETA,
            start_step=1,
            warmup_steps=3,
            start_when_entropy_below=None,
        )
        return [AttentionEntropyMonitor(write_figures=False), reg]

    full_probe, full = GradProbe(), UserLM(weights, lr=0.5)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    full_cbs = callbacks()
    full_reg = full_cbs[1]
    trainer(tmp_path, [*full_cbs, full_probe, ckpt], max_steps=4, enable_checkpointing=True).fit(full, loader(batches))
    path = next((tmp_path / "ckpt").glob("*step=2.ckpt"))
    saved = torch.load(path, weights_only=False)
    assert not any("threshold" in key for key in saved["state_dict"])  # the module's state is the user's own
    (reg_state,) = [v for k, v in saved["callbacks"].items() if k.startswith("EntropyRegularization")]
    assert not torch.equal(reg_state["thresholds"], THETA)  # θ is the callback's, and it was trained
    UserLM.load_from_checkpoint(path, state_dict=weights)  # strict: no unexpected key

    resumed_probe, resumed = GradProbe(), UserLM(weights, lr=0.5)
    resumed_cbs = callbacks()
    trainer(tmp_path / "r", [*resumed_cbs, resumed_probe], max_steps=4).fit(resumed, loader(batches), ckpt_path=path)
    assert resumed_probe.losses[0] == pytest.approx(full_probe.losses[2], rel=1e-6, abs=1e-7)
    assert resumed_cbs[1].last_coeff == pytest.approx(0.5)  # warm-up position restored (step 4 > start + warmup)
    torch.testing.assert_close(resumed_cbs[1].thresholds, full_reg.thresholds, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        resumed_probe.grads[-1]["entropy_thresholds"], full_probe.grads[-1]["entropy_thresholds"]
    )
    assert len(resumed_cbs[0].history) == len(full_probe.losses)  # monitor history came back with the checkpoint


def test_figures_are_valid_pngs(tmp_path):
    import matplotlib.image

    weights, batches = initial_weights(), make_batches(2)
    monitor = AttentionEntropyMonitor(figure_dir=tmp_path / "figs")
    trainer(tmp_path, [monitor], max_steps=2, val_check_interval=1, limit_val_batches=1).fit(
        UserLM(weights), loader(batches), loader(batches[:1])
    )
    assert monitor.figure_paths, "no figure written"
    names = {p.name.split("_step")[0] for p in monitor.figure_paths}
    assert names == {"entropy_heatmap", "entropy_layers", "entropy_bins"}
    for path in monitor.figure_paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


def collapsing_weights(weights: dict[str, torch.Tensor], factor: float = 300.0) -> dict[str, torch.Tensor]:
    """Scales the query and key projections of the deep layer so its attention becomes one-hot."""
    weights = {k: v.clone() for k, v in weights.items()}
    d = CONFIG.n_embd
    weights["transformer.h.1.attn.c_attn.weight"][:, : 2 * d] *= factor
    return weights


@pytest.mark.parametrize("collapse", [False, True])
def test_collapse_detector(tmp_path, collapse):
    weights = initial_weights()
    weights = collapsing_weights(weights) if collapse else weights
    monitor = AttentionEntropyMonitor(on_collapse="stop", detect_from_step=0, write_figures=False, on_overload="ignore")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = trainer(tmp_path, [monitor], max_steps=4)
        fit.fit(UserLM(weights), loader(make_batches(4)))
    messages = [str(w.message) for w in caught if "AttentionEntropyMonitor" in str(w.message)]
    if collapse:
        assert fit.global_step == 1 and fit.should_stop
        assert "entropy collapse" in monitor.stop_reason and any("collapse" in m for m in messages)
    else:
        assert fit.global_step == 4 and monitor.stop_reason is None and not messages


def test_nan_entropy_is_collapse_and_warns():
    import numpy as np

    monitor = AttentionEntropyMonitor()
    findings = monitor.diagnose(np.array([[1.0, float("nan")], [1.0, 1.0]]), step=0)
    assert "non-finite" in findings["collapse"]
    assert monitor.diagnose(np.array([[1.0, 1.1], [0.9, 1.0]]), step=0) == {"collapse": None, "overload": None}


def test_param_group_and_fixed_thresholds(tmp_path):
    weights, batches = initial_weights(), make_batches(1)

    class ModelOnlyOptimizer(UserLM):
        def configure_optimizers(self):
            return torch.optim.SGD(self.model.parameters(), lr=0.0)

    reg = EntropyRegularization(
        loss_coeff=1.0,
        tolerance=0.0,
        threshold_init=THETA,
        param_group={"lr": 0.5},
        start_when_entropy_below=None,
        warmup_steps=0,
    )
    module = ModelOnlyOptimizer(weights)
    trainer(tmp_path, [reg]).fit(module, loader(batches))
    assert not torch.equal(reg.thresholds.detach(), THETA)  # trained through the group the callback added
    assert "training_step" not in module.__dict__  # unwrapped at teardown
    assert not any("threshold" in name for name, _ in module.named_parameters())

    fixed = EntropyRegularization(
        loss_coeff=1.0,
        tolerance=0.0,
        threshold_init=THETA,
        learnable_thresholds=False,
        start_when_entropy_below=None,
        warmup_steps=0,
    )
    module = UserLM(weights, lr=0.5)
    trainer(tmp_path, [fixed]).fit(module, loader(batches))
    assert not fixed.thresholds.requires_grad
    assert torch.equal(fixed.thresholds, THETA) and fixed.last_penalty > 0


def test_invalid_arguments_are_named():
    with pytest.raises(MisconfigurationException, match="tolerance"):
        EntropyRegularization(tolerance=1.5)
    with pytest.raises(MisconfigurationException, match="reduction"):
        EntropyRegularization(reduction="mean")
    with pytest.raises(MisconfigurationException, match=r"start_step .* start_fraction"):
        EntropyRegularization(start_step=3, start_fraction=0.1)
    with pytest.raises(MisconfigurationException, match="loss_coeff"):
        EntropyRegularization(loss_coeff=-1.0)
    with pytest.raises(MisconfigurationException, match="on_collapse"):
        AttentionEntropyMonitor(on_collapse="explode")


def test_plain_pytorch_path_matches_reference():
    weights, (batch,) = initial_weights(), make_batches(1)
    model = GPT2LMHeadModel(copy.deepcopy(CONFIG))
    model.load_state_dict(weights)
    with pytest.raises(RuntimeError, match="prepare_model"):
        model(**batch)
        entropy_penalty_from_model(model, THETA)
    assert prepare_model(model) and not prepare_model(model)
    penalty = EntropyPenalty.for_model(model, init=THETA, tolerance=0.1)
    model(**batch)
    eager = GPT2LMHeadModel._from_config(copy.deepcopy(CONFIG), attn_implementation="eager")
    eager.load_state_dict(weights)
    expected = reference_penalty(eager(**batch, output_attentions=True).attentions, THETA, 0.1)
    torch.testing.assert_close(penalty(model), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    """2 gloo processes (strategy="ddp", re-launched script): gradients and logged entropies cover both ranks."""
    weights = initial_weights()
    torch.save(weights, tmp_path / "weights.pt")
    rows = make_batches(1)[0]["input_ids"]  # 4 sequences: rank 0 gets rows 0, 2 and rank 1 rows 1, 3
    torch.save(rows, tmp_path / "rows.pt")
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(_DDP_WORKER))
    env_python = sys.executable
    proc = subprocess.run(
        [env_python, str(script), str(tmp_path)], capture_output=True, text=True, timeout=240, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt", weights_only=False)

    coeff, tol = 0.5, 0.1
    rank_batches = [{"input_ids": rows[r::2], "labels": rows[r::2]} for r in range(2)]
    expected = reference_grads(weights, rank_batches, THETA, tol, coeff)  # mean over ranks = DDP's average
    for name, grad in result["grads"].items():
        torch.testing.assert_close(grad, expected[name], atol=2e-6, rtol=1e-5, msg=f"gradient of {name}")
    eager = GPT2LMHeadModel._from_config(copy.deepcopy(CONFIG), attn_implementation="eager")
    eager.load_state_dict(weights)
    with torch.no_grad():
        probs = eager(input_ids=rows, output_attentions=True).attentions
    for layer, p in enumerate(probs):
        head_mean = -(p * p.clamp_min(1e-30).log()).sum(-1).mean(dim=(0, 2))
        for head in range(2):
            got = result["metrics"][f"entropy/layer_{layer}/head_{head}"]
            assert got == pytest.approx(float(head_mean[head]), abs=1e-5)
    assert result["world_size"] == 2


_DDP_WORKER = f"""
import copy, os, sys
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch
import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from transformers import GPT2Config, GPT2LMHeadModel
from entropic.callbacks import AttentionEntropyMonitor, EntropyRegularization

CONFIG = GPT2Config(**{CONFIG.to_diff_dict()!r})
THETA = torch.tensor({THETA.tolist()!r})


class UserLM(pl.LightningModule):
    def __init__(self, weights):
        super().__init__()
        self.model = GPT2LMHeadModel(copy.deepcopy(CONFIG))
        self.model.load_state_dict(weights)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class Probe(Callback):
    grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {{n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}}


if __name__ == "__main__":
    out = sys.argv[1]
    weights = torch.load(os.path.join(out, "weights.pt"))
    rows = torch.load(os.path.join(out, "rows.pt"))
    monitor = AttentionEntropyMonitor(write_figures=False)
    reg = EntropyRegularization(loss_coeff=0.5, tolerance=0.1, threshold_init=THETA, start_when_entropy_below=None, warmup_steps=0)
    probe = Probe()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, default_root_dir=out,
        callbacks=[monitor, reg, probe],
    )
    trainer.fit(UserLM(weights), torch.utils.data.DataLoader(list(rows), batch_size=2, shuffle=False))
    if trainer.is_global_zero:
        torch.save(
            {{"grads": probe.grads, "metrics": monitor.last_metrics, "world_size": trainer.world_size}},
            os.path.join(out, "result.pt"),
        )
"""


# ---------------------------------------------------------------------------------------------------- other routes
# Each route's gradient change is checked against the same independent reference: the penalty of Algorithm 1
# written out above, from the probabilities of an eager copy of the weights.
def reference_delta(weights, batches, coeff=5.0, tol=0.1):
    with_pen = reference_grads(weights, batches, THETA, tol, coeff)
    without_pen = reference_grads(weights, batches, THETA, tol, 0.0)
    return {n: with_pen[n] - without_pen[n] for n in with_pen}


class ManualLM(UserLM):
    """A user's module with manual optimization: it adds the term with the documented one-line call."""

    def __init__(self, state_dict, call_penalty=True):
        super().__init__(state_dict)
        self.automatic_optimization = False
        self.call_penalty = call_penalty

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = self.model(**batch).loss
        if self.call_penalty:
            (reg,) = [c for c in self.trainer.callbacks if isinstance(c, EntropyRegularization)]
            loss = loss + reg.penalty(self)
        optimizer.zero_grad()
        self.manual_backward(loss)
        self.grads = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}
        self.theta_grad = None if not self.call_penalty else reg.thresholds.grad.detach().clone()
        optimizer.step()


def test_manual_optimization_route_adds_exactly_lambda_grad_penalty(tmp_path):
    weights, batches = initial_weights(), make_batches(1)
    delta = reference_delta(weights, batches)
    modules = []
    for coeff in (0.0, 5.0):
        module = ManualLM(weights)
        reg = EntropyRegularization(
            loss_coeff=coeff, tolerance=0.1, threshold_init=THETA, start_when_entropy_below=None, warmup_steps=0
        )
        trainer(tmp_path, [reg]).fit(module, loader(batches))
        modules.append(module)
    assert_grad_delta(modules[1].grads, modules[0].grads, delta, atol=1e-6)
    torch.testing.assert_close(modules[1].theta_grad, delta["entropy_thresholds"], atol=1e-7, rtol=1e-5)


def test_manual_optimization_without_the_call_is_refused(tmp_path):
    weights, batches = initial_weights(), make_batches(1)
    reg = EntropyRegularization(
        loss_coeff=1.0, start_when_entropy_below=None, warmup_steps=0, threshold_init=DEFAULT_THRESHOLD
    )
    with pytest.raises(MisconfigurationException, match=r"manual optimization.*loss = loss \+ reg\.penalty\(self\)"):
        trainer(tmp_path, [reg]).fit(ManualLM(weights, call_penalty=False), loader(batches))


def test_plain_pytorch_route_adds_exactly_lambda_grad_penalty():
    weights, (batch,) = initial_weights(), make_batches(1)
    delta = reference_delta(weights, [batch])
    grads = []
    for coeff in (0.0, 5.0):
        model = GPT2LMHeadModel(copy.deepcopy(CONFIG))
        model.load_state_dict(weights)
        prepare_model(model)
        penalty = EntropyPenalty.for_model(model, init=THETA, tolerance=0.1, loss_coeff=coeff)
        loss = model(**batch).loss + penalty(model, attention_mask=None)
        loss.backward()
        grads.append({f"model.{n}": p.grad for n, p in model.named_parameters()})
        theta_grad = penalty.thresholds.grad
    assert_grad_delta(grads[1], grads[0], delta, atol=1e-6)
    torch.testing.assert_close(theta_grad, delta["entropy_thresholds"], atol=1e-7, rtol=1e-5)


def test_hugging_face_trainer_route_adds_exactly_lambda_grad_penalty(tmp_path):
    from transformers import TrainerCallback, TrainingArguments

    from entropic.hf_trainer import PENALTY_FILE, EntropyRegularizedTrainer

    weights, (batch,) = initial_weights(), make_batches(1)
    delta = reference_delta(weights, [batch])
    rows = [{"input_ids": batch["input_ids"][i], "labels": batch["labels"][i]} for i in range(B)]

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads = {f"model.{n}": p.grad.detach().clone() for n, p in model.named_parameters()}

    grads, penalties = [], []
    for coeff in (0.0, 5.0):
        model = GPT2LMHeadModel(copy.deepcopy(CONFIG))
        model.load_state_dict(weights)
        penalty = EntropyPenalty.for_model(model, init=THETA, tolerance=0.1, loss_coeff=coeff)
        probe = Grads()
        args = TrainingArguments(
            output_dir=str(tmp_path / f"hf{coeff}"), per_device_train_batch_size=B, max_steps=1, learning_rate=0.5,
            optim="sgd", lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="steps",
            save_steps=1, logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=0.0,
        )  # fmt: skip
        trainer_ = EntropyRegularizedTrainer(
            model=model, args=args, train_dataset=rows, entropy_penalty=penalty, callbacks=[probe]
        )
        trainer_.train()
        assert model.config._attn_implementation == "entropic"
        grads.append(probe.grads)
        penalties.append(penalty)
    assert_grad_delta(grads[1], grads[0], delta, atol=1e-6)
    assert not torch.equal(penalties[1].thresholds.detach(), THETA)  # θ was in the optimizer and moved
    saved = torch.load(tmp_path / "hf5.0" / "checkpoint-1" / PENALTY_FILE, weights_only=False)
    torch.testing.assert_close(saved["thresholds"], penalties[1].thresholds.detach())
    with pytest.raises(ValueError, match=r"needs entropy_penalty=.*loss_coeff set"):
        EntropyRegularizedTrainer(model=model, args=args, entropy_penalty=EntropyPenalty(2, 2))


def test_our_models_own_loss_adds_exactly_lambda_grad_penalty():
    """EntropicForCausalLM with entropy_coeff: the reference penalty comes from the dense attention oracle's
    probabilities of the same weights, written out as Algorithm 1 here."""
    from entropic.models import EntropicConfig, EntropicForCausalLM

    sizes = {"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": VOCAB, "n_positions": T}
    theta = THETA.clone()

    def grads_of(coeff, backend):
        torch.manual_seed(0)
        config = EntropicConfig.from_preset("SM(t)+ScFuFFN", **sizes, entropy_coeff=coeff, entropy_tolerance=0.1)
        config.attention_backend = backend
        model = EntropicForCausalLM(config)
        with torch.no_grad():
            model.entropy_thresholds.copy_(theta)
        (batch,) = make_batches(1)
        out = model(**batch)
        out.loss.backward()
        return out, {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}

    plain_out, plain = grads_of(0.0, "torch")
    _, regularized = grads_of(5.0, "torch")
    # Reference: CE + 5 · Algorithm 1 from the oracle's row entropies (-Σ p log p of materialized probabilities).
    torch.manual_seed(0)
    config = EntropicConfig.from_preset("SM(t)+ScFuFFN", **sizes, attention_backend="reference")
    oracle = EntropicForCausalLM(config)
    with torch.no_grad():
        oracle.entropy_thresholds.copy_(theta)
    (batch,) = make_batches(1)
    out = oracle(**batch)
    e_max = math.log(T)
    terms = []
    for layer, row in enumerate(out.row_entropies):
        dev = row.mean(dim=(0, 2)) - oracle.entropy_thresholds[layer] * e_max
        terms.append(torch.where(dev.abs() > 0.1 * e_max, dev**2, torch.zeros_like(dev)).mean())
    (5.0 * torch.stack(terms).mean()).backward()
    reference = {n: p.grad for n, p in oracle.named_parameters()}
    assert plain_out.entropy_penalty is not None
    for name, grad in plain.items():
        want = reference[name] if reference[name] is not None else torch.zeros_like(grad)
        torch.testing.assert_close(regularized[name] - grad, want, atol=1e-6, rtol=1e-4, msg=name)
    assert reference["transformer.entropy_thresholds"].abs().max() > 1e-3  # the term is not negligible


def test_deepcopy_of_the_model_mid_training_works(tmp_path):
    weights, batches = initial_weights(), make_batches(3)
    copies = []

    class EMA(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            copies.append(copy.deepcopy(pl_module.model))  # the recorder holds this step's graph

    module = UserLM(weights, lr=0.1)
    reg = EntropyRegularization(loss_coeff=1.0, threshold_init=THETA, start_when_entropy_below=None, warmup_steps=0)
    trainer(tmp_path, [AttentionEntropyMonitor(write_figures=False), reg, EMA()], max_steps=3).fit(
        module, loader(batches)
    )
    assert len(copies) == 3
    with torch.no_grad():
        copies[-1](**batches[0])
    from entropic.ops import collect_row_entropies

    assert len(collect_row_entropies(copies[-1])) == 2  # the copy records into its own recorder
    assert collect_row_entropies(copies[0]) == []  # which the other copies do not share
