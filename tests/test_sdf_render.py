"""NeuS SDF ray marching: Triton kernel (interpreted on CPU) vs the grid_sample + cumprod reference."""
import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from kernels import render_sdf, render_sdf_ref, sdf_gradient_ref
from tests.tolerance import assert_close_fa

SR = importlib.import_module("kernels.sdf_render")
INTERP_BLOCK_R = SR._pick_blocks(gpu=False)[0]   # rays per program under the interpreter


# ----------------------------------------------------------------------------- inputs

def make_rays(gen, B, R, S, dtype=torch.float64, zero_len=True, tmax=2.5):
    """Rays of every kind: origins inside / outside the box, rays that miss (pointing away),
    axis-parallel directions, non-unit directions, and zero-length sections (repeated t)."""
    kind = torch.randint(0, 4, (B, R), generator=gen)
    o_in = torch.rand(B, R, 3, generator=gen, dtype=torch.float64) * 1.8 - 0.9
    o_out = torch.rand(B, R, 3, generator=gen, dtype=torch.float64) * 4 - 2
    o_out[..., 0] = torch.where(o_out[..., 0] >= 0, o_out[..., 0] + 1.2, o_out[..., 0] - 1.2)
    d = torch.randn(B, R, 3, generator=gen, dtype=torch.float64)
    d = d / d.norm(dim=-1, keepdim=True) * (0.5 + torch.rand(B, R, 1, generator=gen, dtype=torch.float64))
    axis = F.one_hot(torch.randint(0, 3, (B, R), generator=gen), 3).double()
    d_axis = axis * torch.where(torch.rand(B, R, 1, generator=gen) < 0.5, -1.0, 1.0).double()
    origins = torch.where((kind == 1)[..., None] | (kind == 2)[..., None], o_out, o_in)
    dirs = torch.where((kind == 3)[..., None], d_axis, d)
    dirs = torch.where((kind == 2)[..., None], origins / origins.norm(dim=-1, keepdim=True), dirs)  # misses
    dirs = torch.where((kind == 1)[..., None], -origins / origins.norm(dim=-1, keepdim=True) * 0.8, dirs)
    t = torch.rand(B, R, S, generator=gen, dtype=torch.float64) * tmax
    if zero_len and S > 2:
        dup = torch.rand(B, R, S, generator=gen) < 0.15
        t = torch.where(dup, torch.roll(t, 1, -1), t)
    t = torch.sort(t, -1)[0]
    return origins.to(dtype), dirs.to(dtype), t.to(dtype)


def make_volume(gen, B, C, Z, Y, X, dtype=torch.float64, sdf_scale=0.4):
    vol = torch.randn(B, C, Z, Y, X, generator=gen, dtype=torch.float64)
    vol[:, 0] = vol[:, 0] * sdf_scale + 0.1
    return vol.to(dtype)


