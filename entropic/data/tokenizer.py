"""Byte-level BPE tokenizer trained locally with `tokenizers`, cached on disk, usable from transformers.

The tokenizer is GPT-2's recipe: bytes are mapped to 256 printable symbols (so any UTF-8 text
round-trips exactly and there is no unknown token), split by the GPT-2 regex, and merged by BPE.
``<|endoftext|>`` (id 0) separates documents and is the EOS/BOS token.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from entropic.data.corpus import fingerprint, is_offline

EOT = "<|endoftext|>"
SPECIAL_TOKENS = (EOT,)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens
# Every setting that changes the trained vocabulary; part of the cache key.
BPE_SETTINGS = {
    "model": "bpe",
    "pre_tokenizer": "byte_level(add_prefix_space=False, use_regex=True)",
    "special_tokens": list(SPECIAL_TOKENS),
    "min_frequency": 2,
    "tokenizers": tokenizers.__version__,
}


def check_vocab_size(vocab_size: int) -> None:
    """Raises ValueError when ``vocab_size`` cannot hold the byte alphabet and the special tokens."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs at least {MIN_VOCAB_SIZE} "
            f"(256 byte symbols + {len(SPECIAL_TOKENS)} special token(s) {list(SPECIAL_TOKENS)})"
        )


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wraps a raw `tokenizers` object as a transformers tokenizer (``save_pretrained``/``from_pretrained``)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        # Decoding must give back the exact source text (no " ." -> "." clean-up).
        clean_up_tokenization_spaces=False,
    )


def _limit_chars(texts: Iterable[str], max_chars: int | None, batch: int = 256) -> Iterator[list[str]]:
    """Batches of texts, stopping once ``max_chars`` characters were produced (the last text is cut)."""
    out, total = [], 0
    for text in texts:
        if max_chars is not None and total + len(text) > max_chars:
            if max_chars - total > 0:
                out.append(text[: max_chars - total])
            break
        out.append(text)
        total += len(text)
        if len(out) == batch:
            yield out
            out = []
    if out:
        yield out


def train_bpe(texts: Iterable[str], vocab_size: int, max_chars: int | None = None) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE on ``texts`` (at most ``max_chars`` characters of them).

    The result may hold fewer than ``vocab_size`` tokens when the text has too few distinct pairs; token
    ids are always ``< vocab_size``.
    """
    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=BPE_SETTINGS["min_frequency"],
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_limit_chars(texts, max_chars), trainer=trainer)
    return wrap_tokenizer(tok)


def bpe_cache_key(corpus_fingerprint: str, vocab_size: int, max_chars: int | None) -> str:
    """Cache key of a trained BPE: the training text, the vocabulary size and every tokenizer setting."""
    return fingerprint("bpe", corpus_fingerprint, vocab_size, max_chars, BPE_SETTINGS)


def load_or_train_bpe(
    cache_dir: str | Path,
    corpus_fingerprint: str,
    vocab_size: int,
    texts: Callable[[], Iterable[str]],
    max_chars: int | None = None,
) -> tuple[PreTrainedTokenizerFast, Path]:
    """Loads the BPE cached under ``cache_dir/tokenizers``, or trains it on ``texts()`` and caches it.

    ``texts`` is only called on a cache miss. The directory is written atomically (temporary directory,
    then rename), so a crashed or concurrent run never leaves a half-written tokenizer.

    Returns:
        The tokenizer and its directory (loadable with ``PreTrainedTokenizerFast.from_pretrained``).
    """
    check_vocab_size(vocab_size)
    root = Path(cache_dir) / "tokenizers"
    path = root / f"bpe-{vocab_size}-{bpe_cache_key(corpus_fingerprint, vocab_size, max_chars)}"
    if not (path / "tokenizer.json").is_file():
        tokenizer = train_bpe(texts(), vocab_size, max_chars)
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=root))
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished first; keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(path), path


def load_pretrained_tokenizer(name_or_path: str, cache_dir: str | Path) -> PreTrainedTokenizerFast:
    """A local tokenizer directory/file, or a hub tokenizer name (downloaded into ``cache_dir/hub``).

    Raises:
        RuntimeError: a hub name that is neither cached nor reachable (offline mode or no network).
    """
    from transformers import AutoTokenizer

    path = Path(name_or_path).expanduser()
    if path.is_file():  # a bare tokenizer.json
        return wrap_tokenizer(Tokenizer.from_file(str(path)))
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    hub_cache = str(Path(cache_dir) / "hub")
    try:
        return AutoTokenizer.from_pretrained(name_or_path, cache_dir=hub_cache, local_files_only=is_offline())
    except Exception as err:
        hint = (
            "Hugging Face offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE/TRANSFORMERS_OFFLINE) and it is not "
            f"cached under {hub_cache}"
            if is_offline()
            else "the hub may be unreachable"
        )
        raise RuntimeError(
            f"tokenizer {name_or_path!r} is not a local path and could not be loaded from the hub: {hint}. "
            f"Pass a local tokenizer directory, or leave `tokenizer` unset to train a BPE locally. ({err})"
        ) from err
