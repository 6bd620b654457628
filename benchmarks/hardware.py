"""Hardware description shared by the benchmark scripts (imported from their own directory)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows, else "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def rss_status() -> dict[str, int]:
    """This process's resident set now (``VmRSS``) and its peak since the last reset (``VmHWM``), in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) * 1024
    return out


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS counter (``VmHWM``) to the current RSS; False where /proc does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


PINNED_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
"""glibc settings under which RSS follows live tensor bytes: every block above 64 KiB is mmap-ed and unmapped when
freed (no adaptive threshold, no arena high-water mark). They must be in the environment when the process starts."""