def run(fn, inputs, gouts=None):
    """Forward (and backward with ``gouts``) of ``fn``; returns (outputs, grads or None)."""
    leaves = [t.detach().clone().requires_grad_(gouts is not None) for t in inputs]
    out = fn(*leaves)
    if gouts is None:
        return [o.detach() for o in out], None
    grads = torch.autograd.grad([o for o in out], leaves, [g.to(o.device, o.dtype) for g, o in zip(gouts, out)],
                                allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    return [o.detach() for o in out], grads


NAMES_OUT = ("features", "depth", "opacity")
NAMES_IN = ("volume", "origins", "dirs", "t_vals", "inv_s")


def check_vs_reference(inputs64, vol_dtype=torch.float32, ray_dtype=torch.float32, backward=True, seed=0):
    """Kernel vs fp64 reference with the FlashAttention bound (reference in the test dtypes = ref_lo)."""
    vol64, o64, d64, t64, s64 = inputs64
    lo = [vol64.to(vol_dtype), o64.to(ray_dtype), d64.to(ray_dtype), t64.to(ray_dtype), s64.to(ray_dtype)]
    hi = [x.double() for x in lo]
    out_dt = torch.promote_types(vol_dtype, ray_dtype)
    gouts = None
    if backward:
        g = torch.Generator().manual_seed(seed + 7)
        B, C, R = vol64.shape[0], vol64.shape[1], o64.shape[1]
        gouts = [torch.randn(B, R, C - 1, generator=g), torch.randn(B, R, generator=g),
                 torch.randn(B, R, generator=g)]
    out, gk = run(render_sdf, lo, gouts)
    ref64, g64 = run(render_sdf_ref, hi, gouts)
    ref_lo, glo = run(render_sdf_ref, lo, gouts)
    for name, a, r, rl in zip(NAMES_OUT, out, ref64, ref_lo):
        assert a.dtype == out_dt, name
        assert_close_fa(a, r, rl, k=2.0, dtype=out_dt, name=name)
    if backward:
        for name, a, r, rl, x in zip(NAMES_IN, gk, g64, glo, lo):
            assert a.dtype == x.dtype and a.shape == x.shape, name
            # gradients are rounded to the input's dtype: bound by that dtype's atol, at least fp32's
            dt = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else out_dt
            assert_close_fa(a, r, rl, k=3.0, dtype=dt, name="grad_" + name)
    return out, gk


# ----------------------------------------------------------------------------- properties

@st.composite
def cases(draw, max_steps):
    """Shapes with a bounded interpreter cost: (ray programs) x (feature chunks) x (samples) <= max_steps
    (the interpreter costs ~25 ms per program and sample forward, ~80 ms backward)."""
    B = draw(st.integers(1, 2))
    S = draw(st.one_of(st.integers(2, max(2, max_steps // 6)), st.integers(2, max_steps)))
    C = draw(st.integers(1, 40))
    chunks = max(1, -(-(C - 1) // 32))
    programs = max(1, max_steps // (S * chunks))
    R = draw(st.integers(1, max(1, min(200, programs * INTERP_BLOCK_R // B))))
    Z = draw(st.sampled_from([1, 2, 3, 5, 7]))
    Y = draw(st.integers(1, 9))
    X = draw(st.integers(1, 9))
    inv_s = draw(st.sampled_from([1.5, 8.0, 20.0, 64.0]))
    seed = draw(st.integers(0, 2**16))
    return B, R, S, C, Z, Y, X, inv_s, seed


def inputs_for(B, R, S, C, Z, Y, X, inv_s, seed):
    gen = torch.Generator().manual_seed(seed)
    vol = make_volume(gen, B, C, Z, Y, X)
    o, d, t = make_rays(gen, B, R, S)
    return vol, o, d, t, torch.tensor(inv_s, dtype=torch.float64)


@given(case=cases(max_steps=100))
def test_forward_matches_reference(case):
    check_vs_reference(inputs_for(*case), backward=False)


@given(case=cases(max_steps=16), vol_dtype=st.sampled_from([torch.float32, torch.float32, torch.bfloat16,
                                                            torch.float16]))
def test_forward_backward_matches_reference(case, vol_dtype):
    check_vs_reference(inputs_for(*case), vol_dtype=vol_dtype, seed=case[-1])


@pytest.mark.parametrize("vol_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_volume(vol_dtype):
    # bf16 / fp16 loads, fp32 arithmetic and fp32 atomics, gradient cast back to the volume's dtype
    check_vs_reference(inputs_for(1, 6, 5, 4, 2, 3, 4, 20.0, 17), vol_dtype=vol_dtype)


def test_fp64_matches_reference_to_rounding():
    inp = inputs_for(2, 20, 8, 5, 3, 6, 7, 8.0, 3)
    check_vs_reference(inp, vol_dtype=torch.float64, ray_dtype=torch.float64)


def test_multiple_feature_chunks_and_sdf_only():
    # C - 1 = 70 features: three chunks of 32 (forward grid axis 1, backward chunk loop); C = 1: none
    check_vs_reference(inputs_for(1, 9, 5, 71, 3, 4, 5, 20.0, 11))
    out, _ = check_vs_reference(inputs_for(2, 5, 5, 1, 2, 3, 3, 20.0, 12))
    assert out[0].shape == (2, 5, 0)


@pytest.mark.parametrize("fn", [render_sdf_ref, render_sdf], ids=["reference", "kernel"])
def test_gradcheck_fp64(fn):
    # random continuous positions are away from trilinear kinks; moderate inv_s keeps alpha off its clamps
    gen = torch.Generator().manual_seed(5)
    vol = make_volume(gen, 1, 3, 3, 3, 4)
    o, d, t = make_rays(gen, 1, 3, 3, zero_len=False, tmax=1.5)
    o = o.clamp(-0.8, 0.8)
    s = torch.tensor(3.0, dtype=torch.float64)
    args = [x.requires_grad_() for x in (vol, o, d, t, s)]
    fast = fn is render_sdf                      # the interpreter is slow: random-projection gradcheck
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast,
                                    check_undefined_grad=not fast)


# ----------------------------------------------------------------------------- analytic / exact cases

def sphere_volume(n=17, radius=0.5, extra=None):
    ax = torch.linspace(-1, 1, n, dtype=torch.float64)
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    sdf = (x**2 + y**2 + z**2).sqrt() - radius
    chans = [sdf, x, 2 * y + 1]
    return torch.stack(chans, 0)[None]


@pytest.mark.parametrize("fn", [render_sdf_ref, render_sdf], ids=["reference", "kernel"])
def test_sphere_depth_and_opacity(fn):
    """Rays along +x from x = -0.9 (inside the box, t clipped before the far face): depth = analytic
    intersection with the r = 0.5 sphere, opacity ~ 1 for hits and ~ 0 for misses."""
    vol = sphere_volume().float()
    yz = torch.tensor([[0.0, 0.0], [0.2, -0.1], [-0.3, 0.25], [0.1, 0.35], [0.72, 0.0], [0.6, -0.6],
                       [0.0, 0.8], [-0.75, 0.2]])
    R = yz.shape[0]
    origins = torch.cat([torch.full((R, 1), -0.9), yz], 1)[None]
    dirs = torch.tensor([1.0, 0.0, 0.0]).expand(1, R, 3)
    t = torch.linspace(0.0, 1.7, 64).expand(1, R, 64)
    feat, depth, opac = fn(vol, origins, dirs, t, torch.tensor(400.0))
    r2 = (yz**2).sum(1)
    hit = r2 < 0.25
    t_hit = 0.9 - (0.25 - r2.clamp(max=0.25)).sqrt()
    assert hit.sum() == 4 and (~hit).sum() == 4
    assert (opac[0, hit] > 0.99).all(), opac
    assert (opac[0, ~hit] < 0.02).all(), opac
    step = 1.7 / 63
    assert ((depth[0, hit] - t_hit[hit]).abs() < 1.5 * step).all(), (depth, t_hit)
    # features are the field at the surface point: channel "x" ~ x_hit, channel "2y+1" ~ 2y+1
    x_hit = -0.9 + t_hit
    assert ((feat[0, hit, 0] - x_hit[hit]).abs() < 2 * step).all()
    assert ((feat[0, hit, 1] - (2 * yz[hit, 0] + 1)).abs() < 0.02).all()


def step_volume():
    """SDF +1 for x-index < 3, -1 from index 3 on (X = 6): with inv_s = 1000 sigmoid(-1000) is exactly 0
    in fp32 and fp64, so the section crossing the step has alpha = 1 exactly."""
    X = 6
    sdf = torch.where(torch.arange(X) < 3, 1.0, -1.0).double()
    vol = torch.zeros(1, 3, 2, 2, X, dtype=torch.float64)
    vol[:, 0] = sdf
    vol[:, 1] = torch.linspace(0.5, 2.0, X)
    vol[:, 2] = torch.linspace(-1, 1, 2)[:, None, None] * 0.3 + 0.2
    return vol


def step_rays():
    # x index i <-> x = -1 + 2i/5; samples at indices 0.5, 1, 1.5, 2, 3, 4, 4.5 (one section 2 -> 3 crosses)
    idx = torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 4.5], dtype=torch.float64)
    t = (-1 + 2 * idx / 5)[None, None].repeat(1, 2, 1)
    origins = torch.tensor([[[0.0, -0.3, 0.2], [0.0, 0.4, -0.5]]], dtype=torch.float64)
    dirs = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]], dtype=torch.float64)
    return origins, dirs, t


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_alpha_one_has_exact_finite_gradients(dtype):
    vol = step_volume()
    o, d, t = step_rays()
    s = torch.tensor(1000.0, dtype=torch.float64)
    inputs = [x.to(dtype) for x in (vol, o, d, t, s)]
    gouts = [torch.randn(1, 2, 2, generator=torch.Generator().manual_seed(0)), torch.ones(1, 2), torch.ones(1, 2)]
    out, gk = run(render_sdf, inputs, gouts)
    ref, gr = run(render_sdf_ref, [x.double() for x in inputs], gouts)
    # alpha = 1 at section 3 (indices 2 -> 3): everything after is invisible, opacity is 1
    torch.testing.assert_close(out[2], torch.ones_like(out[2]), rtol=0, atol=1e-6)
    for a, r, name in zip(out + gk, ref + gr, NAMES_OUT + NAMES_IN):
        assert torch.isfinite(a).all(), name
        assert_close_fa(a, r, dtype=dtype, name=name, atol=1e-5 if dtype == torch.float32 else 1e-12)
    # features and depth come from sections 0..3 only: no gradient reaches the voxels past x-index 4
    assert gk[0][:, :, :, :, 4:].abs().max() == 0
    assert gk[0][:, 1:, :, :, :2].abs().max() > 0
    # the alpha = 1 section gets weight T_3 (the leftover transmittance); gradient of depth w.r.t. its
    # end sample is T_3 / 2 (depth midpoint) and nothing flows through (1 - alpha) = 0 into later t
    assert gk[3][:, :, 5:].abs().max() == 0
    # finite differences agree with the reference (alpha stays exactly 1 under small perturbations);
    # the kernel matched the fp64 reference above
    if dtype == torch.float64:
        args = [x.detach().clone().requires_grad_(i in (0, 3)) for i, x in enumerate(inputs)]
        assert torch.autograd.gradcheck(lambda v, tt: render_sdf_ref(v, args[1], args[2], tt, args[4]),
                                        (args[0], args[3]), eps=1e-6, atol=1e-7)


def test_early_stop_rule_is_shared():
    """Sections with T < 1e-4 are dropped: kernel and reference agree, the kernel marched fewer
    sections than S - 1, and the rendered value differs from the un-stopped sum."""
    X = 8
    vol = torch.zeros(1, 2, 1, 1, X, dtype=torch.float64)
    vol[0, 0, 0, 0] = torch.tensor([1.0, 1, -1, -1, 1, 1, -1, -1]) * 0.02   # two soft surfaces
    vol[0, 1, 0, 0] = torch.linspace(0, 1, X)
    t = (-1 + 2 * torch.arange(X, dtype=torch.float64) / (X - 1))[None, None].repeat(1, 2, 1)
    o = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.3, -0.4]]], dtype=torch.float64)
    d = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]], dtype=torch.float64)
    s = torch.tensor(350.0, dtype=torch.float64)
    args = (vol, o, d, t, s)
    feat, depth, opac, nsec, tlast = torch.ops.nano4d.render_sdf(*args)
    ref = render_sdf_ref(*args)
    for a, r in zip((feat, depth, opac), ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    # T after the first surface ~ 9e-4 (kept), after the second ~ 8e-7 (stop): 6 of 7 sections marched
    assert (nsec == 6).all() and (tlast >= 1e-4).all()
    # without the rule, the last section would add a visible (> 1e-9) amount to the opacity
    sdf = vol[0, 0, 0, 0]
    phi = torch.sigmoid(sdf * s)
    alpha = ((phi[:-1] - phi[1:] + 1e-5) / (phi[:-1] + 1e-5)).clamp(0, 1)
    T = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.float64), 1 - alpha[:-1]]), 0)
    assert T[6] < 1e-4 <= T[5]
    assert (T * alpha).sum() - opac[0, 0] > 1e-9


