"""The ahead-of-time compile helper compiles real kernels for sm_80/sm_90 and can fail."""
import pytest
import triton
import triton.language as tl

from tests.aot import AOTError, aot_compile


@triton.jit
def _double(x):
    return x * 2.0


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, _double(tl.load(x_ptr + offs, mask=m)), mask=m)


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    a = tl.load(a_ptr + rm[:, None] * BK + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * BN + rn[None, :])
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], tl.dot(a, b))


@triton.jit
def _rowsum_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    # uses Triton's own @jit standard library (tl.sum, tl.sigmoid): must compile from an interpreted session
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + tl.program_id(0) * n + offs, mask=offs < n, other=0.0)
    tl.store(y_ptr + tl.program_id(0), tl.sum(tl.where(offs < n, tl.sigmoid(x), 0.0), axis=0))


@triton.jit
def _broken_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)  # BLOCK=100 is not a power of two: the compiler rejects it
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1)


SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}


def test_compiles_for_sm90_and_sm80():
    out = aot_compile(_scale_kernel, SIG, {"BLOCK": 256})
    assert set(out) == {90, 80}
    for compiled in out.values():
        assert compiled.asm["cubin"] and "ld.global" in compiled.asm["ptx"]
        assert compiled.metadata.shared >= 0


def test_compiles_kernels_using_the_triton_standard_library():
    out = aot_compile(_rowsum_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                      {"BLOCK": 128})
    assert all(c.asm["cubin"] for c in out.values())


def test_interpreter_still_runs_the_same_kernel():
    import torch
    x = torch.randn(3, 50)
    y = torch.empty(3)
    _rowsum_kernel[(3,)](x, y, 50, BLOCK=64)
    torch.testing.assert_close(y, torch.sigmoid(x).sum(1))


def test_reports_shared_memory_of_a_dot():
    out = aot_compile(_dot_kernel, {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32",
                                    "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"},
                      {"BM": 64, "BN": 64, "BK": 64})
    assert out[90].metadata.shared > 0


def test_fails_on_a_kernel_that_does_not_compile():
    with pytest.raises(AOTError, match="compile for sm_90 failed"):
        aot_compile(_broken_kernel, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 100})


def test_fails_when_shared_memory_exceeds_the_limit():
    sig = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}
    const = {"BM": 64, "BN": 64, "BK": 64}
    used = aot_compile(_dot_kernel, sig, const, targets=(80,))[80].metadata.shared
    assert used > 0
    # the same kernel against a device with less shared memory than it needs must fail
    with pytest.raises(AOTError, match=f"sm_80 needs {used} B shared memory > limit {used - 1} B"):
        aot_compile(_dot_kernel, sig, const, targets=(80,), shared_limit={80: used - 1})


def test_captured_launch_compiles_with_the_jits_specialization():
    # the JIT turns a 16-aligned pointer / an int divisible by 16 into divisibility hints and n == 1
    # into a constant: the vectorized loads only exist in the specialized code
    import torch
    from tests.aot import aot_compile_launch, capture_launches
    x = torch.empty(16384, device="meta")
    y = torch.empty(16384, device="meta")
    with capture_launches() as launches:
        _scale_kernel[(16,)](x, y, 16384, BLOCK=1024)
        _scale_kernel[(16,)](x[1:], y[1:], 16383, BLOCK=1024)
    assert len(launches) == 2 and launches[0].grid == (16,)
    aligned = aot_compile_launch(launches[0], targets=(90,))[90].asm["ptx"]
    unaligned = aot_compile_launch(launches[1], targets=(90,))[90].asm["ptx"]
    assert "ld.global.v4" in aligned
    assert "ld.global.v4" not in unaligned
    # the signature path without divisibility hints cannot vectorize either
    plain = aot_compile(_scale_kernel, SIG, {"BLOCK": 1024}, targets=(90,), attrs={})[90].asm["ptx"]
    assert "ld.global.v4" not in plain


def test_capture_runs_nothing_and_restores_launching():
    import torch
    x = torch.zeros(3, 50)
    y = torch.full((3,), 7.0)
    from tests.aot import capture_launches
    with capture_launches() as launches:
        _rowsum_kernel[(3,)](x, y, 50, BLOCK=64)
    assert len(launches) == 1 and torch.equal(y, torch.full((3,), 7.0))
    _rowsum_kernel[(3,)](x, y, 50, BLOCK=64)
    torch.testing.assert_close(y, torch.full((3,), 25.0))


def test_stats_report_registers_and_spills():
    from tests.aot import aot_compile_launch, capture_launches
    import torch
    with capture_launches() as launches:
        _scale_kernel[(16,)](torch.empty(64, device="meta"), torch.empty(64, device="meta"), 64, BLOCK=64)
    md = aot_compile_launch(launches[0], targets=(90,), stats=True)[90].metadata
    assert 0 < md.regs <= 255 and md.spill_stores == 0 and md.stack == 0
