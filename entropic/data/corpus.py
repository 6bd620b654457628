"""Corpus sources: the embedded Python standard library, local text/JSONL/parquet files, hub datasets.

A *document* is the unit that is tokenized (followed by an end-of-text token) and that the train/val
split assigns: a text file is one document; a JSONL line or a parquet row is one document; a hub row is
one document. The split is a pure function of the document keys (their relative path, plus the row
number for record formats), so it does not depend on file-system listing order.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from entropic.env import env_flag

STDLIB = "stdlib"
HUB_PREFIX = "hub:"
TEXT_SUFFIXES = frozenset(
    {".txt", ".text", ".md", ".rst", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".js", ".ts", ".java"}
    | {".go", ".rs", ".sh", ".tex", ".html", ".css", ".toml", ".yaml", ".yml"}
)
JSONL_SUFFIXES = frozenset({".jsonl", ".json"})
PARQUET_SUFFIXES = frozenset({".parquet"})
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES
# Never part of "the standard library": third-party packages installed next to it, and bytecode.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")

Kind = Literal["text", "jsonl", "parquet"]


@dataclass(frozen=True)
class SourceFile:
    """One local file of a corpus.

    Args:
        path: absolute path.
        rel: path relative to the corpus root, POSIX style; the file's identity in keys and hashes.
        kind: how the file is read.
    """

    path: Path
    rel: str
    kind: Kind


def default_cache_dir() -> Path:
    """``$ENTROPIC_CACHE`` if set, else ``./.cache/entropic`` relative to the current directory."""
    env = os.environ.get("ENTROPIC_CACHE")
    return Path(env).expanduser().resolve() if env else (Path.cwd() / ".cache" / "entropic").resolve()


def is_offline() -> bool:
    """True when any of the Hugging Face offline variables is set to a truthy value."""
    return any(env_flag(v) for v in _OFFLINE_VARS)


def stable_hash(text: str, salt: str = "") -> int:
    """A 64-bit hash that is identical across processes and Python versions (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(f"{salt}\0{text}".encode(), digest_size=8).digest(), "big")


def fingerprint(*parts: object) -> str:
    """A short hex digest of the JSON form of ``parts``; used as cache key."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def stdlib_dir() -> Path:
    """The source directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_files(root: Path | None = None) -> list[SourceFile]:
    """Every ``.py`` file of the standard library, ``test/`` and ``idlelib/`` included, sorted by path.

    ``site-packages``/``dist-packages`` (third-party code) and ``__pycache__`` are skipped; symlinked
    directories are not followed.
    """
    root = stdlib_dir() if root is None else root
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                files.append(SourceFile(path, path.relative_to(root).as_posix(), "text"))
    if not files:
        raise FileNotFoundError(
            f"no .py files found in the standard library directory {root} (Python {sys.version.split()[0]}); "
            "this interpreter may ship its standard library zipped. Pass a local data folder as `source`."
        )
    return sorted(files, key=lambda f: f.rel)


def _kind_of(path: Path) -> Kind | None:
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    return "text" if suffix in TEXT_SUFFIXES else None


def local_files(source: str | Path) -> list[SourceFile]:
    """The supported files of a local file or folder (recursively; hidden entries skipped), sorted.

    A single file with an unknown suffix is read as text.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the folder is empty, or holds no file with a supported suffix.
    """
    root = Path(source).expanduser().resolve()
    if not root.exists():
        raise FileNotFoundError(f"data source {str(source)!r} does not exist (resolved to {root})")
    if root.is_file():
        return [SourceFile(root, root.name, _kind_of(root) or "text")]
    files, other_suffixes, n_seen = [], set(), 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            n_seen += 1
            path = Path(dirpath) / name
            kind = _kind_of(path)
            if kind is None:
                other_suffixes.add(path.suffix or "(no suffix)")
            else:
                files.append(SourceFile(path, path.relative_to(root).as_posix(), kind))
    if n_seen == 0:
        raise ValueError(f"data folder {root} is empty: put .txt/.py, .jsonl or .parquet files in it")
    if not files:
        raise ValueError(
            f"data folder {root} has no supported files (found {n_seen} with suffixes {sorted(other_suffixes)}); "
            f"supported: {sorted(SUPPORTED_SUFFIXES)}"
        )
    return sorted(files, key=lambda f: f.rel)


def select_files(files: Sequence[SourceFile], max_files: int | None) -> list[SourceFile]:
    """A deterministic, spread-out subset of at most ``max_files`` files (smallest hash of the path), sorted."""
    if max_files is None or max_files >= len(files):
        return list(files)
    if max_files < 1:
        raise ValueError(f"max_files must be >= 1 or None, got {max_files}")
    chosen = sorted(files, key=lambda f: stable_hash(f.rel, "select"))[:max_files]
    return sorted(chosen, key=lambda f: f.rel)


def files_fingerprint(files: Sequence[SourceFile]) -> str:
    """Cache key of a file list: relative paths, sizes and modification times (no reading)."""
    entries = []
    for f in files:
        st = f.path.stat()
        entries.append((f.rel, f.kind, st.st_size, st.st_mtime_ns))
    return fingerprint(entries)