# ----------------------------------------------------------------------------- edge cases and bad inputs

def test_nonfinite_inputs_never_read_outside():
    gen = torch.Generator().manual_seed(2)
    vol = make_volume(gen, 1, 4, 3, 4, 5, dtype=torch.float32)
    o, d, t = make_rays(gen, 1, 8, 6, dtype=torch.float32)
    o[0, 0, 1] = float("nan")
    d[0, 1] = float("inf")
    t[0, 2, 3:] = float("inf")
    o[0, 3] = 1e30
    vol[0, 0, 1, 2, 3] = float("nan")
    s = torch.tensor(10.0)
    out, g = run(render_sdf, (vol, o, d, t, s), [torch.ones(1, 8, 3), torch.ones(1, 8), torch.ones(1, 8)])
    ref, _ = run(render_sdf_ref, (vol, o, d, t, s))
    for a, r, name in zip(out, ref, NAMES_OUT):
        torch.testing.assert_close(a, r, equal_nan=True, rtol=1e-5, atol=1e-5, msg=name)
    assert torch.isfinite(out[2][0, 3])            # far away: reads nothing, stays finite
    assert all(x.shape == y.shape for x, y in zip(g, (vol, o, d, t, s)))


def test_empty_rays_and_batch():
    gen = torch.Generator().manual_seed(0)
    vol = make_volume(gen, 2, 4, 3, 3, 3, dtype=torch.float32).requires_grad_()
    s = torch.tensor(5.0, requires_grad=True)
    for B, R in ((2, 0), (0, 3)):
        v = vol[:B].detach().clone().requires_grad_()
        o, d, t = (torch.zeros(B, R, 3), torch.ones(B, R, 3), torch.zeros(B, R, 4))
        feat, depth, opac = render_sdf(v, o, d, t, s)
        assert feat.shape == (B, R, 3) and depth.shape == (B, R) and opac.shape == (B, R)
        (feat.sum() + depth.sum() + opac.sum()).backward()
        assert v.grad.shape == v.shape and v.grad.abs().sum() == 0


