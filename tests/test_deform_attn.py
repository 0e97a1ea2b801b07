"""Multi-scale deformable attention: Triton kernel (interpreted on CPU) vs the grid_sample reference."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from kernels import deform_attn, deform_attn_ref
from tests.tolerance import assert_close_fa

DA = importlib.import_module("kernels.deform_attn")  # the module (the package re-exports the function)

MAP_SIZES = [(1, 1), (3, 7), (5, 2), (2, 9), (4, 4), (7, 3), (6, 5)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def meta(shapes):
    ss = torch.tensor(shapes, dtype=torch.int64).view(-1, 2)
    sizes = ss[:, 0] * ss[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return ss, starts, int(sizes.sum())


def away_from_kinks(loc, shapes, margin=1e-3):
    """Move pixel coordinates (x*W-0.5, y*H-0.5) at least ``margin`` away from integers (the kinks of
    bilinear interpolation and of the map borders); returns fp64."""
    loc = loc.double().clone()
    for m, (hh, ww) in enumerate(shapes):
        for c, n in ((0, ww), (1, hh)):
            pix = loc[..., m, :, c] * n - 0.5
            near = (pix - pix.round()).abs() < margin
            pix = torch.where(near, pix.round() + 2 * margin, pix)
            loc[..., m, :, c] = (pix + 0.5) / n
    return loc


def make_inputs(seed, B, Q, H, D, shapes, P, lo=-0.2, hi=1.2):
    """fp64 inputs: value ~ N(0,1), locations uniform in [lo, hi] away from kinks, softmax weights."""
    gen = torch.Generator().manual_seed(seed)
    ss, starts, S = meta(shapes)
    M = len(shapes)
    value = torch.randn(B, S, H, D, generator=gen, dtype=torch.float64)
    loc = lo + (hi - lo) * torch.rand(B, Q, H, M, P, 2, generator=gen, dtype=torch.float64)
    loc = away_from_kinks(loc, shapes)
    w = torch.randn(B, Q, H, M * P, generator=gen, dtype=torch.float64).softmax(-1).view(B, Q, H, M, P)
    return value, ss, starts, loc, w


def run(fn, value, ss, starts, loc, w, gout=None):
    """Forward (and backward against ``gout``) of ``fn``; returns (out, grads or None)."""
    leaves = [t.detach().clone().requires_grad_(gout is not None) for t in (value, loc, w)]
    out = fn(leaves[0], ss, starts, leaves[1], leaves[2])
    if gout is None:
        return out.detach(), None
    grads = torch.autograd.grad(out, leaves, gout.to(device=out.device, dtype=out.dtype))
    return out.detach(), grads


def check_vs_reference(value64, ss, starts, loc64, w64, dtype, seed=0, backward=True):
    lo = [t.to(dtype) for t in (value64, loc64, w64)]
    hi = [t.double() for t in lo]                      # the same values, in fp64
    gout = None
    if backward:
        B, Q, H, D = lo[1].shape[0], lo[1].shape[1], value64.shape[2], value64.shape[3]
        gout = torch.randn(B, Q, H * D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    out, g = run(deform_attn, lo[0], ss, starts, lo[1], lo[2], gout)
    ref64, g64 = run(deform_attn_ref, *hi[:1], ss, starts, *hi[1:], gout)
    ref_lo, g_lo = run(deform_attn_ref, lo[0], ss, starts, lo[1], lo[2], gout)
    assert out.dtype == dtype
    assert_close_fa(out, ref64, ref_lo, k=2.0, dtype=dtype, name="out")
    if backward:
        for name, a, r, rl in zip(("grad_value", "grad_loc", "grad_weights"), g, g64, g_lo):
            assert a.dtype == dtype, name
            assert_close_fa(a, r, rl, k=3.0, dtype=dtype, name=name)


# ----------------------------------------------------------------------------- properties

@given(B=st.integers(1, 3), Q=st.integers(1, 70), H=st.integers(1, 4), D=st.sampled_from([8, 24, 30, 48, 64]),
       maps=st.lists(st.sampled_from(MAP_SIZES), min_size=1, max_size=4), P=st.integers(1, 8),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_matches_reference(B, Q, H, D, maps, P, dtype, seed):
    # keep each example small for the interpreter: B*H programs, M*P samples per query
    H = min(H, max(1, 6 // B))
    P = min(P, max(1, 12 // len(maps)))
    value, ss, starts, loc, w = make_inputs(seed, B, Q, H, D, maps, P)
    check_vs_reference(value, ss, starts, loc, w, dtype, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fixed_shape_each_dtype(dtype):
    # one deterministic case per dtype (hypothesis may not draw all three in 10 examples)
    value, ss, starts, loc, w = make_inputs(3, 2, 37, 2, 48, [(3, 7), (1, 1), (4, 4)], 3)
    check_vs_reference(value, ss, starts, loc, w, dtype, seed=3)


def test_mixed_dtypes():
    # bf16 value with fp32 locations / weights (what autocast produces): grads keep each input's dtype
    value, ss, starts, loc, w = make_inputs(5, 1, 20, 2, 24, [(5, 2), (2, 9)], 2)
    vb, lf, wf = value.bfloat16(), loc.float(), w.float()
    gout = torch.randn(1, 20, 48, generator=torch.Generator().manual_seed(9)).bfloat16()
    out, (gv, gl, gw) = run(deform_attn, vb, ss, starts, lf, wf, gout)
    ref, (rv, rl, rw) = run(deform_attn_ref, vb.double(), ss, starts, lf.double(), wf.double(), gout)
    assert (out.dtype, gv.dtype, gl.dtype, gw.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)
    # only rounding of the bf16 output / grad_value, the accumulation is fp32
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gv.double(), rv, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gl.double(), rl, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-4)


def test_equals_grid_sample():
    # M = 1, P = 1, weight 1: the op is F.grid_sample of each head's map at the location
    gen = torch.Generator().manual_seed(0)
    B, Q, H, D, Hm, Wm = 2, 9, 3, 5, 6, 7
    maps = torch.randn(B, H, D, Hm, Wm, generator=gen)
    loc = torch.rand(B, Q, H, 1, 1, 2, generator=gen) * 1.4 - 0.2
    value = maps.permute(0, 3, 4, 1, 2).reshape(B, Hm * Wm, H, D)
    w = torch.ones(B, Q, H, 1, 1)
    ss, starts, _ = meta([(Hm, Wm)])
    want = torch.stack([F.grid_sample(maps[:, h], 2 * loc[:, :, h, 0] - 1, mode="bilinear",
                                      padding_mode="zeros", align_corners=False)[..., 0]
                        for h in range(H)], 1)                          # (B, H, D, Q)
    want = want.permute(0, 3, 1, 2).reshape(B, Q, H * D)
    torch.testing.assert_close(deform_attn(value, ss, starts, loc, w), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(deform_attn_ref(value, ss, starts, loc, w), want, rtol=1e-6, atol=1e-6)
    # pixel-centre convention: location ((j+0.5)/W, (i+0.5)/H) returns pixel (i, j) exactly
    i, j = 4, 2
    loc_c = torch.tensor([(j + 0.5) / Wm, (i + 0.5) / Hm]).expand(B, 1, H, 1, 1, 2)
    out = deform_attn(value, ss, starts, loc_c, w[:, :1]).view(B, H, D)
    torch.testing.assert_close(out, maps[:, :, :, i, j])


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("fn", [deform_attn_ref, deform_attn], ids=["reference", "kernel"])
def test_gradcheck_fp64(fn):
    shapes = [(2, 3), (2, 2)]
    value, ss, starts, loc, w = make_inputs(11, 1, 2, 2, 3, shapes, 2, lo=-0.1, hi=1.1)  # 1e-3 px from kinks
    value, loc, w = (t.requires_grad_() for t in (value, loc, w))
    # the interpreter costs ~0.1 s per kernel call: the kernel gets gradcheck's fast mode (random
    # directions: a few calls instead of two per input element); the reference gets the full check
    assert torch.autograd.gradcheck(lambda v, l, a: fn(v, ss, starts, l, a), (value, loc, w),
                                    eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fn is deform_attn)


def test_one_sided_gradients_at_kinks_and_borders():
    # Pixel coordinates exactly on integers (interior kinks, and the borders -1, 0, W-1, W): the
    # location gradient is the right-sided derivative, as in grid_sample. Bilinear sampling is linear
    # in x on [k, k+1) for fixed y, so a forward difference with a small step is exact up to rounding.
    Hm, Wm, D = 4, 8, 6
    ss, starts, S = meta([(Hm, Wm)])
    gen = torch.Generator().manual_seed(2)
    value = torch.randn(1, S, 1, D, generator=gen, dtype=torch.float64)
    xs = torch.tensor([-1.0, 0.0, 1.0, 3.0, 7.0, 8.0, -0.5, 2.25], dtype=torch.float64)   # pixel x
    ys = torch.tensor([1.0, -1.0, 0.0, 3.0, 4.0, 2.0, 1.0, 3.5], dtype=torch.float64)     # pixel y
    Q = xs.numel()
    loc = torch.stack([(xs + 0.5) / Wm, (ys + 0.5) / Hm], -1).view(1, Q, 1, 1, 1, 2)
    w = torch.ones(1, Q, 1, 1, 1, dtype=torch.float64)
    gout = torch.randn(1, Q, D, generator=gen, dtype=torch.float64)
    h = 1e-4
    for c, n in ((0, Wm), (1, Hm)):
        step = torch.zeros_like(loc)
        step[..., c] = h / n                                           # h pixels along x or y
        f0 = (deform_attn_ref(value, ss, starts, loc, w) * gout).sum(-1)
        f1 = (deform_attn_ref(value, ss, starts, loc + step, w) * gout).sum(-1)
        right = ((f1 - f0) / h * n).view(Q)                            # d/dloc = n * d/dpixel
        for fn in (deform_attn, deform_attn_ref):
            _, (_, gl, _) = run(fn, value, ss, starts, loc, w, gout)
            torch.testing.assert_close(gl[..., c].reshape(Q), right, rtol=1e-6, atol=1e-6,
                                       msg=lambda m: f"{fn.__name__} axis {c}: {m}")
    # the kink is real: at x = 1 the left derivative differs from the right one
    f = lambda dx: (deform_attn_ref(value, ss, starts, loc[:, 2:3] + torch.tensor([dx / Wm, 0.0],  # noqa: E731
                                                                                  dtype=torch.float64),
                                    w[:, :1]) * gout[:, 2:3]).sum()
    left, right = (f(0.0) - f(-h)) / h, (f(h) - f(0.0)) / h
    assert abs(left - right) > 1e-3


# ----------------------------------------------------------------------------- edge cases

def test_nonfinite_and_far_locations_contribute_zero_and_read_nothing_outside():
    shapes = [(3, 7), (2, 2)]
    value, ss, starts, loc, w = make_inputs(7, 2, 6, 2, 24, shapes, 3)
    value, loc, w = value.float(), loc.float(), w.float()
    B, S, H, D = value.shape
    bad = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 3.0]
    loc_bad = loc.clone()
    hit = torch.zeros(loc.shape[:-1], dtype=torch.bool)
    for k, val in enumerate(bad):                                     # one bad coordinate per sample
        b, q, h, m, p = k % B, k, k % H, k % 2, k % 3
        loc_bad[b, q, h, m, p, k % 2] = val
        hit[b, q, h, m, p] = True
    # value lives inside a NaN-filled buffer: any read outside its own elements poisons the output
    big = torch.full((B, S + 2, H, D + 3), float("nan"))
    big[:, 1:-1, :, 1:-2] = value
    value_v = big[:, 1:-1, :, 1:-2]
    gout = torch.randn(B, 6, H * D, generator=torch.Generator().manual_seed(1))
    w_zeroed = torch.where(hit, torch.zeros_like(w), w)
    want, (_, want_gl, _) = run(deform_attn_ref, value.double(), ss, starts, loc.double(), w_zeroed.double(), gout)
    for fn in (deform_attn, deform_attn_ref):
        out, (gv, gl, gw) = run(fn, value_v, ss, starts, loc_bad, w, gout)
        assert torch.isfinite(out).all() and torch.isfinite(gv).all() and torch.isfinite(gl).all()
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
        assert (gl[hit] == 0).all() and (gw[hit] == 0).all()
        torch.testing.assert_close(gl[~hit].double(), want_gl[~hit], rtol=1e-4, atol=1e-4)


def test_empty_query_and_batch():
    value, ss, starts, loc, w = make_inputs(0, 2, 4, 2, 8, [(3, 7)], 2)
    for fn in (deform_attn, deform_attn_ref):
        v = value.float().requires_grad_()
        lq = loc[:, :0].float().requires_grad_()
        wq = w[:, :0].float().requires_grad_()
        out = fn(v, ss, starts, lq, wq)
        assert out.shape == (2, 0, 16)
        out.sum().backward()
        assert v.grad is not None and v.grad.shape == v.shape and (v.grad == 0).all()
        assert lq.grad.shape == lq.shape and wq.grad.shape == wq.shape
    out = deform_attn(value[:0].float(), ss, starts, loc[:0].float(), w[:0].float())
    assert out.shape == (0, 4, 16)


def test_non_contiguous_and_expanded_inputs():
    value, ss, starts, loc, w = make_inputs(4, 2, 11, 3, 24, [(3, 7), (5, 2)], 4)
    value, loc, w = value.float(), loc.float(), w.float()
    gout = torch.randn(2, 11, 72, generator=torch.Generator().manual_seed(0))
    want, want_g = run(deform_attn, value, ss, starts, loc, w[..., :1].expand_as(w).contiguous(), gout)
    v_nc = value.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)      # (B, S, H, D), D not innermost
    l_nc = torch.stack([loc, loc], -1)[..., 0]                               # strided view of the same values
    w_ex = w[..., :1].expand_as(w)                                           # stride 0 along P
    assert not v_nc.is_contiguous() and not l_nc.is_contiguous() and w_ex.stride(-1) == 0
    g_nc = gout.transpose(0, 1).contiguous().transpose(0, 1)               # non-contiguous grad_out
    out, g = run(deform_attn, v_nc, ss, starts, l_nc, w_ex, g_nc)
    torch.testing.assert_close(out, want)
    for a, b in zip(g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_backward_is_deterministic():
    value, ss, starts, loc, w = make_inputs(8, 1, 40, 2, 30, [(2, 2), (3, 7)], 4, lo=0.2, hi=0.8)
    gout = torch.randn(1, 40, 60, generator=torch.Generator().manual_seed(3))
    _, g1 = run(deform_attn, value.float(), ss, starts, loc.float(), w.float(), gout)
    _, g2 = run(deform_attn, value.float(), ss, starts, loc.float(), w.float(), gout)
    for a, b in zip(g1, g2):   # many samples hit the same corners: atomics only may reorder sums
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise_value_error():
    value, ss, starts, loc, w = make_inputs(0, 1, 3, 2, 8, [(3, 7), (2, 2)], 2)
    value, loc, w = value.float(), loc.float(), w.float()
    values = [   # map metadata values: checked by the public op (one host copy), not by the trusting launcher
        (dict(level_start_index=torch.tensor([0, 20])), "level_start_index"),
        (dict(spatial_shapes=torch.tensor([[3, 7], [2, 3]])), "value: S"),
        (dict(spatial_shapes=torch.tensor([[3, 7], [0, 2]])), "spatial_shapes"),
        (dict(spatial_shapes=[(3, 7), (2, 3)], level_start_index=None), "value: S"),
        (dict(spatial_shapes=[(3, 7), (2, 2)], level_start_index=[0, 20]), "level_start_index"),
        (dict(spatial_shapes=[(3, 7), (0, 2)], level_start_index=None), "spatial_shapes"),
        (dict(spatial_shapes=[(3, 7, 1)], level_start_index=None), "spatial_shapes"),
        (dict(spatial_shapes=["ab"], level_start_index=None), "spatial_shapes"),
        (dict(spatial_shapes=[], level_start_index=None), "spatial_shapes"),
    ]
    meta = [
        (dict(spatial_shapes=ss.float()), "spatial_shapes"),
        (dict(spatial_shapes=ss[:, :1]), "spatial_shapes"),
        (dict(level_start_index=starts[:1]), "level_start_index"),
        (dict(value=value[0]), "value"),
        (dict(value=value.to(torch.int32)), "value"),
        (dict(sampling_locations=loc[..., :1]), "sampling_locations"),
        (dict(sampling_locations=loc[:, :, :1]), "sampling_locations"),
        (dict(attention_weights=w[..., :1]), "attention_weights"),
        (dict(attention_weights=w.to("meta")), "attention_weights"),
        (dict(sampling_locations=[0.5, 0.5]), "sampling_locations"),
        # metadata on another device than value: never read as uninitialized / foreign memory
        (dict(spatial_shapes=ss.to("meta")), "spatial_shapes"),
        (dict(level_start_index=starts.to("meta")), "level_start_index"),
    ]
    fns = [deform_attn, lambda **kw: deform_attn(**kw, validate=False), DA._deform_attn_fwd]
    for i, fn in enumerate(fns):
        for kw, msg in (values if i == 0 else []) + [c for c in meta if i < 2 or isinstance(
                c[0].get("spatial_shapes", ss), torch.Tensor)]:
            args = dict(value=value, spatial_shapes=ss, level_start_index=starts, sampling_locations=loc,
                        attention_weights=w)
            args.update(kw)
            with pytest.raises(ValueError, match=msg):
                fn(**args)


@pytest.mark.parametrize("force", ["1", "0"], ids=["kernel", "reference"])
def test_metadata_on_another_device_both_paths(force, monkeypatch):
    monkeypatch.setenv("NANO4D_FORCE_TRITON", force)
    value, ss, starts, loc, w = make_inputs(0, 1, 3, 2, 8, [(3, 7), (2, 2)], 2)
    for kw, msg in ((dict(spatial_shapes=ss.to("meta")), "spatial_shapes"),
                    (dict(level_start_index=starts.to("meta")), "level_start_index")):
        args = dict(value=value.float(), spatial_shapes=ss, level_start_index=starts,
                    sampling_locations=loc.float(), attention_weights=w.float())
        args.update(kw)
        for validate in (True, False):
            with pytest.raises(ValueError, match=msg):
                deform_attn(**args, validate=validate)


def test_python_int_shapes_and_trusted_path_make_no_host_sync(monkeypatch):
    """Python-int shapes (checked on the host) and validate=False read no tensor value on the host:
    zero Tensor.item / tolist / __bool__ / ... calls per forward + backward."""
    from tests.sync_count import count_host_syncs
    shapes = [(3, 7), (2, 2)]
    value, ss, starts, loc, w = make_inputs(0, 1, 5, 2, 8, shapes, 2)
    leaves = [t.float().requires_grad_() for t in (value, loc, w)]
    gout = torch.randn(1, 5, 16)
    want, want_g = run(deform_attn, value.float(), ss, starts, loc.float(), w.float(), gout)
    for call in (lambda: deform_attn(leaves[0], shapes, None, leaves[1], leaves[2]),
                 lambda: deform_attn(leaves[0], ss, starts, leaves[1], leaves[2], validate=False)):
        with count_host_syncs() as syncs:
            out = call()
            g = torch.autograd.grad(out, leaves, gout)
        assert syncs.count == 0, syncs.calls
        torch.testing.assert_close(out, want)
        for a, b in zip(g, want_g):
            torch.testing.assert_close(a, b)
    with count_host_syncs() as syncs:   # the default tensor path: one small copy, forward only
        deform_attn(leaves[0], ss, starts, leaves[1], leaves[2]).sum().backward()
    assert syncs.count == 1, syncs.calls


def test_cpu_dispatch_uses_reference(monkeypatch):
    def no_kernel(*args):
        raise AssertionError("the kernel launcher ran on the CPU path")

    monkeypatch.setenv("NANO4D_FORCE_TRITON", "0")
    monkeypatch.setattr(DA, "_deform_attn_fwd", no_kernel)
    value, ss, starts, loc, w = make_inputs(1, 1, 5, 1, 12, [(3, 7), (2, 2)], 2)
    out = deform_attn(value.float(), ss, starts, loc.float(), w.float())
    torch.testing.assert_close(out, deform_attn_ref(value.float(), ss, starts, loc.float(), w.float()))
    with pytest.raises(ValueError, match="level_start_index"):
        deform_attn(value.float(), ss, starts.flip(0), loc.float(), w.float())
    monkeypatch.setenv("NANO4D_FORCE_TRITON", "1")
    with pytest.raises(AssertionError, match="kernel launcher ran"):
        deform_attn(value.float(), ss, starts, loc.float(), w.float())


def test_head_dim_above_one_launch_runs_in_chunks():
    # D = 300 > MAX_D: two launches of 150 channels; location / weight grads summed over the chunks
    assert DA._d_chunks(300) == [(0, 150), (150, 300)] and DA._d_chunks(DA.MAX_D) == [(0, DA.MAX_D)]
    value, ss, starts, loc, w = make_inputs(6, 1, 9, 2, 300, [(3, 7), (2, 2)], 2)
    check_vs_reference(value, ss, starts, loc, w, torch.float32, seed=6)


def test_opcheck():
    value, ss, starts, loc, w = make_inputs(2, 1, 5, 2, 8, [(3, 7), (1, 1)], 2)
    args = (value.float().requires_grad_(), ss, starts, loc.float().requires_grad_(), w.float().requires_grad_())
    torch.library.opcheck(torch.ops.nano4d.deform_attn.default, args)


# ----------------------------------------------------------------------------- ahead-of-time compile

# Every BLOCK_D bucket of the launcher's GPU heuristic (16, 32, 64, 128, 256) in bf16 for sm_90 and
# sm_80; fp32 and fp16 (which only change the load/convert instructions) at GeoLRM's D = 48 on sm_90.
# ~1 s of CPU per compile: this matrix is what fits in the file's test budget.
AOT_CASES = [(8, torch.bfloat16), (24, torch.bfloat16), (48, torch.bfloat16), (100, torch.bfloat16),
             (256, torch.bfloat16), (48, torch.float32), (48, torch.float16)]


def capture_fwd_bwd(D, dtype, H=16):
    """The launches one forward + backward makes (GPU block sizes; nothing runs), at the models' head
    count so the strides the JIT specializes on are the models' (H * D)."""
    from tests.aot import capture_launches
    value, ss, starts, loc, w = make_inputs(0, 1, 8, H, D, [(3, 7), (2, 2)], 2)
    leaves = [t.to(dtype).requires_grad_() for t in (value, loc, w)]
    with capture_launches() as launches:
        out = deform_attn(leaves[0], ss, starts, leaves[1], leaves[2])
        out.backward(torch.ones_like(out))
    assert [x.name for x in launches] == ["_deform_attn_fwd_kernel", "_deform_attn_bwd_kernel"]
    return launches


