"""The result file of ``python -m pi_eval bench``: rewritten atomically as the run goes, so a stopped run leaves one.

``DIR/bench.json`` lists the architectures asked for, the summary of each one finished (its ``report.json`` is
complete), and for the architecture in progress the progress lines so far (one per layer reached).  It is written on
the first progress line, after each progress line and architecture, and at the end with ``"complete": true``; a run
stopped by SIGINT / SIGTERM or an error says so in ``stopped``.  Every write goes through
:func:`entropic.io.atomic_write_json`, so a reader (or a run killed mid-write) sees the previous or the new file,
never a partial one.  Nothing is written for a run that fails before its first progress line (e.g. a bad checkpoint
or a circuit the parameter set cannot carry: refused before any key exists).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from entropic.io import atomic_write_json

RESULT_FILE = "bench.json"


class BenchStopped(KeyboardInterrupt):
    """Raised in the main thread when the bench receives SIGTERM (SIGINT raises KeyboardInterrupt as usual)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM raises :class:`BenchStopped` while inside (main thread only; elsewhere a no-op), so ``finally``
    blocks run: the spawned TCP server is stopped and the result file records the stop."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise BenchStopped(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class BenchSummary:
    """The figures ``bench`` prints for one architecture (from its report)."""

    bytes_up: int
    bytes_down: int
    round_trips: int
    setup_bytes: int
    max_abs_logit_error: float | None  # None: the client of ``--connect`` holds no model
    top1_agreement: float | None
    slot_use: float | None
    slot_use_bound: float | None
    harness_overhead: float | None
    wan_online_s: float  # modelled on the WAN profile
    online_wall_s: float
    architecture: str | None
    peak_rss_gb: dict[str, float | None]  # client, server
    report: str  # path of its report.json

    @classmethod
    def from_report(cls, rep: dict, path: Path) -> BenchSummary:
        keys = ("bytes_up", "bytes_down", "round_trips", "setup_bytes", "max_abs_logit_error", "top1_agreement")
        keys += ("slot_use", "slot_use_bound", "harness_overhead", "online_wall_s")
        peak = rep["peak_rss"]
        return cls(
            **{k: rep[k] for k in keys},
            wan_online_s=rep["latency"]["WAN"]["online_s"],
            architecture=rep["meta"].get("architecture"),
            peak_rss_gb={
                k: None if peak[f"{k}_bytes"] is None else peak[f"{k}_bytes"] / 1e9 for k in ("client", "server")
            },
            report=str(path),
        )


@dataclass
class FinishedArchitecture:
    architecture: str  # the preset asked for, or the checkpoint / share name
    report: str  # path of its report.json
    summary: BenchSummary


@dataclass
class InProgress:
    architecture: str
    started_at: float  # time.time()
    progress: list[str] = field(default_factory=list)


@dataclass
class BenchResults:
    """What ``bench.json`` holds; :meth:`save` writes it atomically to ``path``."""

    path: Path
    requested: list[str]
    finished: list[FinishedArchitecture] = field(default_factory=list)
    current: InProgress | None = None
    complete: bool = False
    stopped: str | None = None  # "SIGTERM", "SIGINT" or "error: ..." for a run that did not complete

    @classmethod
    def in_dir(cls, out_dir: str | Path, requested: list[str]) -> BenchResults:
        return cls(Path(out_dir) / RESULT_FILE, list(requested))

    def start(self, architecture: str) -> None:
        """An architecture begins; nothing is written until its first progress line."""
        self.current = InProgress(architecture, time.time())

    def progress(self, line: str) -> None:
        if self.current is not None:
            self.current.progress.append(line)
        self.save()

    def finish(self, report: Path, summary: BenchSummary) -> None:
        name = self.current.architecture if self.current is not None else "?"
        self.finished.append(FinishedArchitecture(name, str(report), summary))
        self.current = None
        self.save()

    def stop(self, exc: BaseException) -> None:
        """Records why the run ended early (only once something was written: a run refused up front leaves no file)."""
        if isinstance(exc, BenchStopped):
            self.stopped = str(exc)
        elif isinstance(exc, KeyboardInterrupt):
            self.stopped = "SIGINT"
        else:
            self.stopped = f"error: {type(exc).__name__}: {exc}"
        if self.path.exists():
            self.save()

    def done(self) -> None:
        self.complete = True
        self.save()

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("path")
        d["pending"] = self.requested[len(self.finished) + (self.current is not None) :]
        return d

    def save(self) -> Path:
        return atomic_write_json(self.path, self.to_dict())