def test_non_contiguous_and_expanded_inputs():
    gen = torch.Generator().manual_seed(4)
    vol, o, d, t, s = inputs_for(2, 6, 5, 5, 3, 4, 5, 8.0, 9)
    vol = vol.float().permute(0, 1, 4, 3, 2).contiguous().permute(0, 1, 4, 3, 2)   # odd strides
    o = torch.cat([o, o], -1).float()[..., ::2]                                      # stride 2
    d = d.float()[:, :1].expand(2, 6, 3)                                            # stride 0
    t = t.float().transpose(1, 2).contiguous().transpose(1, 2)                       # S-major
    s = torch.tensor([8.0])
    assert not (vol.is_contiguous() or o.is_contiguous() or d.is_contiguous() or t.is_contiguous())
    gouts = [torch.randn(2, 6, 4, generator=gen), torch.randn(2, 6, generator=gen), torch.randn(2, 6, generator=gen)]
    out, gk = run(render_sdf, (vol, o, d, t, s), gouts)
    ref, gr = run(render_sdf_ref, (vol, o, d, t, s), gouts)
    for a, r in zip(out + gk, ref + gr):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=2e-5)


def test_backward_is_deterministic():
    inp = [x.float() for x in inputs_for(1, 12, 5, 6, 3, 4, 4, 8.0, 21)]
    gouts = [torch.ones(1, 12, 5), torch.ones(1, 12), torch.ones(1, 12)]
    _, g1 = run(render_sdf, inp, gouts)
    _, g2 = run(render_sdf, inp, gouts)
    torch.testing.assert_close(g1[0], g2[0], rtol=1e-6, atol=1e-6)  # volume: fp32 atomics
    for a, b in zip(g1[1:], g2[1:]):                                # per-ray: no atomics, bitwise equal
        assert torch.equal(a, b)


