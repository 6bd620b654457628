"""One recorder per model collects the per-row attention entropies of each forward, by layer.

Attention layers that run :func:`entropic.ops.entropic_attention` (our models, and Hugging Face models switched
to the ``"entropic"`` attention implementation) call :func:`record_row_entropy` with their [B, H, T] row
entropies. The call reaches the :class:`EntropyRecorder` of every model whose forward is running (a forward
pre-hook opens the recorder, a forward hook closes it), so collecting a forward's entropies is one attribute read:
no walk over the modules, and nothing stored on the attention modules.

The recorder keeps the tensors of the last forward with their autograd graph, so a penalty built from them
back-propagates into the attention. It is not copied: ``copy.deepcopy(model)`` (EMA, SWA) and pickling give the
copy a fresh, empty recorder of its own.
"""

from __future__ import annotations

import contextvars
import weakref
from typing import Any

import torch
from torch import nn

__all__ = [
    "NATIVE_RECORDING_ATTR",
    "RECORDER_ATTR",
    "EntropyRecorder",
    "attach_recorder",
    "clear_row_entropies",
    "collect_row_entropies",
    "find_recorder",
    "record_row_entropy",
]

RECORDER_ATTR = "entropic_recorder"
"""Attribute under which a model holds its :class:`EntropyRecorder`."""

NATIVE_RECORDING_ATTR = "records_attention_entropy"
"""Class attribute: True on models whose attention always runs the entropic op (no switching needed)."""

_ACTIVE: contextvars.ContextVar[tuple[EntropyRecorder, ...]] = contextvars.ContextVar("entropic_recorders", default=())


class EntropyRecorder:
    """The row entropies of a model's last forward: one [B, H, T] fp32 tensor (nats, with grad) per layer."""

    def __init__(self) -> None:
        self._entropies: list[torch.Tensor] = []
        self._modules: list[weakref.ref[nn.Module]] = []
        self._pending: list[tuple[int, int, torch.Tensor, weakref.ref[nn.Module]]] = []
        self._tokens: list[contextvars.Token] = []

    # A copy of the model (EMA/SWA, pickling) gets an empty recorder: the tensors belong to this model's graph.
    def __deepcopy__(self, memo: dict[int, Any]) -> EntropyRecorder:
        return EntropyRecorder()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    def begin(self) -> None:
        """Opens a forward (nested calls of the same model, e.g. a wrapped inner model, count once)."""
        if not self._tokens:
            self._pending = []
        self._tokens.append(_ACTIVE.set((*_ACTIVE.get(), self)))

    def end(self) -> None:
        """Closes a forward; the layers recorded since :meth:`begin` become :attr:`entropies`, in layer order."""
        if not self._tokens:
            return
        _ACTIVE.reset(self._tokens.pop())
        if not self._tokens:
            ordered = sorted(self._pending, key=lambda item: (item[0], item[1]))
            self._entropies = [entropy for _, _, entropy, _ in ordered]
            self._modules = [module for _, _, _, module in ordered]
            self._pending = []

    def add(self, module: nn.Module, row_entropy: torch.Tensor) -> None:
        layer = getattr(module, "layer_idx", None)
        order = len(self._pending)
        self._pending.append((order if layer is None else int(layer), order, row_entropy, weakref.ref(module)))

    @property
    def entropies(self) -> list[torch.Tensor]:
        """The last forward's row entropies, one [B, H, T] tensor per attention layer in layer order."""
        return list(self._entropies)

    def modules(self) -> list[nn.Module]:
        """The attention modules that recorded in the last forward, in layer order."""
        return [m for m in (ref() for ref in self._modules) if m is not None]

    def clear(self) -> None:
        """Drops the stored entropies and the autograd graph they keep alive."""
        self._entropies, self._modules = [], []


def _open(module: nn.Module, args: Any) -> None:
    getattr(module, RECORDER_ATTR).begin()


def _close(module: nn.Module, args: Any, output: Any) -> None:
    getattr(module, RECORDER_ATTR).end()


def attach_recorder(model: nn.Module) -> EntropyRecorder:
    """Gives ``model`` a recorder that collects the entropies of each of its forwards (idempotent).

    Returns:
        The model's :class:`EntropyRecorder`.
    """
    recorder = getattr(model, RECORDER_ATTR, None)
    if isinstance(recorder, EntropyRecorder):
        return recorder
    recorder = EntropyRecorder()
    object.__setattr__(model, RECORDER_ATTR, recorder)  # a plain attribute, not a submodule or state
    model.register_forward_pre_hook(_open)
    model.register_forward_hook(_close, always_call=True)
    return recorder


def find_recorder(model: nn.Module) -> EntropyRecorder | None:
    """The recorder of ``model`` or of its outermost submodule that has one (a walk: call it once, keep the result)."""
    for module in model.modules():
        recorder = getattr(module, RECORDER_ATTR, None)
        if isinstance(recorder, EntropyRecorder):
            return recorder
    return None


def record_row_entropy(module: nn.Module, row_entropy: torch.Tensor) -> None:
    """Hands ``row_entropy`` ([B, H, T]) of attention layer ``module`` to the recorders of the running forward."""
    for recorder in _ACTIVE.get():
        recorder.add(module, row_entropy)


def collect_row_entropies(model: nn.Module) -> list[torch.Tensor]:
    """Row entropies of ``model``'s last forward, one [B, H, T] tensor per attention layer, in layer order.

    Returns an empty list when ``model`` has no recorder or no layer has run the entropic attention yet.
    """
    recorder = find_recorder(model)
    return [] if recorder is None else recorder.entropies


def clear_row_entropies(model: nn.Module) -> None:
    """Drops the stored entropies of ``model``'s recorder (and the autograd graphs they keep alive)."""
    recorder = find_recorder(model)
    if recorder is not None:
        recorder.clear()