@pytest.mark.parametrize("D,dtype", AOT_CASES, ids=[f"D{d}-{str(t)[6:]}" for d, t in AOT_CASES])
def test_aot_compile(D, dtype):
    """Forward and backward kernels as the JIT compiles them at the launcher's real GPU configuration."""
    from tests.aot import aot_compile_launch
    targets = (90, 80) if dtype == torch.bfloat16 else (90,)
    import re
    fwd, bwd = capture_fwd_bwd(D, dtype)
    for launch in (fwd, bwd):
        out = aot_compile_launch(launch, targets=targets, stats=True)
        for arch, compiled in out.items():
            md = compiled.metadata
            print(f"{launch.name} {dtype} D={D} {launch.kwargs} sm_{arch}: shared {md.shared} B, "
                  f"{md.regs} regs, spills {md.spill_stores}/{md.spill_loads} B")
        ptx = out[90].asm["ptx"]
        if D % 8 == 0:      # a corner's channels are 16-byte vector loads (D = 24 included)
            assert re.search(r"ld\.global(\.\w+)*\.v4", ptx), launch.name
        if D in (24, 48):   # the models' head dims: no register spills
            assert out[90].metadata.spill_stores == 0, launch.name
    # grad_value really is accumulated with global atomics, all relaxed (no fence per atomic)
    atomics = re.findall(r"\b(?:red|atom)\.[\w.]+", ptx)
    assert atomics and all(".relaxed" in a for a in atomics), atomics


