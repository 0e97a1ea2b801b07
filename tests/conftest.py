"""Test setup. Runs before any test module imports ``kernels``.

On a machine without CUDA, Triton kernels run through the interpreter (TRITON_INTERPRET=1) and the
public ops are forced onto the Triton path (NANO4D_FORCE_TRITON=1), so every kernel is exercised on CPU.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Test tensors are tiny: one intra-op thread per test process (and the subprocesses it starts). With pytest -n 2
# on 2 cores, torch's default of one thread per core oversubscribes them and small ops wait in OpenMP barriers.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if ROOT not in sys.path:  # `from tests.aot import ...` works without installing the tests
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

if os.environ["OMP_NUM_THREADS"] == "1":
    torch.set_num_threads(1)

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    # Must be set before triton.language is imported (tests/aot.py compiles in a clean child process).
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("NANO4D_FORCE_TRITON", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=10, **_common)
settings.register_profile("ci", max_examples=10, derandomize=True, print_blob=True, **_common)
settings.register_profile("gpu", max_examples=50, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
