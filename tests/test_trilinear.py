"""Trilinear volume sampler: Triton kernel (interpreted on CPU) vs the 8-corner gather reference,
first and second derivatives."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from kernels import trilinear, trilinear_ref
from tests.tolerance import assert_close_fa

TL = importlib.import_module("kernels.trilinear")  # the module (the package re-exports the function)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 2, 3, 4, 5, 7]


def away_from_kinks(points, dims, margin=1e-3):
    """Move index coordinates u = (p + 1) / 2 * (n - 1) at least ``margin`` away from integers (the kinks
    of trilinear interpolation and the volume's faces); ``dims`` = (X, Y, Z). Returns fp64."""
    p = points.double().clone()
    for a, n in enumerate(dims):
        if n < 2:
            continue
        u = (p[..., a] + 1) * 0.5 * (n - 1)
        u = torch.where((u - u.round()).abs() < margin, u.round() + 2 * margin, u)
        p[..., a] = u / (0.5 * (n - 1)) - 1
    return p


def make_inputs(seed, B, C, Z, Y, X, N, lo=-1.3, hi=1.3):
    gen = torch.Generator().manual_seed(seed)
    vol = torch.randn(B, C, Z, Y, X, generator=gen, dtype=torch.float64)
    pts = lo + (hi - lo) * torch.rand(B, N, 3, generator=gen, dtype=torch.float64)
    return vol, away_from_kinks(pts, (X, Y, Z))


def grad_inputs(seed, vol, pts, dtype, pts_dtype=torch.float32):
    """Upstream gradients: g for the output (B, N, C), q for grad_points, qv for grad_volume."""
    gen = torch.Generator().manual_seed(seed + 1)
    B, C = vol.shape[:2]
    N = pts.shape[1]
    g = torch.randn(B, N, C, generator=gen, dtype=torch.float64).to(dtype)
    q = torch.randn(B, N, 3, generator=gen, dtype=torch.float64).to(pts_dtype)
    qv = torch.randn(vol.shape, generator=gen, dtype=torch.float64).to(dtype)
    return g, q, qv


def run(fn, vol, pts, g=None, q=None, qv=None):
    """out; with g: (grad_volume, grad_points); with q / qv as well: the double backward of
    s = <q, grad_points> + <qv, grad_volume> w.r.t. (volume, points, g)."""
    V = vol.detach().clone().requires_grad_(g is not None)
    P = pts.detach().clone().requires_grad_(g is not None)
    out = fn(V, P)
    if g is None:
        return out.detach(), None, None
    second = q is not None or qv is not None
    G = g.detach().clone().requires_grad_(second)
    gV, gP = torch.autograd.grad(out, (V, P), G, create_graph=second)
    if not second:
        return out.detach(), (gV, gP), None
    s = 0
    if q is not None:
        s = s + (gP * q.to(gP.dtype)).sum()
    if qv is not None:
        s = s + (gV * qv.to(gV.dtype)).sum()
    hh = torch.autograd.grad(s, (V, P, G), allow_unused=True)
    hh = tuple(torch.zeros_like(t) if h is None else h for h, t in zip(hh, (V, P, G)))
    return out.detach(), (gV.detach(), gP.detach()), hh


def check_vs_reference(vol64, pts64, dtype, seed=0, second=True, pts_dtype=torch.float32):
    vol_lo, pts_lo = vol64.to(dtype), pts64.to(pts_dtype)
    vol_hi, pts_hi = vol_lo.double(), pts_lo.double()          # the same values, in fp64
    g, q, qv = grad_inputs(seed, vol64, pts64, dtype, pts_dtype)
    q, qv = (q, qv) if second else (None, None)
    out, g1, g2 = run(trilinear, vol_lo, pts_lo, g, q, qv)
    ref64, r1, r2 = run(trilinear_ref, vol_hi, pts_hi, g.double(), None if q is None else q.double(),
                        None if qv is None else qv.double())
    ref_lo, l1, l2 = run(trilinear_ref, vol_lo, pts_lo, g, q, qv)
    assert out.dtype == dtype and g1[0].dtype == dtype and g1[1].dtype == pts_dtype
    assert_close_fa(out, ref64, ref_lo, k=2.0, dtype=dtype, name="out")
    for name, a, r, rl in zip(("grad_volume", "grad_points"), g1, r1, l1):
        assert_close_fa(a, r, rl, k=3.0, dtype=dtype, name=name)
    if second:
        for name, a, r, rl in zip(("gg_volume", "gg_points", "gg_grad_out"), g2, r2, l2):
            assert_close_fa(a, r, rl, k=3.0, dtype=dtype, name=name)


# ----------------------------------------------------------------------------- properties

@given(B=st.integers(1, 2), C=st.sampled_from([1, 3, 8, 32, 70]), Z=st.sampled_from(SIZES),
       Y=st.sampled_from(SIZES), X=st.sampled_from(SIZES), N=st.integers(1, 300),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_matches_reference(B, C, Z, Y, X, N, dtype, seed):
    vol, pts = make_inputs(seed, B, C, Z, Y, X, N)
    check_vs_reference(vol, pts, dtype, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fixed_shape_each_dtype(dtype):
    # one deterministic case per dtype: odd sizes, a size-1 axis, C > one channel chunk (64)
    vol, pts = make_inputs(3, 2, 67, 3, 1, 5, 41)
    check_vs_reference(vol, pts, dtype, seed=3)


def test_fp64_kernel_matches_reference():
    vol, pts = make_inputs(4, 1, 5, 4, 3, 6, 30)
    check_vs_reference(vol, pts, torch.float64, seed=4, pts_dtype=torch.float64)


def test_equals_grid_sample():
    # the op is F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=True) on 5-D inputs,
    # size-1 axes and points outside the volume included
    for shape in [(2, 5, 3, 4, 7), (1, 3, 1, 1, 5), (1, 4, 2, 1, 3)]:
        B, C = shape[:2]
        vol, pts = make_inputs(sum(shape), B, C, *shape[2:], 29, lo=-1.6, hi=1.6)
        vol, pts = vol.float(), pts.float()
        want = F.grid_sample(vol, pts.view(B, 1, 1, -1, 3), mode="bilinear", padding_mode="zeros",
                             align_corners=True).view(B, C, -1).transpose(1, 2)
        torch.testing.assert_close(trilinear(vol, pts), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(trilinear_ref(vol, pts), want, rtol=1e-6, atol=1e-6)
    # second order too (PyTorch differentiates 5-D grid_sample twice)
    B, C = 1, 3
    vol, pts = make_inputs(9, B, C, 3, 5, 4, 17, lo=-1.1, hi=1.1)
    g, q, qv = grad_inputs(9, vol, pts, torch.float64, torch.float64)

    def gs(v, p):
        return F.grid_sample(v, p.view(B, 1, 1, -1, 3), mode="bilinear", padding_mode="zeros",
                             align_corners=True).view(B, C, -1).transpose(1, 2)

    want = run(gs, vol, pts, g, q, qv)
    for fn in (trilinear, trilinear_ref):
        got = run(fn, vol, pts, g, q, qv)
        for a, b in zip(got[1] + got[2], want[1] + want[2]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # the corner convention: (-1, -1, -1) is voxel (0, 0, 0), (1, 1, 1) is voxel (Z-1, Y-1, X-1)
    vol = torch.randn(1, 2, 3, 4, 5)
    corners = torch.tensor([[[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [1.0, -1.0, -1.0]]])
    torch.testing.assert_close(trilinear(vol, corners)[0],
                               torch.stack([vol[0, :, 0, 0, 0], vol[0, :, 2, 3, 4], vol[0, :, 0, 0, 4]]))


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("fn", [trilinear_ref, trilinear], ids=["reference", "kernel"])
def test_gradcheck_and_gradgradcheck_fp64(fn):
    vol, pts = make_inputs(11, 1, 2, 3, 2, 4, 5, lo=-1.1, hi=1.1)   # index coordinates 1e-3 from kinks
    vol, pts = vol.requires_grad_(), pts.requires_grad_()
    # the interpreter costs ~0.1 s per kernel call: the kernel gets gradcheck's fast mode (random
    # directions) and the reference the full element-by-element check
    fast = fn is trilinear
    assert torch.autograd.gradcheck(fn, (vol, pts), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, (vol, pts), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast)


def test_hessian_structure():
    # w.r.t. one point: the second derivative of a trilinear sample has a zero diagonal and mixed terms
    # d2/dx dy = sum_corners (+-1)(+-1) w_z v * (dx index / dx)(dy index / dy)
    vol, pts = make_inputs(5, 1, 1, 2, 2, 2, 1, lo=-0.9, hi=0.9)
    v = vol[0, 0]                                                # (z, y, x)
    fx, fy, fz = ((pts[0, 0] + 1) / 2).tolist()                   # N = 2 per axis: index = (p + 1) / 2
    hxy = 0.25 * ((1 - fz) * (v[0, 1, 1] - v[0, 1, 0] - v[0, 0, 1] + v[0, 0, 0])
                  + fz * (v[1, 1, 1] - v[1, 1, 0] - v[1, 0, 1] + v[1, 0, 0]))
    for fn in (trilinear, trilinear_ref):
        P = pts.clone().requires_grad_()
        (gp,) = torch.autograd.grad(fn(vol, P).sum(), P, create_graph=True)
        H = torch.stack([torch.autograd.grad(gp[0, 0, a], P, retain_graph=True)[0][0, 0] for a in range(3)])
        torch.testing.assert_close(H.diagonal(), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(H, H.T)
        torch.testing.assert_close(H[0, 1], hxy, rtol=1e-10, atol=1e-12)


def test_one_sided_gradients_at_kinks_and_faces():
    # index coordinates exactly on integers (interior kinks and the faces -1, 0, N-1, N): the point
    # gradient is the right-sided derivative, as in grid_sample; the sample is linear in x between kinks
    X, Y, Z, C = 5, 3, 4, 3
    gen = torch.Generator().manual_seed(2)
    vol = torch.randn(1, C, Z, Y, X, generator=gen, dtype=torch.float64)
    ux = torch.tensor([-1.0, 0.0, 1.0, 3.0, 4.0, 5.0, 2.5], dtype=torch.float64)
    uy = torch.tensor([1.0, 0.0, 2.0, 1.5, 1.0, 0.25, 2.0], dtype=torch.float64)
    uz = torch.tensor([0.0, 3.0, 1.0, 2.0, 4.0, 1.5, -1.0], dtype=torch.float64)
    pts = torch.stack([ux / 2 - 1, uy - 1, uz / 1.5 - 1], -1).unsqueeze(0)      # u = (p + 1) (n - 1) / 2
    g = torch.randn(1, 7, C, generator=gen, dtype=torch.float64)
    h = 1e-5
    for a in range(3):
        step = torch.zeros_like(pts)
        step[..., a] = h
        right = ((trilinear_ref(vol, pts + step) - trilinear_ref(vol, pts)) * g).sum(-1) / h
        for fn in (trilinear, trilinear_ref):
            _, (_, gp), _ = run(fn, vol, pts, g)
            torch.testing.assert_close(gp[0, :, a], right[0], rtol=1e-6, atol=1e-6,
                                       msg=lambda m: f"{fn.__name__} axis {a}: {m}")


# ----------------------------------------------------------------------------- edge cases

def test_nonfinite_points_contribute_zero_and_nothing_is_read_outside():
    B, C, Z, Y, X, N = 2, 6, 3, 4, 5, 12
    vol, pts = make_inputs(7, B, C, Z, Y, X, N)
    vol, pts = vol.float(), pts.float()
    bad = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 7.0]
    pts_bad = pts.clone()
    hit = torch.zeros(B, N, dtype=torch.bool)
    nonfinite = torch.zeros(B, N, dtype=torch.bool)
    for k, val in enumerate(bad):                                       # one bad coordinate per point
        pts_bad[k % B, k, k % 3] = val
        hit[k % B, k] = True
        nonfinite[k % B, k] = k < 3
    # a channels-last volume inside a NaN buffer (no copy is made): any read outside it poisons the output
    n = B * Z * Y * X * C
    buf = torch.full((n + 64,), float("nan"))
    buf[32:32 + n] = vol.permute(0, 2, 3, 4, 1).reshape(-1)
    vol_cl = buf[32:32 + n].view(B, Z, Y, X, C).permute(0, 4, 1, 2, 3)
    g, q, qv = grad_inputs(1, vol, pts, torch.float32)
    for fn in (trilinear, trilinear_ref):
        out, (gV, gP), (hV, hP, hG) = run(fn, vol_cl, pts_bad, g, q, qv)
        for t in (out, gV, gP, hV, hP, hG):
            assert torch.isfinite(t).all()
        assert (out[hit] == 0).all() and (gP[hit] == 0).all() and (hP[hit] == 0).all()
        assert (hG[nonfinite] == 0).all()
        # the other points are unaffected: compare against the reference without the bad points
        ok = ~hit
        ref, (rV, rP), (sV, sP, sG) = run(trilinear_ref, vol.double(), pts.double(), g.double() * ok[..., None],
                                          q.double(), qv.double())
        torch.testing.assert_close(out[ok].double(), ref[ok], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gV.double(), rV, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gP[ok].double(), rP[ok], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hV.double(), sV, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hP[ok].double(), sP[ok], rtol=1e-5, atol=1e-5)


def test_nan_in_volume_propagates_to_readers_only():
    vol = torch.zeros(1, 2, 2, 3, 3)
    vol[0, 1, 0, 0, 0] = float("nan")
    pts = torch.tensor([[[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]])
    for fn in (trilinear, trilinear_ref):
        out = fn(vol, pts)
        assert torch.isnan(out[0, 0, 1]) and torch.isfinite(out[0, 1]).all() and out[0, 0, 0] == 0


def test_empty_points_batch_and_channels():
    vol, pts = make_inputs(0, 2, 3, 2, 3, 4, 5)
    vol, pts = vol.float(), pts.float()
    for fn in (trilinear, trilinear_ref):
        for v, p, shape in ((vol, pts[:, :0], (2, 0, 3)), (vol[:0], pts[:0], (0, 5, 3)),
                            (vol[:, :0], pts, (2, 5, 0))):
            V, P = v.clone().requires_grad_(), p.clone().requires_grad_()
            out = fn(V, P)
            assert out.shape == shape
            gV, gP = torch.autograd.grad(out.sum(), (V, P), create_graph=True)
            assert gV.shape == V.shape and gP.shape == P.shape and (gV == 0).all() and (gP == 0).all()


def test_non_contiguous_and_expanded_inputs():
    vol, pts = make_inputs(4, 2, 5, 3, 4, 6, 23)
    vol, pts = vol.float(), pts.float()
    g, q, qv = grad_inputs(4, vol, pts, torch.float32)
    want = run(trilinear, vol, pts, g, q, qv)
    v_nc = vol.transpose(2, 4).contiguous().transpose(2, 4)                 # (B, C, Z, Y, X) with X strided
    p_nc = torch.stack([pts, pts], -1)[..., 0]                               # strided view of the same values
    g_nc = g.transpose(0, 1).contiguous().transpose(0, 1)
    assert not v_nc.is_contiguous() and not p_nc.is_contiguous() and not g_nc.is_contiguous()
    got = run(trilinear, v_nc, p_nc, g_nc, q, qv)
    torch.testing.assert_close(got[0], want[0])
    for a, b in zip(got[1] + got[2], want[1] + want[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # one point expanded over N (stride 0), one volume expanded over the batch
    p_ex = pts[:, :1].expand(2, 23, 3)
    v_ex = vol[:1].expand(2, *vol.shape[1:])
    torch.testing.assert_close(trilinear(v_ex, p_ex), trilinear_ref(v_ex, p_ex), rtol=1e-5, atol=1e-5)


def test_backward_is_deterministic():
    vol, pts = make_inputs(8, 1, 8, 2, 2, 3, 200, lo=-0.9, hi=0.9)            # many points per corner
    g, q, qv = grad_inputs(8, vol, pts, torch.float32)
    a = run(trilinear, vol.float(), pts.float(), g, q, qv)
    b = run(trilinear, vol.float(), pts.float(), g, q, qv)
    for x, y in zip(a[1] + a[2], b[1] + b[2]):       # atomics only may reorder sums
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise_value_error():
    vol, pts = make_inputs(0, 2, 3, 2, 3, 4, 5)
    vol, pts = vol.float(), pts.float()
    cases = [
        (dict(volume=vol[0]), "volume"),
        (dict(volume=vol.to(torch.int32)), "volume"),
        (dict(volume=vol[:, :, :0]), "volume: spatial"),
        (dict(points=pts[..., :2]), "points"),
        (dict(points=pts[0]), "points"),
        (dict(points=pts[:1]), "points"),
        (dict(points=pts.to(torch.int64)), "points"),
        (dict(points=pts.to("meta")), "points"),
        (dict(points=[0.0, 0.0, 0.0]), "points"),
        (dict(volume="volume"), "volume"),
    ]
    for fn in (trilinear, TL._trilinear_fwd):
        for kw, msg in cases:
            args = dict(volume=vol, points=pts)
            args.update(kw)
            with pytest.raises(ValueError, match=msg):
                fn(**args)
    with pytest.raises(ValueError, match="grad_out"):
        TL._trilinear_bwd(torch.zeros(2, 5, 4), vol, pts)
    with pytest.raises(ValueError, match="gg_points"):
        TL._trilinear_bwd2(torch.zeros(2, 5, 3), vol, pts, None, pts[:, :1])
    with pytest.raises(ValueError, match="gg_volume"):
        TL._trilinear_bwd2(torch.zeros(2, 5, 3), vol, pts, vol[:1], None)


def test_cpu_dispatch_uses_reference(monkeypatch):
    def no_kernel(*args):
        raise AssertionError("the kernel launcher ran on the CPU path")

    vol, pts = make_inputs(1, 1, 3, 2, 3, 4, 5)
    vol, pts = vol.float(), pts.float()
    monkeypatch.setenv("NANO4D_FORCE_TRITON", "0")
    monkeypatch.setattr(TL, "_trilinear_fwd", no_kernel)
    torch.testing.assert_close(trilinear(vol, pts), trilinear_ref(vol, pts))
    with pytest.raises(ValueError, match="points"):
        trilinear(vol, pts[..., :2])
    monkeypatch.setenv("NANO4D_FORCE_TRITON", "1")
    with pytest.raises(AssertionError, match="kernel launcher ran"):
        trilinear(vol, pts)


def test_opcheck():
    vol, pts = make_inputs(2, 1, 3, 2, 3, 4, 7)
    vol, pts = vol.float(), pts.float()
    g, q, qv = grad_inputs(2, vol, pts, torch.float32)
    torch.library.opcheck(torch.ops.nano4d.trilinear.default,
                          (vol.clone().requires_grad_(), pts.clone().requires_grad_()))
    torch.library.opcheck(torch.ops.nano4d.trilinear_backward.default,
                          (g.clone().requires_grad_(), vol.clone().requires_grad_(), pts.clone().requires_grad_()))
    for ggv, ggp in ((qv, q), (None, q), (qv, None)):   # no autograd formula: third order is not supported
        torch.library.opcheck(torch.ops.nano4d.trilinear_backward2.default, (g, vol, pts, ggv, ggp))


def test_torch_compile_fullgraph():
    vol, pts = make_inputs(6, 1, 4, 3, 2, 5, 9)
    vol, pts = vol.float(), pts.float()

    def f(v, p):
        return (trilinear(v, p) ** 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    V, P = vol.clone().requires_grad_(), pts.clone().requires_grad_()
    loss = compiled(V, P)
    loss.backward()
    V2, P2 = vol.clone().requires_grad_(), pts.clone().requires_grad_()
    f(V2, P2).backward()
    torch.testing.assert_close(loss, f(vol, pts))
    torch.testing.assert_close(V.grad, V2.grad)
    torch.testing.assert_close(P.grad, P2.grad)


def test_bench_tiny_runs():
    # `python bench/trilinear.py --tiny` (interpreter) prints one row per implementation, matching outputs
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", NANO4D_FORCE_TRITON="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, os.path.join("bench", "trilinear.py"), "--tiny", "--reps", "1"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("| tiny")]
    assert [r[2] for r in rows] == ["reference", "triton", "grid_sample"], proc.stdout
    for r in rows:
        assert float(r[3]) > 0 and float(r[5]) > 0 and float(r[10]) < 1e-5, r


# ----------------------------------------------------------------------------- ahead-of-time compile

def capture_all(C, dtype, N=96 * 2048 * 6, grid=(5, 128, 128)):
    """The launches of forward, backward and both double-backward variants on meta tensors at a model
    shape (MIM4D: 96 samples x 2048 rays x 6 cameras into a 32 x 5 x 128 x 128 volume): GPU block sizes,
    the JIT's specialization, nothing runs."""
    from tests.aot import capture_launches
    vol = torch.empty(1, C, *grid, device="meta", dtype=dtype)
    pts = torch.empty(1, N, 3, device="meta")
    g = torch.empty(1, N, C, device="meta", dtype=dtype)
    with capture_launches() as launches:
        TL._trilinear_fwd(vol, pts)
        TL._trilinear_bwd(g, vol, pts)
        TL._trilinear_bwd2(g, vol, pts, None, pts)          # what training through normals launches
        TL._trilinear_bwd2(g, vol, pts, vol, pts)
    assert [x.name for x in launches] == ["_trilinear_fwd_kernel", "_trilinear_bwd_kernel",
                                          "_trilinear_bwd2_kernel", "_trilinear_bwd2_kernel"]
    return launches


# C = 32 (MIM4D's volume) in bf16 for sm_90 and sm_80, fp32 for sm_90; C = 3 and 100 (padded channel
# stride, several channel chunks) in bf16 for sm_90
AOT_CASES = [(32, torch.bfloat16, (90, 80)), (32, torch.float32, (90,)), (3, torch.bfloat16, (90,)),
             (100, torch.bfloat16, (90,))]


@pytest.mark.parametrize("C,dtype,targets", AOT_CASES, ids=[f"C{c}-{str(t)[6:]}" for c, t, _ in AOT_CASES])
def test_aot_compile_no_spills(C, dtype, targets):
    from tests.aot import aot_compile_launch
    for launch in capture_all(C, dtype):
        out = aot_compile_launch(launch, targets=targets, stats=True)
        for arch, c in out.items():
            md = c.metadata
            print(f"{launch.name} {dtype} C={C} {launch.kwargs} sm_{arch}: regs {md.regs}, "
                  f"spills {md.spill_stores}/{md.spill_loads} B, shared {md.shared} B")
            assert md.spill_stores == 0 and md.spill_loads == 0, (launch.name, launch.kwargs, arch)
        if launch.name != "_trilinear_fwd_kernel":       # volume gradients are global atomics
            assert "red.global" in out[targets[0]].asm["ptx"] or "atom.global" in out[targets[0]].asm["ptx"]


def test_block_sizes():
    assert [TL._block_sizes(32, 10**6, interpret=False, kind=k)[0] for k in ("fwd", "bwd", "bwd2", "bwd2_both")] \
        == [64, 32, 32, 16]
    assert TL._block_sizes(100, 10**6, interpret=False)[1] == TL.MAX_BLOCK_C
    assert TL._block_sizes(1, 10**6, interpret=False)[:2] == (128, 2)
    assert [TL._padded(c) for c in (1, 3, 8, 32, 100)] == [8, 8, 8, 32, 104]


# ----------------------------------------------------------------------------- GPU (real sizes)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_mim4d_size(dtype):
    # MIM4D: 96 samples x 2048 rays x 6 cameras into a 32 x 5 x 128 x 128 volume
    vol, pts = make_inputs(0, 1, 32, 5, 128, 128, 96 * 2048 * 6, lo=-1.05, hi=1.05)
    dev = torch.device("cuda")
    check_vs_reference(vol.to(dev), pts.to(dev), dtype)