def test_block_sizes_cover_every_bucket():
    # the AOT cases above hit every BLOCK_D the GPU heuristic can return for D in 1..MAX_D
    buckets = {DA._block_sizes(d, 20000, interpret=False)[:2] for d in range(1, DA.MAX_D + 1)}
    assert buckets == {DA._block_sizes(d, 20000, interpret=False)[:2] for d, _ in AOT_CASES}
    # the GPU block does not depend on Q (only the interpreter's does)
    assert DA._block_sizes(48, 1, interpret=False) == DA._block_sizes(48, 10**6, interpret=False)


# ----------------------------------------------------------------------------- GPU (real sizes)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["geolrm", "proposal", "mim4d"])
def test_gpu_real_sizes(case, dtype):
    B, Q, H, D, shapes, P = {
        "geolrm": (8, 2048, 16, 48, [(112, 112), (64, 64)], 8),
        "proposal": (8, 2048, 16, 24, [(112, 112), (64, 64)], 8),
        "mim4d": (2, 4096, 4, 32, [(128, 128)], 4),
    }[case]
    value, ss, starts, loc, w = make_inputs(0, B, Q, H, D, shapes, P)
    dev = torch.device("cuda")
    value, ss, starts, loc, w = (t.to(dev) for t in (value, ss, starts, loc, w))
    check_vs_reference(value, ss, starts, loc, w, dtype)
    # memory: the kernel allocates its output only; the reference materialises (B*H, D, Q, P) samples
    args = (value.to(dtype), ss, starts, loc.to(dtype), w.to(dtype))
    peaks = []
    for fn in (deform_attn, deform_attn_ref):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            out = fn(*args)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        assert torch.isfinite(out).all()
        del out
    assert peaks[0] < peaks[1], f"kernel peak {peaks[0]} B vs reference {peaks[1]} B"
    assert peaks[0] <= 1.2 * B * Q * H * D * args[0].element_size() + 2**20


