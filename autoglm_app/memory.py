"""Process memory, read one way everywhere (the Model panel, a request's stats, the load test, the
fused-expert measurement): psutil for the current figures; the kernel's high-water mark for the peak.

psutil reports the resident set (``rss``) and its file-backed and shared part (``shared``), so the
anonymous part (the heap: tensors, Python objects) is ``rss - shared``. It has no peak on Linux, so
the peak comes from ``getrusage`` (``ru_maxrss``, KiB on Linux), which is the same as VmHWM.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import resource

import psutil

log = logging.getLogger(__name__)


def rss_bytes(pid: int | None = None) -> int | None:
    """Resident memory of a process (None: this one); None when the process is gone or unreadable."""
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.Error, OSError):
        return None


def tree_rss_bytes(pid: int | None = None) -> int | None:
    """Resident memory of a process and its descendants (a server and its engine process); None when the
    process is gone. Shared pages are counted once per process, so this can exceed the memory in use."""
    try:
        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        children = proc.children(recursive=True)
    except (psutil.Error, OSError):
        return None
    for child in children:
        try:
            total += child.memory_info().rss
        except (psutil.Error, OSError):  # it ended meanwhile
            pass
    return int(total)


def anon_rss_bytes(pid: int | None = None) -> int | None:
    """The anonymous part of the resident memory (heap, tensors): rss less its file-backed and shared pages."""
    try:
        info = psutil.Process(pid).memory_info()
    except (psutil.Error, OSError):
        return None
    return int(info.rss - getattr(info, "shared", 0))


def peak_rss_bytes() -> int:
    """The highest resident memory this process has had (VmHWM)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def return_free_memory() -> bool:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``), which glibc keeps otherwise:
    freed large temporaries (bitsandbytes' dequantized CPU weights, a page's dropped focus detail) leave holes
    the resident memory counts. Measured: a 9B int4 model on the CPU held 4.5 GiB more after one image turn
    than before it (tools.fullsize_cpu); the page's trace budget grew 1.25x its budget (tools.trace_memory).
    False where the C library has no such call (then nothing happens)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def device_memory() -> dict[str, int]:
    """Memory in use now: per GPU (allocated by torch) or, without CUDA, the process RSS."""
    try:
        import torch

        if torch.cuda.is_available():
            return {f"cuda:{d}": int(torch.cuda.memory_allocated(d)) for d in range(torch.cuda.device_count())}
    except Exception:  # no torch or a broken CUDA set-up: fall back to the process
        log.debug("cuda memory query failed", exc_info=True)
    rss = rss_bytes()
    return {"cpu (process RSS)": rss} if rss is not None else {"cpu (peak RSS)": peak_rss_bytes()}
