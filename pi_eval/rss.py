"""Peak memory of the current process (the ``peak RSS`` each party reports)."""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's own memory so far, in bytes.

    Linux: ``VmHWM`` of ``/proc/self/status``.  Not ``getrusage``'s ``ru_maxrss``: Linux carries that across
    ``fork`` + ``exec``, so a server spawned by a 1.4 GB test process would report the parent's 1.4 GB.
    Elsewhere ``ru_maxrss`` (KiB; bytes on macOS).  Children are not included: a spawned server reports its own.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
