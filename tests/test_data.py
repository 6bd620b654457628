"""entropic.data: corpus listing and split, the cached byte-level BPE, packing, the datamodule and its errors."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from entropic.data import EntropicDataModule, load_or_train_bpe, split_documents, stdlib_files, train_bpe
from entropic.data.corpus import local_files, select_files

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    x: int = 0\n    y: int = 0\n",
    "import os\n\nprint(os.getcwd())  # where are we?\n",
    "for i in range(10):\n\tprint(i, 'ünïcødé ✓')\n",
    "x = [n * n for n in range(100) if n % 3 == 0]\n",
    "with open('f.txt') as fh:\n    data = fh.read()\n",
]


def write_text_corpus(root: Path, docs=DOCS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        sub = root / ("pkg" if i % 2 else "")
        sub.mkdir(exist_ok=True)
        (sub / f"mod_{i}.py").write_text(doc, encoding="utf-8")
    return root


def make_dm(source, tmp_path: Path, **kwargs) -> EntropicDataModule:
    kwargs = {"vocab_size": 300, "block_size": 8, "batch_size": 2, "val_fraction": 0.3, **kwargs}
    return EntropicDataModule(source=str(source), cache_dir=str(tmp_path / "cache"), **kwargs)


def ready(dm: EntropicDataModule) -> EntropicDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def read_split(dm: EntropicDataModule, split: str) -> tuple[np.ndarray, list[str]]:
    data_dir = Path(dm.meta["data_dir"])
    tokens = np.fromfile(data_dir / f"{split}.bin", dtype=dm.meta["dtype"]).astype(np.int64)
    return tokens, json.loads((data_dir / f"{split}_keys.json").read_text())


# ---------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_and_independent_of_order():
    keys = [f"pkg/mod_{i}.py" for i in range(200)]
    train, val = split_documents(keys, 0.1)
    assert len(val) == 20 and len(train) == 180
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(range(200))
    assert split_documents(keys, 0.1) == (train, val)
    shuffled = keys[:]
    random.Random(1).shuffle(shuffled)
    _, val2 = split_documents(shuffled, 0.1)
    assert sorted(shuffled[i] for i in val2) == sorted(keys[i] for i in val)
    # a small corpus still gets a non-empty val and train
    assert [len(s) for s in split_documents(["a", "b"], 0.01)] == [1, 1]
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_documents(["a"], 0.1)


def test_stdlib_listing_and_file_subset():
    files = stdlib_files()
    rels = [f.rel for f in files]
    assert len(files) > 500 and rels == sorted(rels)
    assert not any("site-packages" in r or "dist-packages" in r or "__pycache__" in r for r in rels)
    assert "os.py" in rels
    subset = select_files(files, 10)
    assert len(subset) == 10 and select_files(list(reversed(files)), 10) == subset
    assert len({f.rel.split("/")[0] for f in subset}) > 1  # spread out, not the alphabetically first files


def test_datamodule_split_by_file_is_reproducible(tmp_path):
    src = write_text_corpus(tmp_path / "data", DOCS * 2 + ["z = 1\n"] * 4)
    a = ready(make_dm(src, tmp_path / "a"))
    b = ready(make_dm(src, tmp_path / "b"))
    (ta, train_keys), (va, val_keys) = read_split(a, "train"), read_split(a, "val")
    assert set(train_keys).isdisjoint(val_keys) and len(train_keys) + len(val_keys) == 16
    assert all(k.endswith(".py") and "#" not in k for k in train_keys)  # one document per file
    assert np.array_equal(ta, read_split(b, "train")[0]) and np.array_equal(va, read_split(b, "val")[0])


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_is_cached_and_not_retrained(tmp_path):
    texts = [f.path.read_text(encoding="utf-8", errors="replace") for f in select_files(stdlib_files(), 5)]
    tok, path = load_or_train_bpe(tmp_path, "fp", 400, lambda: iter(texts))
    mtime = (path / "tokenizer.json").stat().st_mtime_ns

    def must_not_train():
        raise AssertionError("the tokenizer was retrained instead of loaded from the cache")

    tok2, path2 = load_or_train_bpe(tmp_path, "fp", 400, must_not_train)
    assert path2 == path and (path / "tokenizer.json").stat().st_mtime_ns == mtime
    assert tok2.get_vocab() == tok.get_vocab() and len(tok2) == 400
    # another vocab size or corpus is another cache entry
    assert load_or_train_bpe(tmp_path, "fp", 300, lambda: iter(texts))[1] != path
    assert load_or_train_bpe(tmp_path, "fp2", 400, lambda: iter(texts))[1] != path


def test_bpe_round_trips_python_source():
    files = select_files(stdlib_files(), 8)
    texts = [f.path.read_text(encoding="utf-8", errors="replace") for f in files]
    tok = train_bpe(texts, 600, max_chars=200_000)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    samples = [*texts[:3], "def f(x):\n\treturn x  # ünïcødé ✓ 🐍\r\n\n    ", "a . b , c ' d"]
    for text in samples:
        ids = tok.encode(text, add_special_tokens=False)
        assert max(ids) < 600
        assert tok.decode(ids) == text
    assert len(tok.encode(texts[0])) < len(texts[0].encode()) / 1.5  # it actually compresses


# ---------------------------------------------------------------- packing and formats


def test_packing_text_folder(tmp_path):
    src = write_text_corpus(tmp_path / "data")
    dm = ready(make_dm(src, tmp_path))
    tok, eos = dm.tokenizer, dm.tokenizer.eos_token_id
    by_key = {f.rel: f.path.read_text(encoding="utf-8") for f in local_files(src)}
    for split, ds in (("train", dm.train_dataset), ("val", dm.val_dataset)):
        tokens, keys = read_split(dm, split)
        # token count conservation: every document's tokens plus one EOS each
        expected = [t for k in keys for t in [*tok.encode(by_key[k], add_special_tokens=False), eos]]
        assert tokens.tolist() == expected
        assert int((tokens == eos).sum()) == len(keys) and tokens[-1] == eos
        # EOS sits exactly between documents
        docs = tok.decode(tokens.tolist()).split(tok.eos_token)
        assert docs[:-1] == [by_key[k] for k in keys]
        # every block is full length; they tile the stream and drop only the last partial block
        assert len(ds) == len(tokens) // 8
        blocks = [ds[i] for i in range(len(ds))]
        assert all(b.shape == (8,) and b.dtype == torch.int64 for b in blocks)
        assert torch.cat(blocks).tolist() == tokens[: len(ds) * 8].tolist()
    assert dm.meta["splits"]["train"]["n_docs"] + dm.meta["splits"]["val"]["n_docs"] == len(DOCS)


def test_jsonl_and_parquet_with_text_field(tmp_path):
    from datasets import Dataset

    src = tmp_path / "data"
    src.mkdir()
    with (src / "part0.jsonl").open("w") as fh:
        for doc in DOCS:
            fh.write(json.dumps({"content": doc, "id": 1}) + "\n")
    Dataset.from_dict({"content": DOCS[::-1], "n": list(range(len(DOCS)))}).to_parquet(str(src / "part1.parquet"))
    (src / "README.unknown").write_text("ignored")
    dm = ready(make_dm(src, tmp_path, text_field="content"))
    keys = read_split(dm, "train")[1] + read_split(dm, "val")[1]
    assert sorted(keys) == sorted([f"part0.jsonl#{i + 1}" for i in range(6)] + [f"part1.parquet#{i}" for i in range(6)])
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 8) and batch["labels"] is batch["input_ids"]


def test_single_text_file_is_split_by_position(tmp_path):
    text = "".join(f"line {i} = {i * i}\n" for i in range(400))
    (tmp_path / "input.txt").write_text(text)
    dm = ready(make_dm(tmp_path / "input.txt", tmp_path, val_fraction=0.1))
    train, val = (dm.tokenizer.decode(read_split(dm, s)[0].tolist()) for s in ("train", "val"))
    assert train.replace(dm.tokenizer.eos_token, "") + val.replace(dm.tokenizer.eos_token, "") == text
    assert 0.05 < len(val) / len(text) < 0.15


def test_dataloaders_shuffle_train_deterministically(tmp_path):
    dm = ready(make_dm(write_text_corpus(tmp_path / "data", DOCS * 3), tmp_path, seed=3))
    first = [next(iter(dm.train_dataloader()))["input_ids"] for _ in range(2)]
    assert torch.equal(first[0], first[1])
    val = next(iter(dm.val_dataloader()))["input_ids"]
    assert torch.equal(val, torch.stack([dm.val_dataset[0], dm.val_dataset[1]]))
    order = torch.cat([b["input_ids"] for b in dm.train_dataloader()])
    assert not torch.equal(order, torch.stack([dm.train_dataset[i] for i in range(len(order))]))


def test_max_tokens_and_vocab_size(tmp_path):
    src = write_text_corpus(tmp_path / "data", DOCS * 3)
    dm = ready(make_dm(src, tmp_path, max_tokens=80, val_fraction=0.25))
    assert len(dm.train_dataset) == 60 // 8 and len(dm.val_dataset) == 20 // 8
    assert dm.vocab_size == 300 and len(dm.tokenizer) <= 300
    assert int(np.fromfile(Path(dm.meta["data_dir"]) / "train.bin", dtype=dm.meta["dtype"]).max()) < dm.vocab_size


def test_second_prepare_reads_the_cache(tmp_path, monkeypatch):
    src = write_text_corpus(tmp_path / "data")
    first = ready(make_dm(src, tmp_path))

    def no_rebuild(*args, **kwargs):
        raise AssertionError("prepare_data rebuilt cached data")

    monkeypatch.setattr(EntropicDataModule, "_build", no_rebuild)
    second = ready(make_dm(src, tmp_path))
    assert second.meta["data_dir"] == first.meta["data_dir"] and len(second.train_dataset) == len(first.train_dataset)
    # block_size is applied when reading: no re-tokenization either
    assert (
        len(ready(make_dm(src, tmp_path, block_size=4)).train_dataset) == first.meta["splits"]["train"]["n_tokens"] // 4
    )
    monkeypatch.undo()
    (src / "mod_0.py").write_text("changed = True\n")  # a changed corpus is rebuilt
    assert ready(make_dm(src, tmp_path)).meta["data_dir"] != first.meta["data_dir"]


# ---------------------------------------------------------------- errors


def test_bad_inputs_give_clear_errors(tmp_path):
    src = write_text_corpus(tmp_path / "data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"data folder .*empty is empty"):
        make_dm(tmp_path / "empty", tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match=r"no supported files \(found 1 with suffixes \['.png'\]\)"):
        make_dm(tmp_path / "other", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_dm(tmp_path / "missing", tmp_path)
    with pytest.raises(ValueError, match=r"block_size must be >= 2"):
        make_dm(src, tmp_path, block_size=1)
    with pytest.raises(ValueError, match=r"block_size=256 is above the model's context max_block_size=128"):
        make_dm(src, tmp_path, block_size=256, max_block_size=128)
    with pytest.raises(ValueError, match=r"block_size=8 is above the model's context of 4 tokens"):
        make_dm(src, tmp_path).check_block_size(4)
    with pytest.raises(ValueError, match=r"vocab_size=200 is too small .* at least 257"):
        make_dm(src, tmp_path, vocab_size=200)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
        make_dm(src, tmp_path, val_fraction=1.0)
    with pytest.raises(ValueError, match=r"has no full block of block_size=4096"):
        ready(make_dm(src, tmp_path, block_size=4096))


def test_missing_text_field(tmp_path):
    from datasets import Dataset

    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(
        ValueError, match=r"text field 'text' not found in the first record of .*a.jsonl; available fields: \['body'\]"
    ):
        make_dm(tmp_path / "j", tmp_path)
    (tmp_path / "j" / "a.jsonl").write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"body": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"text field 'text' not found in .*a.jsonl record 2"):
        make_dm(tmp_path / "j", tmp_path).prepare_data()  # a later record: caught while reading
    (tmp_path / "p").mkdir()
    Dataset.from_dict({"body": ["x", "y"]}).to_parquet(str(tmp_path / "p" / "a.parquet"))
    with pytest.raises(ValueError, match=r"text field 'content' not found in parquet file .*a.parquet"):
        make_dm(tmp_path / "p", tmp_path, text_field="content")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access to {address}")
        return real_connect(self, address)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_hub_sources_fail_clearly_offline(tmp_path, no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"needs the Hugging Face Hub, but offline mode is on"):
        make_dm("hub:codeparrot/codeparrot-clean", tmp_path)
    dm = make_dm(write_text_corpus(tmp_path / "data"), tmp_path, tokenizer="someone/some-tokenizer")
    with pytest.raises(RuntimeError, match=r"not a local path .* offline mode is on"):
        dm.prepare_data()


def test_stdlib_subset_offline_without_home_or_network(tmp_path):
    """A fresh process with HOME elsewhere, no HF variables and the network refused end to end."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    script = textwrap.dedent(
        """
        import socket
        attempts = []
        real_connect = socket.socket.connect
        def refuse(self, address):
            if self.family in (socket.AF_INET, socket.AF_INET6):
                attempts.append(address)
                raise OSError("network disabled by the test")
            return real_connect(self, address)
        socket.socket.connect = refuse

        from entropic.data import EntropicDataModule
        dm = EntropicDataModule(max_files=12, vocab_size=320, block_size=32, batch_size=4)
        dm.prepare_data()
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        assert batch["input_ids"].shape == (4, 32), batch["input_ids"].shape
        assert dm.meta["splits"]["train"]["n_docs"] + dm.meta["splits"]["val"]["n_docs"] == 12
        assert not attempts, attempts
        print("OK", dm.meta["data_dir"])
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "ENTROPIC_", "XDG_"))}
    env |= {"HOME": str(home), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"OK {work / '.cache' / 'entropic'}" in proc.stdout
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) == []
