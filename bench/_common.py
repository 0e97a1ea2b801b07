"""Timing and memory helpers shared by the ``bench/<op>.py`` scripts.

Scripts run as ``python bench/<op>.py`` (bench/ is ``sys.path[0]``: ``from _common import ...``); imported as
``bench.<op>`` they use ``from ._common import ...``. Only stdlib and torch are imported here: triton is
imported inside :func:`median_ms` so a script can set ``TRITON_INTERPRET`` before triton is first loaded.
"""
from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, cuda: bool, reps: int = 2, warmup: int = 25, rep: int = 100) -> float:
    """Median wall time of ``fn()`` in ms.

    CUDA: ``triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")`` (warmup / rep are
    milliseconds of run time). CPU: one warm-up call (interpreter / first-call costs), then the median of
    ``reps`` ``time.perf_counter`` measurements.
    """
    if cuda:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def peak_mib(fn, cuda: bool) -> float:
    """Peak CUDA memory allocated during one ``fn()`` above what was allocated before it, in MiB.

    NaN on CPU (no CUDA caching allocator to ask).
    """
    if not cuda:
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def fmt_mib(m: float, na: str = "n/a") -> str:
    """A :func:`peak_mib` value for a table cell: whole MiB, ``na`` for NaN (CPU)."""
    return na if m != m else f"{m:.0f}"


def print_header(op: str, cuda: bool) -> None:
    """The first lines of a benchmark table: op, date, device and torch/triton versions."""
    import triton
    dev_name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter: times are NOT kernel speed)"
    print(f"# {op} benchmark  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"device: {dev_name}; torch {torch.__version__}; triton {triton.__version__}\n")