def test_bad_inputs_raise_value_error():
    vol = torch.randn(1, 3, 2, 3, 4)
    o, d, t, s = torch.zeros(1, 5, 3), torch.ones(1, 5, 3), torch.linspace(0, 1, 4).expand(1, 5, 4), torch.tensor(2.0)
    cases = [
        ((vol, o, d, t.flip(-1), s), "t_vals.*sorted"),
        ((vol, o, d, t[..., :1], s), "t_vals.*S >= 2"),
        ((vol[0], o, d, t, s), "volume"),
        ((vol[:, :0], o, d, t, s), "volume"),
        ((vol.int(), o, d, t, s), "volume"),
        ((vol, o[..., :2], d, t, s), "origins"),
        ((vol, o, d[:, :4], t, s), "dirs"),
        ((vol, o, d, t[:, :3], s), "t_vals"),
        ((vol, o, d, t, torch.ones(2)), "inv_s"),
        ((vol, o, d, t, torch.tensor(-1.0)), "inv_s.*positive"),
        ((vol, o, d, t, torch.tensor(float("nan"))), "inv_s.*positive"),
        ((vol, o, d, t, torch.tensor(float("inf"))), "inv_s: must be positive and finite"),
        ((vol, o, d, t, float("inf")), "inv_s: must be positive and finite"),
        ((vol, o, d, t, 0.0), "inv_s: must be positive and finite"),
        ((vol, torch.zeros(2, 5, 3), d, t, s), "origins"),
        ((torch.randn(1, SR.MAX_FEATURES + 2, 2, 2, 2), o, d, t, s), "volume"),
    ]
    for force in ("1", "0"):          # the kernel path and the reference path check alike
        os.environ["NANO4D_FORCE_TRITON"] = force
        try:
            for args, msg in cases:
                with pytest.raises(ValueError, match=msg):
                    render_sdf(*args)
        finally:
            os.environ["NANO4D_FORCE_TRITON"] = "1"
    # equal neighbours (zero-length sections) are sorted
    t_eq = torch.tensor([0.0, 0.5, 0.5, 1.0]).expand(1, 5, 4)
    render_sdf(vol, o, d, t_eq, s)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_all_low_precision(dtype):
    # volume, rays and inv_s all fp16 / bf16: the reference (the CPU path) computes in that dtype
    inp = [x.to(dtype) for x in inputs_for(1, 6, 5, 3, 2, 3, 4, 8.0, 3)]
    for fn in (render_sdf_ref, render_sdf):
        out = fn(*inp)
        assert all(o.dtype == dtype and torch.isfinite(o).all() for o in out)
    want = render_sdf_ref(*[x.double() for x in inp])
    for a, b in zip(render_sdf_ref(*inp), want):
        torch.testing.assert_close(a.double(), b, rtol=0.05, atol=0.05)


