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


def test_accumulation_dtype_helper():
    assert _common.acc_dtype(torch.zeros(1, dtype=torch.bfloat16), torch.float16) == torch.float32
    assert _common.acc_dtype(torch.zeros(1), torch.zeros(1, dtype=torch.float64)) == torch.float64
    assert _common.tl_dtype(torch.float32) == tl.float32 and _common.tl_dtype(torch.float64) == tl.float64


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


class _OnCuda1(torch.Tensor):
    """A CPU tensor that reports cuda:1, to see which device the launch helper enters."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_launch_enters_the_tensors_device_and_sets_fp_fusion(monkeypatch):
    entered = []

    class _Guard:
        def __init__(self, dev):
            entered.append(dev)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    launched = []

    class _Kernel:
        def __getitem__(self, grid):
            return lambda *a, **k: launched.append((grid, a, k))

    monkeypatch.setattr(torch.cuda, "device", _Guard)
    monkeypatch.delenv("TRITON_DEFAULT_FP_FUSION", raising=False)
    x = torch.zeros(3).as_subclass(_OnCuda1)
    _common.launch(_Kernel(), (2,), 7, x, BLOCK=4)
    assert entered == [torch.device("cuda", 1)] and launched == [((2,), (7, x), {"BLOCK": 4})]
    assert os.environ["TRITON_DEFAULT_FP_FUSION"] == "1"
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")      # a user's explicit choice is kept
    _common.launch(_Kernel(), (1,), torch.zeros(1))
    assert os.environ["TRITON_DEFAULT_FP_FUSION"] == "0" and len(entered) == 1


def test_kernel_files_share_one_skeleton():
    """File name = op name (or an alias in the file), nano4d::<op> / nano4d::<op>_backward, *_ptr pointers."""
    import importlib
    import inspect
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    for mod_name, op in (("deform_attn", "deform_attn"), ("patch_attn", "patch_attention"),
                         ("sdf_render", "render_sdf")):
        mod = importlib.import_module(f"kernels.{mod_name}")
        assert getattr(mod, mod_name) is getattr(mod, op)
        assert hasattr(torch.ops.nano4d, op) and hasattr(torch.ops.nano4d, op + "_backward")
        for name, obj in vars(mod).items():
            if isinstance(obj, (JITFunction, InterpretedFunction)) and name.endswith("_kernel"):
                params = inspect.signature(obj.fn).parameters
                ptrs = [p for p in params if p.endswith("_ptr")]
                assert ptrs, name
                assert not [p for p in params if p.isupper() and not p.startswith(("BLOCK", "ACC"))
                            and p not in ("D", "M", "N", "P", "Q", "H", "S", "R", "X", "Y", "Z", "NR", "NF",
                                          "VEC", "IDX64", "HAS_SEG", "EVEN_N", "UPCAST", "IEEE", "CDT", "CHUNK",
                                          "SEG64", "NAN_ROWS", "HAS_W", "CLEAN")], name
