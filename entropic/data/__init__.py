"""Offline-first data: the embedded stdlib corpus, local files, hub datasets, a cached byte-level BPE.

``EntropicDataModule`` is imported lazily, so ``entropic.data`` does not pull in Lightning until needed.
"""

from entropic.data.blocks import TokenBlocks, collate_blocks
from entropic.data.corpus import default_cache_dir, split_documents, stdlib_files
from entropic.data.tokenizer import EOT, load_or_train_bpe, load_pretrained_tokenizer, train_bpe

__all__ = [
    "EOT",
    "EntropicDataModule",
    "TokenBlocks",
    "collate_blocks",
    "default_cache_dir",
    "load_or_train_bpe",
    "load_pretrained_tokenizer",
    "split_documents",
    "stdlib_files",
    "train_bpe",
]


def __getattr__(name: str):
    if name == "EntropicDataModule":
        from entropic.data.datamodule import EntropicDataModule

        return EntropicDataModule
    raise AttributeError(f"module 'entropic.data' has no attribute {name!r}")