def _read_text(path: Path) -> str:
    # Invalid UTF-8 (a few stdlib test files are latin-1 on purpose) becomes U+FFFD instead of failing.
    return path.read_bytes().decode("utf-8", errors="replace")


def _missing_field(text_field: str, where: str, available: Sequence[str]) -> ValueError:
    return ValueError(f"text field {text_field!r} not found in {where}; available fields: {sorted(available)}")


def check_text_field(files: Sequence[SourceFile], text_field: str) -> None:
    """Checks cheaply (first record / schema) that every JSONL and parquet file has ``text_field``."""
    import pyarrow.parquet as pq

    for f in files:
        if f.kind == "parquet":
            names = pq.ParquetFile(f.path).schema_arrow.names
            if text_field not in names:
                raise _missing_field(text_field, f"parquet file {f.path}", names)
        elif f.kind == "jsonl":
            for _, record in _iter_json_records(f):
                if text_field not in record:
                    raise _missing_field(text_field, f"the first record of {f.path}", list(record))
                break


def _iter_json_records(f: SourceFile) -> Iterator[tuple[int, dict]]:
    """(line number or array index, record) pairs of a JSON-lines file or a JSON array file."""
    with f.path.open(encoding="utf-8", errors="replace") as fh:
        head = fh.read(1024).lstrip()
        fh.seek(0)
        if head.startswith("["):
            records = enumerate(json.load(fh))
        else:
            records = ((i, json.loads(line)) for i, line in enumerate(fh, 1) if line.strip())
        for i, record in records:
            if not isinstance(record, dict):
                raise ValueError(f"{f.path} record {i}: expected a JSON object, got {type(record).__name__}")
            yield i, record


def iter_documents(files: Sequence[SourceFile], text_field: str = "text") -> Iterator[dict[str, str]]:
    """Yields ``{"key", "text"}`` for every non-empty document of ``files``, in file order."""
    import pyarrow.parquet as pq

    for f in files:
        if f.kind == "text":
            text = _read_text(f.path)
            if text:
                yield {"key": f.rel, "text": text}
        elif f.kind == "jsonl":
            for i, record in _iter_json_records(f):
                if text_field not in record:
                    raise _missing_field(text_field, f"{f.path} record {i}", list(record))
                if record[text_field]:
                    yield {"key": f"{f.rel}#{i}", "text": str(record[text_field])}
        else:
            pf = pq.ParquetFile(f.path)
            if text_field not in pf.schema_arrow.names:
                raise _missing_field(text_field, f"parquet file {f.path}", pf.schema_arrow.names)
            row = 0
            for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    if text:
                        yield {"key": f"{f.rel}#{row}", "text": str(text)}
                    row += 1


def parse_hub_source(source: str) -> tuple[str, str | None]:
    """``"hub:owner/name"`` or ``"hub:owner/name:config"`` -> (name, config)."""
    spec = source[len(HUB_PREFIX) :].strip()
    name, _, config = spec.partition(":")
    if not name:
        raise ValueError(f"hub source {source!r} has no dataset name; expected 'hub:owner/name[:config]'")
    return name, config or None


def iter_hub_documents(
    name: str, config: str | None, text_field: str, max_docs: int | None, cache_dir: str
) -> Iterator[dict[str, str]]:
    """Streams the ``train`` split of a hub dataset (network needed); at most ``max_docs`` rows."""
    from datasets import load_dataset

    try:
        stream = load_dataset(name, config, split="train", streaming=True, cache_dir=cache_dir)
        for i, row in enumerate(stream):
            if max_docs is not None and i >= max_docs:
                break
            if text_field not in row:
                raise _missing_field(text_field, f"hub dataset {name!r}", list(row))
            if row[text_field]:
                yield {"key": f"{name}#{i}", "text": str(row[text_field])}
    except ValueError:
        raise
    except Exception as err:  # connection errors come in many types (httpx, OSError, hub errors)
        raise RuntimeError(
            f"could not stream hub dataset {name!r} (config {config!r}): {type(err).__name__}: {err}. "
            "Hub sources need network access to huggingface.co; offline, pass local text/JSONL/parquet files."
        ) from err


def split_documents(keys: Sequence[str], val_fraction: float) -> tuple[list[int], list[int]]:
    """Assigns documents to train and val by a stable hash of their key.

    The ``round(val_fraction * n)`` documents with the smallest hash (at least one, and never all of them)
    form val. Both index lists come ordered by hash, a deterministic shuffle, so that a prefix of the
    packed token stream is a spread-out sample. The result depends only on the set of keys.

    Raises:
        ValueError: fewer than two documents.
    """
    if len(keys) < 2:
        raise ValueError(f"need at least 2 documents to split into train and val, got {len(keys)}")
    order = sorted(range(len(keys)), key=lambda i: (stable_hash(keys[i], "split"), keys[i]))
    n_val = min(max(1, round(val_fraction * len(keys))), len(keys) - 1)
    return order[n_val:], order[:n_val]


def split_single_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Splits one long document by position (the last ``val_fraction`` is val), at a line boundary if possible."""
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    if cut <= 0 or cut >= len(text):
        raise ValueError(f"the only document ({len(text)} characters) is too short to split into train and val")
    return text[:cut], text[cut:]