def test_channels_last_volume_is_read_in_place():
    """A channels-last volume (a voxel's features side by side) is read through its strides, never
    copied; results and gradients equal the contiguous volume's, and the gradient has its strides."""
    from tests.aot import capture_launches
    inp = [x.float() for x in inputs_for(1, 7, 5, 9, 2, 3, 4, 8.0, 4)]
    vol_cl = inp[0].contiguous(memory_format=torch.channels_last_3d)
    assert vol_cl.stride(1) == 1
    gouts = [torch.randn(1, 7, 8), torch.randn(1, 7), torch.randn(1, 7)]
    want, gw = run(render_sdf, inp, gouts)
    got, gg = run(render_sdf, [vol_cl] + inp[1:], gouts)
    for a, b in zip(got + gg, want + gw):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    vol = vol_cl.detach().requires_grad_()
    with capture_launches() as launches:
        render_sdf(vol, *inp[1:])
    assert launches[0].args[0][2] == vol.data_ptr()      # the kernel got the caller's storage


def test_trusted_path_makes_no_host_sync():
    from tests.sync_count import count_host_syncs
    inp = [x.float().requires_grad_() for x in inputs_for(1, 6, 5, 3, 2, 3, 4, 8.0, 3)]
    for validate, want in ((False, 0), (True, 1)):
        with count_host_syncs() as syncs:
            out = render_sdf(*inp, validate=validate)
            sum(o.sum() for o in out).backward()
        assert syncs.count == want, syncs.calls


