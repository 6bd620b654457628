"""Packing: a flat token file per split, read back as fixed-length blocks.

Each split is stored as one flat array of token ids on disk (``uint16``, or ``uint32`` for vocabularies
above 65,536), documents concatenated in split order with ``<|endoftext|>`` after each one, as in
nanoGPT's ``train.bin``. Block ``i`` is ``tokens[i * T : (i + 1) * T]``; the last ``< T`` tokens are not
used. Every block is full length and a block may span a document boundary (the EOS token marks it).

Convention: a batch is ``{"input_ids": [B, T], "labels": [B, T]}`` with ``labels`` equal to
``input_ids``; the model shifts the labels internally (as Hugging Face's GPT-2 does), so each block
gives ``T - 1`` next-token predictions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary of ``vocab_size``."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def write_tokens(chunks: Iterable[np.ndarray], path: str | Path, dtype: np.dtype) -> int:
    """Appends 1-D token arrays to ``path`` in order; returns the number of tokens written."""
    n = 0
    with open(path, "wb") as fh:
        for chunk in chunks:
            arr = np.asarray(chunk)
            if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(dtype).max):
                raise ValueError(f"token id out of range for {dtype}: [{arr.min()}, {arr.max()}]")
            fh.write(arr.astype(dtype, copy=False).tobytes())
            n += arr.size
    return n


class TokenBlocks(Dataset):
    """Fixed-length blocks of a flat token file, as ``int64`` tensors of shape ``[block_size]``.

    Args:
        path: the flat token file.
        dtype: its dtype (see :func:`token_dtype`).
        block_size: tokens per block (the model's sequence length T).
        max_blocks: keep only the first ``max_blocks`` blocks.
    """

    def __init__(self, path: str | Path, dtype: np.dtype, block_size: int, max_blocks: int | None = None) -> None:
        self.path, self.dtype, self.block_size = str(path), np.dtype(dtype), block_size
        n_tokens = Path(path).stat().st_size // self.dtype.itemsize
        n_blocks = n_tokens // block_size
        self.n_blocks = n_blocks if max_blocks is None else min(n_blocks, max_blocks)
        self._tokens: np.ndarray | None = None  # memory map, opened lazily in each worker process

    def __len__(self) -> int:
        return self.n_blocks

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._tokens

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -self.n_blocks <= index < self.n_blocks:
            raise IndexError(f"block {index} out of range for {self.n_blocks} blocks")
        start = (index % self.n_blocks) * self.block_size
        return torch.from_numpy(self.tokens[start : start + self.block_size].astype(np.int64))

    def __getstate__(self) -> dict:
        # Worker processes re-open the memory map instead of pickling it.
        return {**self.__dict__, "_tokens": None}


def collate_blocks(blocks: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stacks blocks into ``{"input_ids": [B, T], "labels": [B, T]}``; labels are input_ids (see module doc)."""
    input_ids = torch.stack(list(blocks))
    return {"input_ids": input_ids, "labels": input_ids}
