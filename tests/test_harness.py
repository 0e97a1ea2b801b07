"""The shared test harness: tolerance rule, dispatch predicate, validation helpers, interpreter."""
import os

import pytest
import torch
import triton
import triton.language as tl

from kernels import _common
from tests.tolerance import assert_close_fa


def test_tolerance_rule_accepts_and_rejects():
    ref64 = torch.linspace(0, 1, 100, dtype=torch.float64)
    ref_lo = ref64.to(torch.bfloat16).double()
    good = ref64.to(torch.bfloat16)
    assert_close_fa(good, ref64, ref_lo, atol=0.0)
    bad = good.double().clone()
    bad[37] += 0.5
    with pytest.raises(AssertionError, match=r"worst at \(37,\)"):
        assert_close_fa(bad, ref64, ref_lo, atol=1e-3)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_fa(torch.full((3,), float("nan")), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(AssertionError, match="shape"):
        assert_close_fa(torch.zeros(2), torch.zeros(3, dtype=torch.float64))


def test_dispatch_predicate(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv("NANO4D_FORCE_TRITON", "0")
    assert not _common.use_triton(x)
    monkeypatch.setenv("NANO4D_FORCE_TRITON", "1")
    assert _common.use_triton(x)


def test_validation_messages_name_the_argument():
    x = torch.zeros(2, 3)
    _common.check_tensor("x", x, ndim=2, dtypes=(torch.float32,), shape=(2, None), last_contiguous=True)
    with pytest.raises(ValueError, match="means: expected 3 dims"):
        _common.check_tensor("means", x, ndim=3)
    with pytest.raises(ValueError, match=r"quats: expected shape \(2, 4\)"):
        _common.check_tensor("quats", x, shape=(2, 4))
    with pytest.raises(ValueError, match="value: dtype int64 not supported"):
        _common.check_tensor("value", x.long(), dtypes=_common.FLOAT_DTYPES)
    with pytest.raises(ValueError, match="q: last dimension must be contiguous"):
        _common.check_tensor("q", x.t(), last_contiguous=True)
    with pytest.raises(ValueError, match="k: on device meta"):
        _common.check_same_device(q=x, k=torch.zeros(2, device="meta"))
    with pytest.raises(ValueError, match="t: contains NaN"):
        _common.check_finite("t", torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="pairs: 3000000000 elements exceed"):
        _common.check_index_range("pairs", 3_000_000_000)
    with pytest.raises(ValueError, match="expected a torch.Tensor"):
        _common.check_tensor("x", [1, 2])


def test_block_heuristic():
    assert _common.next_pow2(1) == 1 and _common.next_pow2(24) == 32 and _common.next_pow2(64) == 64
    assert _common.pick_block(5, lo=16, hi=128) == 16
    assert _common.pick_block(1000, lo=16, hi=128) == 128


@triton.jit
def _axpy_kernel(x_ptr, y_ptr, out_ptr, a, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=m).to(tl.float32)
    tl.store(out_ptr + offs, (a * x + y).to(out_ptr.dtype.element_ty), mask=m)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter setup")
def test_interpreter_runs_kernels_on_cpu():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    x, y = torch.randn(300), torch.randn(300)
    out = torch.empty_like(x)
    _axpy_kernel[(triton.cdiv(300, 128),)](x, y, out, 2.0, 300, BLOCK=128)
    torch.testing.assert_close(out, 2 * x + y)