def test_cpu_dispatch_uses_reference(monkeypatch):
    inp = [x.float() for x in inputs_for(1, 4, 5, 3, 2, 3, 3, 8.0, 1)]
    monkeypatch.setenv("NANO4D_FORCE_TRITON", "0")
    a = render_sdf(*inp)
    b = render_sdf_ref(*inp)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_opcheck():
    inp = [x.float() for x in inputs_for(1, 5, 4, 3, 2, 3, 3, 8.0, 2)]
    args = tuple(x.requires_grad_(i != 4) for i, x in enumerate(inp))
    torch.library.opcheck(torch.ops.nano4d.render_sdf.default, args)
    with torch.no_grad():
        feat, depth, opac, nsec, tlast = torch.ops.nano4d.render_sdf(*args)
    bargs = (torch.randn_like(feat), torch.randn_like(depth), torch.randn_like(opac),
             *[x.detach() for x in args], nsec, tlast)
    torch.library.opcheck(torch.ops.nano4d.render_sdf_backward.default, bargs,
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- sdf_gradient_ref

def test_sdf_gradient_ref_linear_field_and_double_backward():
    n = (5, 4, 7)  # Z, Y, X
    a, b, c = 0.3, -0.7, 1.1
    zs, ys, xs = torch.meshgrid(*[torch.linspace(-1, 1, k, dtype=torch.float64) for k in n], indexing="ij")
    vol = (a * xs + b * ys + c * zs)[None, None].clone().requires_grad_()
    pts = torch.rand(1, 50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.8 - 0.9
    g = sdf_gradient_ref(vol, pts)
    torch.testing.assert_close(g, torch.tensor([a, b, c], dtype=torch.float64).expand(1, 50, 3))
    # equals autograd through grid_sample (first derivative)
    p = pts.clone().requires_grad_()
    v2 = torch.randn(1, 1, *n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    val = F.grid_sample(v2, p[:, :, None, None], align_corners=True).sum()
    (gp,) = torch.autograd.grad(val, p)
    torch.testing.assert_close(sdf_gradient_ref(v2, pts), gp)
    # eikonal loss backpropagates to the grid (what grid_sample's backward cannot do twice)
    assert torch.autograd.gradcheck(lambda v: ((sdf_gradient_ref(v, pts).norm(dim=-1) - 1) ** 2).mean(), (vol,))


# ----------------------------------------------------------------------------- ahead-of-time compile

def _aot_launches(vol_dtype=torch.float32, C=33, channels_last=False):
    """The launches of one forward + backward through the public op (GPU block sizes; nothing runs)."""
    from tests.aot import capture_launches
    vol = torch.randn(1, C, 4, 5, 6, dtype=vol_dtype)
    if channels_last:
        vol = vol.contiguous(memory_format=torch.channels_last_3d)
    vol.requires_grad_()
    o = torch.zeros(1, 64, 3).requires_grad_()
    d = torch.ones(1, 64, 3).requires_grad_()
    t = torch.linspace(0, 1, 12).expand(1, 64, 12).contiguous().requires_grad_()
    inv_s = torch.tensor(20.0).requires_grad_()
    with capture_launches() as launches:
        feat, depth, opac = render_sdf(vol, o, d, t, inv_s)
        (feat.sum() + depth.sum() + opac.sum()).backward()
    return launches


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_aot_compile_gpu_config(layout):
    """The launcher's GPU configuration, compiled as the JIT would, for sm_90 and sm_80: no register
    spills, relaxed atomics, for the contiguous and the channels-last volume (MIM4D's 33 channels)."""
    import re
    from tests.aot import aot_compile_launch
    launches = _aot_launches(channels_last=layout == "channels_last")
    assert [x.name for x in launches] == ["_sdf_render_fwd_kernel", "_sdf_render_bwd_kernel"]
    for launch in launches:
        for arch, c in aot_compile_launch(launch, targets=(90,) if layout == "channels_last" else (90, 80),
                                          stats=True).items():
            md = c.metadata
            print(f"sdf_render {launch.name} {launch.kwargs} sm_{arch}: shared {md.shared} B, {md.regs} regs, "
                  f"spills {md.spill_stores}/{md.spill_loads} B")
            assert md.spill_stores == 0 and md.spill_loads == 0, (launch.name, arch)
            atomics = re.findall(r"\b(?:red|atom)\.[\w.]+", c.asm["ptx"])
            assert all(".relaxed" in a for a in atomics), atomics


@pytest.mark.slow
@pytest.mark.parametrize("vol_dtype", [torch.bfloat16, torch.float16])
def test_aot_compile_low_precision_volume(vol_dtype):
    from tests.aot import aot_compile_launch
    for launch in _aot_launches(vol_dtype):
        aot_compile_launch(launch, targets=(90,))


# ----------------------------------------------------------------------------- GPU, real sizes

@pytest.mark.gpu
@pytest.mark.parametrize("vol_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["mim4d", "dense"])
def test_gpu_real_sizes(case, vol_dtype):
    torch.manual_seed(0)
    if case == "mim4d":
        B, C, Z, Y, X, R, S = 2, 33, 5, 128, 128, 2048, 96
    else:
        B, C, Z, Y, X, R, S = 1, 33, 64, 64, 64, 4096, 128
    gen = torch.Generator().manual_seed(0)
    vol = make_volume(gen, B, C, Z, Y, X, dtype=torch.float32)
    o, d, t = make_rays(gen, B, R, S, dtype=torch.float64)
    s = torch.tensor(20.0, dtype=torch.float64)
    inputs = [x.cuda() for x in (vol.double(), o, d, t, s)]
    check_vs_reference(inputs, vol_dtype=vol_dtype, ray_dtype=torch.float32)


@pytest.mark.parametrize("force", ["1", "0"], ids=["kernel", "reference"])
def test_torch_compile_fullgraph_forward_backward(force, monkeypatch):
    """torch.compile(fullgraph=True) traces forward and backward without a graph break on both paths
    (the value checks are skipped while tracing; aot_eager keeps the test cheap)."""
    monkeypatch.setenv("NANO4D_FORCE_TRITON", force)
    inp = [x.float().requires_grad_() for x in inputs_for(1, 6, 5, 3, 2, 3, 4, 8.0, 3)]

    def loss(*a):
        f, d, o = render_sdf(*a)
        return f.square().sum() + d.sum() + o.sum()
    torch._dynamo.reset()
    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(*inp)
    g = torch.autograd.grad(got, inp)
    want = loss(*inp)
    gw = torch.autograd.grad(want, inp)
    torch.testing.assert_close(got, want)
    for a, b in zip(g, gw):
        torch.testing.assert_close(a, b)
