"""Training batches whose order survives a resume: the position in the epoch is part of the checkpoint.

A plain shuffled ``DataLoader`` restarts its permutation from the seed when a run resumes, so the batches of an
interrupted epoch are partly repeated and partly skipped, and a resume in epoch ``e > 0`` replays epoch 0's order.
Here the permutation of an epoch depends only on ``(seed, epoch)`` (Lightning calls ``sampler.set_epoch`` before
each epoch), and the loader implements ``state_dict``/``load_state_dict``, which Lightning's fit loop saves in every
checkpoint (``loops.fit_loop.state_dict.combined_loader``) and gives back on a mid-epoch resume. The state is the
epoch and the number of batches the training loop has taken from the loader in it; on resume the sampler starts that
many batches into the same permutation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """Shuffles by ``(seed, epoch)``, keeps this rank's share, and can start part-way into one epoch.

    It is a :class:`~torch.utils.data.DistributedSampler`, so Lightning keeps it under DDP instead of putting its own
    sampler in (which would ignore ``seed``); with one process it yields every index. As in Lightning's default
    sampler, with several processes the permutation is padded with repeated indices to a multiple of ``num_replicas``.

    Args:
        dataset: the sized dataset to index.
        seed: seed of the permutations; epoch ``e`` uses ``seed + e``.
        shuffle: False for the natural order.
        num_replicas: number of processes sharing the data (default: the ``torch.distributed`` world size, or 1).
        rank: this process's index among them (default: the ``torch.distributed`` rank, or 0).

    Raises:
        ValueError: ``rank`` is not in ``[0, num_replicas)`` or ``num_replicas < 1``.
    """

    def __init__(
        self,
        dataset: Sized,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas=} and {rank=}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0  # indices of the next epoch's permutation to leave out, then back to 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that remembers how many batches of the current epoch it has handed out.

    Use it with a :class:`ResumableSampler` (and a ``batch_size``); its ``__init__`` is the ``DataLoader``'s, so
    Lightning can rebuild it. The count is taken where the training loop receives each batch, so worker processes
    that load ahead do not inflate it. Iterating is lazy: nothing is drawn from the sampler before the first batch is
    asked for, so Lightning's ``set_epoch``, which comes after it creates the iterator, is always seen.

    With another sampler (for instance the sequential one Lightning puts in for ``overfit_batches``) the state is
    empty and a resume starts the epoch from its beginning.
    """

    _position: tuple[int, int] = (0, 0)  # (epoch, batches handed out in it)
    _pending: tuple[int, int] | None = None  # a loaded position not yet applied

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch": e, "batches": k}``: the training loop has received ``k`` batches of epoch ``e``."""
        if self._sampler() is None:
            return {}
        epoch, batches = self._pending or self._position
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Makes the next iteration continue after the first ``batches`` batches of ``epoch``.

        Raises:
            ValueError: a state that is not ``{"epoch": int >= 0, "batches": int >= 0}``.
        """
        sampler = self._sampler()
        if not state_dict or sampler is None:
            return
        epoch, batches = state_dict.get("epoch"), state_dict.get("batches")
        if not all(isinstance(v, int) and v >= 0 for v in (epoch, batches)):
            raise ValueError(f"expected a state {{'epoch': int >= 0, 'batches': int >= 0}}, got {state_dict!r}")
        if batches >= len(self):  # the epoch was finished: the next one starts from its beginning
            epoch, batches = epoch + 1, 0
        self._pending = (epoch, batches)
        sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        sampler = self._sampler()
        if sampler is None:
            yield from super().__iter__()
            return
        skipped = 0
        if self._pending is not None and self._pending[0] == sampler.epoch:
            skipped = self._pending[1]
            sampler.start = skipped * self.batch_size
        self._pending = None
        self._position = (sampler.epoch, skipped)
        for batches, batch in enumerate(super().__iter__(), start=skipped + 1):
            self._position = (sampler.epoch, batches)
            yield batch

    def _sampler(self) -> ResumableSampler | None:
        """The sampler, if batches are drawn from a :class:`ResumableSampler` in fixed-size batches."""
        return self.sampler if isinstance(self.sampler, ResumableSampler) and self.batch_size is not None else None