@pytest.mark.parametrize("force", ["1", "0"], ids=["kernel", "reference"])
def test_torch_compile_fullgraph_forward_backward(force, monkeypatch):
    """torch.compile(fullgraph=True) traces forward and backward without a graph break on both paths
    (tensor metadata on the kernel path, Python-int shapes on both; aot_eager keeps the test cheap)."""
    monkeypatch.setenv("NANO4D_FORCE_TRITON", force)
    shapes = [(3, 7), (2, 2)]
    value, ss, starts, loc, w = make_inputs(0, 1, 5, 2, 8, shapes, 2)
    leaves = [t.float().requires_grad_() for t in (value, loc, w)]
    calls = [lambda v, l, a: deform_attn(v, shapes, None, l, a)]
    if force == "1":
        calls.append(lambda v, l, a: deform_attn(v, ss, starts, l, a))
    for call in calls:
        torch._dynamo.reset()
        fn = torch.compile(lambda v, l, a: call(v, l, a).square().sum(), fullgraph=True, backend="aot_eager")
        got = fn(*leaves)
        g = torch.autograd.grad(got, leaves)
        want = call(*leaves).square().sum()
        gw = torch.autograd.grad(want, leaves)
        torch.testing.assert_close(got, want)
        for a, b in zip(g, gw):
            torch.testing.assert_close(a, b)
