"""A run resumed from a mid-epoch checkpoint sees the same batches, and ends with the same weights, as one that never
stopped (EntropicDataModule's ResumableDataLoader/ResumableSampler through Lightning's fit loop)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from entropic.data import EntropicDataModule
from entropic.data.sampling import ResumableDataLoader, ResumableSampler
from entropic.lightning_module import EntropicLM

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    x: int = 0\n    y: int = 0\n",
    "import os\n\nprint(os.getcwd())  # where are we?\n",
    "for i in range(10):\n\tprint(i, 'unicode ok')\n",
    "x = [n * n for n in range(100) if n % 3 == 0]\n",
    "with open('f.txt') as fh:\n    data = fh.read()\n",
]


class RecordingLM(EntropicLM):
    """EntropicLM that keeps the input_ids of every training batch it receives."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        return super().training_step(batch, batch_idx)


class Killed(Exception):
    pass


class KillAfterStep(Callback):
    """Kills fit when the batch after optimizer step ``step`` starts, after that step's checkpoint was written.

    (``trainer.should_stop`` would not do: it ends the epoch early, which Lightning then counts as finished.)
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Killed


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    src = root / "data"
    src.mkdir()
    for i, doc in enumerate(DOCS * 2):
        (src / f"mod_{i}.py").write_text(doc, encoding="utf-8")
    return src, root / "cache"


def make_dm(corpus) -> EntropicDataModule:
    src, cache = corpus
    kwargs = {"vocab_size": 300, "block_size": 8, "batch_size": 2, "val_fraction": 0.2, "max_tokens": 100, "seed": 5}
    return EntropicDataModule(source=str(src), cache_dir=str(cache), **kwargs)


def fit(corpus, max_steps, accumulate, *, val_every=None, ckpt_dir=None, stop_at=None, resume=None):
    """One launch; with ``ckpt_dir`` it is killed after step ``stop_at``, having written a checkpoint at that step
    by ``every_n_train_steps`` or, with ``val_every``, at the end of each (mid-epoch) validation."""
    pl.seed_everything(0, verbose=False)
    model = RecordingLM(
        arch="SM+LN",
        n_layer=1,
        n_head=2,
        n_embd=8,
        n_positions=8,
        vocab_size=300,
        model_overrides={"attention_backend": "torch"},
        warmup_fraction=0.2,
    )
    callbacks: list[Callback] = []
    if ckpt_dir is not None:
        if val_every is None:
            callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=stop_at, save_top_k=-1))
        else:
            callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=-1))
        callbacks.append(KillAfterStep(stop_at))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        limit_val_batches=0 if val_every is None else 1,
        val_check_interval=val_every,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=ckpt_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    if stop_at is None:
        trainer.fit(model, datamodule=make_dm(corpus), ckpt_path=resume)
    else:
        with pytest.raises(Killed):
            trainer.fit(model, datamodule=make_dm(corpus), ckpt_path=resume)
    return model, trainer


@pytest.mark.parametrize(
    ("accumulate", "total", "stop", "val_every"),
    [(1, 9, 6, None), (2, 5, 2, None), (1, 10, 8, 3)],
    ids=["step-ckpt-epoch1", "accumulate2-epoch0", "ckpt-after-val"],
)
def test_resumed_run_matches_uninterrupted_run(corpus, tmp_path, accumulate, total, stop, val_every):
    dm = make_dm(corpus)
    dm.prepare_data()
    dm.setup("fit")
    per_epoch = len(dm.train_dataloader())
    assert per_epoch == 5  # the step counts below cross an epoch boundary before and after the stop

    full, full_trainer = fit(corpus, total, accumulate, val_every=val_every)
    assert full_trainer.global_step == total and full_trainer.current_epoch >= 1

    first, _ = fit(corpus, total, accumulate, val_every=val_every, ckpt_dir=tmp_path, stop_at=stop)
    (ckpt,) = tmp_path.glob("*.ckpt") if val_every is None else [tmp_path / "last.ckpt"]
    state = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state == [{"epoch": (stop * accumulate) // per_epoch, "batches": (stop * accumulate) % per_epoch}]
    second, second_trainer = fit(corpus, total, accumulate, val_every=val_every, resume=str(ckpt))
    assert second_trainer.global_step == total

    resumed = first.seen + second.seen
    assert len(resumed) == len(full.seen)
    for i, (got, want) in enumerate(zip(resumed, full.seen, strict=True)):
        assert torch.equal(got, want), f"batch {i} differs after resuming at step {stop}"
    for (name, got), want in zip(second.named_parameters(), full.parameters(), strict=True):
        assert torch.allclose(got, want, atol=1e-6), name
    # the check has teeth: epochs are shuffled differently, and training moved the weights
    epoch0, epoch1 = (torch.cat(full.seen[e * per_epoch : (e + 1) * per_epoch]) for e in range(2))
    assert not torch.equal(epoch0, epoch1)
    assert not all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))


def test_loader_state_round_trip_and_rank_split():
    data = torch.arange(20)
    order = [b.tolist() for b in ResumableDataLoader(data, batch_size=3, sampler=ResumableSampler(data, seed=1))]
    loader = ResumableDataLoader(data, batch_size=3, sampler=ResumableSampler(data, seed=1))
    loader.sampler.set_epoch(1)
    epoch1 = [b.tolist() for b in loader]
    assert sorted(i for b in epoch1 for i in b) == list(range(20)) and epoch1 != order

    it = iter(loader)
    loader.sampler.set_epoch(1)  # as Lightning does: after creating the iterator, before the first batch
    taken = [next(it).tolist() for _ in range(2)]
    assert taken == epoch1[:2] and loader.state_dict() == {"epoch": 1, "batches": 2}

    fresh = ResumableDataLoader(data, batch_size=3, sampler=ResumableSampler(data, seed=1))
    fresh.load_state_dict(loader.state_dict())
    assert fresh.state_dict() == {"epoch": 1, "batches": 2}
    assert [b.tolist() for b in fresh] == epoch1[2:]
    assert [b.tolist() for b in fresh] == epoch1  # the skip applies to one pass only

    done = ResumableDataLoader(data, batch_size=3, sampler=ResumableSampler(data, seed=1))
    done.load_state_dict({"epoch": 0, "batches": len(done)})  # saved at the end of epoch 0
    assert done.sampler.epoch == 1 and [b.tolist() for b in done] == epoch1
    with pytest.raises(ValueError, match="epoch"):
        done.load_state_dict({"epoch": -1, "batches": 0})

    shares = [list(ResumableSampler(data, seed=1, num_replicas=3, rank=r)) for r in range(3)]
    assert all(len(s) == 7 for s in shares) and set().union(*shares) == set(range(20))
    with pytest.raises(ValueError, match="rank=3"):
        ResumableSampler(data, num_replicas=3, rank=3)
