"""Peak extra host memory of a call, from the kernel's resident-set high-water mark.

Linux only: writing 5 to /proc/self/clear_refs resets VmHWM, so the peak
measured is that of `fn` alone, minus what was resident before it ran. Large
torch CPU buffers are mmap'd and returned on free, so temporaries show up.
"""
from __future__ import annotations

import gc
from typing import Callable


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Bytes of host memory `fn` needed beyond what was resident when it started."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    out = fn()
    peak = _status_kb("VmHWM")
    del out
    return max(0, peak - before) * 1024
