"""EntropicDataModule: an offline-first language-modelling data pipeline on `datasets`.

Pipeline (``prepare_data``, once per node): list documents -> ``Dataset.from_generator`` -> split by
document key -> train or load the BPE on the train split -> ``.map(batched=True)`` tokenization with
EOS after each document -> one flat token file per split. Everything lands in
``cache_dir/tokens/<key>`` and ``cache_dir/tokenizers/<key>``, keyed by the corpus fingerprint and
every setting that changes the tokens; ``block_size`` and ``max_tokens`` are applied when reading, so
changing them does not re-tokenize. ``setup`` only reads the cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from entropic.data.corpus import default_cache_dir

# Lightning imports torchmetrics, which imports matplotlib, which writes a font cache to ~/.cache and
# ~/.config unless MPLCONFIGDIR is set: keep it in the project cache instead (only if the user did not choose).
if "matplotlib" not in sys.modules:
    os.environ.setdefault("MPLCONFIGDIR", str(default_cache_dir() / "matplotlib"))

from lightning.pytorch import LightningDataModule

from entropic.data.blocks import TokenBlocks, collate_blocks, token_dtype, write_tokens
from entropic.data.corpus import (
    HUB_PREFIX,
    STDLIB,
    SourceFile,
    check_text_field,
    files_fingerprint,
    fingerprint,
    is_offline,
    iter_documents,
    iter_hub_documents,
    local_files,
    parse_hub_source,
    select_files,
    split_documents,
    split_single_text,
    stdlib_dir,
    stdlib_files,
)
from entropic.data.sampling import ResumableDataLoader, ResumableSampler
from entropic.data.tokenizer import bpe_cache_key, check_vocab_size, load_or_train_bpe, load_pretrained_tokenizer

_FORMAT = 1  # bump when the on-disk token format or the split rule changes
_MAX_KEYS_SAVED = 1_000_000


@dataclass
class _Plan:
    """What ``prepare_data`` builds and where it goes; cheap to compute (no file is read)."""

    files: list[SourceFile] | None  # local sources
    hub: tuple[str, str | None] | None  # (name, config) for hub sources
    split_fingerprint: str  # the corpus and the split rule
    data_dir: Path


class EntropicDataModule(LightningDataModule):
    """Packed next-token-prediction blocks from the embedded stdlib corpus, local files or a hub dataset.

    Batches are ``{"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}`` with ``labels`` equal to
    ``input_ids``: the model shifts them internally, like Hugging Face GPT-2. Documents are joined with
    ``<|endoftext|>`` and cut into full blocks of ``block_size`` tokens (blocks can span documents).

    Args:
        source: ``"stdlib"`` (the running interpreter's standard library source, ~1,800 ``.py`` files,
            offline), a local file or folder (``.txt``/``.py``/... as one document per file, ``.jsonl``/
            ``.json`` and ``.parquet`` as one document per record), or ``"hub:owner/name[:config]"`` (its
            ``train`` split is streamed; needs network).
        text_field: the text column of JSONL, parquet and hub records.
        block_size: tokens per training sequence, the model's context T (at least 2).
        batch_size: sequences per batch.
        val_fraction: share of documents held out for validation, assigned by a stable hash of the
            document key (a single-document corpus is split by position instead).
        vocab_size: size of the locally trained byte-level BPE (ignored when ``tokenizer`` is given).
        tokenizer: a tokenizer directory, ``tokenizer.json`` file or hub name to use instead of training
            a BPE. It needs an EOS token.
        tokenizer_train_chars: train the BPE on at most this many characters of the train split
            (None: all of it).
        max_files: keep a deterministic, spread-out subset of at most this many files (hub: rows).
        max_tokens: read at most this many tokens, split between train and val by ``val_fraction``.
        max_block_size: the model's maximum context; a larger ``block_size`` is an error.
        num_workers: DataLoader worker processes.
        seed: seed of the train shuffling; epoch ``e`` is shuffled with ``seed + e`` (the split does not depend on it).
        cache_dir: where tokens, tokenizers and Arrow caches go; defaults to ``$ENTROPIC_CACHE`` or
            ``./.cache/entropic``.

    Raises:
        ValueError: a bad setting, an empty data folder, no supported files or a missing text field.
        FileNotFoundError: a local source that does not exist.
        RuntimeError: a hub source while offline and not cached.

    Example::

        dm = EntropicDataModule(block_size=128, batch_size=32, vocab_size=8192)
        model = GPT(GPTConfig(vocab_size=dm.vocab_size, block_size=128))
        trainer.fit(model, datamodule=dm)
    """

    def __init__(
        self,
        source: str = STDLIB,
        text_field: str = "text",
        block_size: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        vocab_size: int = 8192,
        tokenizer: str | None = None,
        tokenizer_train_chars: int | None = None,
        max_files: int | None = None,
        max_tokens: int | None = None,
        max_block_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        problems = []
        if block_size < 2:
            problems.append(f"block_size must be >= 2 (input and shifted label), got {block_size}")
        if max_block_size is not None and block_size > max_block_size:
            problems.append(f"block_size={block_size} is above the model's context max_block_size={max_block_size}")
        if batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 < val_fraction < 1.0:
            problems.append(f"val_fraction must be in (0, 1), got {val_fraction}")
        for name, value in (
            ("max_files", max_files),
            ("max_tokens", max_tokens),
            ("tokenizer_train_chars", tokenizer_train_chars),
        ):
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1 or None, got {value}")
        if problems:
            raise ValueError("; ".join(problems))
        if tokenizer is None:
            check_vocab_size(vocab_size)
        self.source, self.text_field, self.block_size = source, text_field, block_size
        self.batch_size, self.val_fraction, self.seed = batch_size, val_fraction, seed
        self.tokenizer_name, self.max_files, self.max_tokens = tokenizer, max_files, max_tokens
        self.tokenizer_train_chars, self.num_workers = tokenizer_train_chars, num_workers
        self.cache_dir = Path(cache_dir).expanduser().resolve() if cache_dir else default_cache_dir()
        self._configured_vocab_size = vocab_size
        self._tokenizer = None
        self.train_dataset: TokenBlocks | None = None
        self.val_dataset: TokenBlocks | None = None
        self.meta: dict[str, Any] | None = None
        # Fail now, before a Trainer is built, on a missing/empty folder, a missing field or offline hub use.
        plan = self._plan()
        if plan.files is not None and source != STDLIB:
            check_text_field(plan.files, text_field)
        if plan.hub is not None and is_offline() and not (plan.data_dir / "meta.json").is_file():
            raise RuntimeError(
                f"source {source!r} needs the Hugging Face Hub, but offline mode is on "
                "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE/TRANSFORMERS_OFFLINE) and it is not cached under "
                f"{self.cache_dir}. Unset the offline variables, or pass local text/JSONL/parquet files."
            )

    # ------------------------------------------------------------------ public helpers

    @property
    def vocab_size(self) -> int:
        """Embedding rows the model needs: every token id is ``< vocab_size``. Known right after ``__init__``."""
        if self.tokenizer_name is None:
            return self._configured_vocab_size
        return len(self.tokenizer)

    @property
    def tokenizer(self):
        """The transformers tokenizer (trained and cached on first use if ``prepare_data`` has not run)."""
        if self._tokenizer is None:
            if self.tokenizer_name is not None:
                self._tokenizer = load_pretrained_tokenizer(self.tokenizer_name, self.cache_dir)
            else:
                self.prepare_data()
                self._tokenizer = load_pretrained_tokenizer(self._read_meta()["tokenizer_path"], self.cache_dir)
        return self._tokenizer

    def check_block_size(self, model_context: int) -> None:
        """Raises ValueError if ``block_size`` exceeds the model's maximum context ``model_context``."""
        if self.block_size > model_context:
            raise ValueError(
                f"block_size={self.block_size} is above the model's context of {model_context} tokens; "
                f"set data block_size <= {model_context} or enlarge the model's block_size"
            )

    # ------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        """Builds the token files and the tokenizer once; a no-op when they are cached."""
        plan = self._plan()
        if (plan.data_dir / "meta.json").is_file():
            return
        tmp_root = self.cache_dir / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="build-", dir=tmp_root))
        try:
            self._build(plan, tmp)
            plan.data_dir.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):  # built concurrently by another process: keep theirs
                os.replace(tmp / "out", plan.data_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def setup(self, stage: str | None = None) -> None:
        meta = self._read_meta()
        if self._tokenizer is None:
            self._tokenizer = load_pretrained_tokenizer(meta["tokenizer_path"], self.cache_dir)
        dtype, t = meta["dtype"], self.block_size
        train_cap = val_cap = None
        if self.max_tokens is not None:
            train_cap = int(self.max_tokens * (1 - self.val_fraction)) // t
            val_cap = max(1, int(self.max_tokens * self.val_fraction) // t)
        data_dir = Path(meta["data_dir"])
        self.train_dataset = TokenBlocks(data_dir / "train.bin", dtype, t, train_cap)
        self.val_dataset = TokenBlocks(data_dir / "val.bin", dtype, t, val_cap)
        for split, ds in (("train", self.train_dataset), ("val", self.val_dataset)):
            if len(ds) == 0:
                n = meta["splits"][split]["n_tokens"]
                limit = f" with max_tokens={self.max_tokens}" if self.max_tokens is not None else ""
                raise ValueError(
                    f"the {split} split has no full block of block_size={t} tokens{limit} ({n} tokens from "
                    f"{meta['splits'][split]['n_docs']} documents); lower block_size or add data"
                )

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled train batches that a resumed run continues exactly where it stopped, even mid-epoch.

        Epoch ``e``'s order depends only on ``(seed, e)``; the loader's position is saved in Lightning checkpoints
        (see :mod:`entropic.data.sampling`). Under DDP each rank takes its share of every permutation.
        """
        ds = self._dataset("train")
        ranks = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        return ResumableDataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=ResumableSampler(ds, seed=self.seed, **(ranks or {})),
            drop_last=len(ds) >= self.batch_size,  # fixed tokens per step, unless there is less than one batch
            collate_fn=collate_blocks,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self._dataset("val"),
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=collate_blocks,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def test_dataloader(self) -> DataLoader:
        """The validation split (the corpora have no separate test split)."""
        return self.val_dataloader()

    # ------------------------------------------------------------------ internals

    def _dataset(self, split: str) -> TokenBlocks:
        if self.train_dataset is None:
            self.setup()
        return self.train_dataset if split == "train" else self.val_dataset

    def _plan(self) -> _Plan:
        files, hub = None, None
        if self.source == STDLIB:
            files = select_files(stdlib_files(), self.max_files)
            corpus = ("stdlib", sys.version, str(stdlib_dir()), files_fingerprint(files))
        elif self.source.startswith(HUB_PREFIX):
            hub = parse_hub_source(self.source)
            corpus = ("hub", *hub, self.max_files, self.text_field)
        else:
            files = select_files(local_files(self.source), self.max_files)
            corpus = ("local", files_fingerprint(files), self.text_field)
        split_fp = fingerprint(corpus, self.val_fraction, _FORMAT)
        if self.tokenizer_name is None:
            tok_id = ("bpe", bpe_cache_key(split_fp, self._configured_vocab_size, self.tokenizer_train_chars))
        else:
            path = Path(self.tokenizer_name).expanduser()
            stamp = [(p.name, p.stat().st_mtime_ns) for p in sorted(path.glob("*"))] if path.is_dir() else None
            if path.is_file():
                stamp = path.stat().st_mtime_ns
            tok_id = ("pretrained", str(path.resolve()) if path.exists() else self.tokenizer_name, stamp)
        return _Plan(files, hub, split_fp, self.cache_dir / "tokens" / fingerprint(split_fp, tok_id))

    def _read_meta(self) -> dict[str, Any]:
        if self.meta is None:
            path = self._plan().data_dir / "meta.json"
            if not path.is_file():
                raise RuntimeError(f"no prepared data at {path.parent}; call prepare_data() first")
            self.meta = {**json.loads(path.read_text()), "data_dir": str(path.parent)}
        return self.meta

    def _build(self, plan: _Plan, tmp: Path) -> None:
        from datasets import Dataset, Features, List, Value
        from datasets.exceptions import DatasetGenerationError

        arrow_cache = str(tmp / "datasets")
        if plan.hub is not None:
            gen, kwargs = iter_hub_documents, {"name": plan.hub[0], "config": plan.hub[1]}
            kwargs |= {
                "text_field": self.text_field,
                "max_docs": self.max_files,
                "cache_dir": str(self.cache_dir / "hub"),
            }
        else:
            gen, kwargs = iter_documents, {"files": plan.files, "text_field": self.text_field}
        features = Features({"key": Value("string"), "text": Value("string")})
        try:
            docs = Dataset.from_generator(
                gen, features=features, gen_kwargs=kwargs, cache_dir=arrow_cache, fingerprint=plan.split_fingerprint
            )
        except DatasetGenerationError as err:  # surface our own clear errors (missing field, hub unreachable)
            if isinstance(err.__cause__, (ValueError, RuntimeError, OSError)):
                raise err.__cause__ from None
            raise
        keys = docs.data.column("key").to_pylist()
        if not keys:
            raise ValueError(f"source {self.source!r} holds no non-empty document")
        if len(keys) == 1:  # one long text: split by position
            train_text, val_text = split_single_text(docs[0]["text"], self.val_fraction)
            splits = {
                "train": Dataset.from_dict({"key": keys, "text": [train_text]}, features=features),
                "val": Dataset.from_dict({"key": keys, "text": [val_text]}, features=features),
            }
            split_keys = {"train": keys, "val": keys}
        else:
            train_idx, val_idx = split_documents(keys, self.val_fraction)
            splits = {"train": docs.select(train_idx), "val": docs.select(val_idx)}
            split_keys = {"train": [keys[i] for i in train_idx], "val": [keys[i] for i in val_idx]}
        out = tmp / "out"
        out.mkdir()

        if self.tokenizer_name is None:

            def train_texts():
                for batch in splits["train"].iter(batch_size=256):
                    yield from batch["text"]

            tokenizer, tok_path = load_or_train_bpe(
                self.cache_dir,
                plan.split_fingerprint,
                self._configured_vocab_size,
                train_texts,
                self.tokenizer_train_chars,
            )
            vocab_size = self._configured_vocab_size
        else:
            tokenizer = load_pretrained_tokenizer(self.tokenizer_name, self.cache_dir)
            tokenizer.save_pretrained(out / "tokenizer")
            tok_path = plan.data_dir / "tokenizer"
            vocab_size = len(tokenizer)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {self.tokenizer_name!r} has no EOS token to separate documents")

        dtype = token_dtype(vocab_size)
        meta: dict[str, Any] = {"format": _FORMAT, "source": self.source, "vocab_size": vocab_size}
        meta |= {"tokenizer_len": len(tokenizer), "eos_token_id": tokenizer.eos_token_id, "dtype": dtype.name}
        meta |= {"tokenizer_path": str(tok_path), "splits": {}}
        for split, ds in splits.items():
            tokens = ds.map(
                _tokenize,
                batched=True,
                remove_columns=ds.column_names,
                fn_kwargs={"tokenizer": tokenizer, "eos_id": tokenizer.eos_token_id},
                features=Features({"input_ids": List(Value("int32"))}),
                cache_file_name=str(tmp / f"{split}-tokens.arrow"),
                new_fingerprint=fingerprint(plan.data_dir.name, split),
                desc=f"Tokenizing {split}",
            )
            n_tokens = write_tokens(_flat_token_chunks(tokens), out / f"{split}.bin", dtype)
            meta["splits"][split] = {"n_docs": len(ds), "n_tokens": n_tokens}
            if len(keys) <= _MAX_KEYS_SAVED:
                (out / f"{split}_keys.json").write_text(json.dumps(split_keys[split]))
        (out / "meta.json").write_text(json.dumps(meta, indent=2))


def _tokenize(batch: dict[str, list], tokenizer, eos_id: int) -> dict[str, list[list[int]]]:
    """Token ids of each document followed by EOS; no BOS or other special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast path, and no "sequence longer than model_max_length" warnings
        ids = [enc.ids for enc in backend.encode_batch(batch["text"], add_special_tokens=False)]
    else:
        ids = tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return {"input_ids": [[*x, eos_id] for x in ids]}


def _flat_token_chunks(tokens):
    import pyarrow.compute as pc

    for table in tokens.with_format("arrow").iter(batch_size=4096):
        yield pc.list_flatten(table.column("input_ids")).to_numpy()
