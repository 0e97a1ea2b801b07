"""Tests for kernels/patch_attn.py: segment-id masked attention (Triton kernel vs explicit-mask reference).

On CPU the kernels run through the Triton interpreter (tests/conftest.py); interpreted bf16 dots are
upcast to fp32 by the launcher (the interpreter computes bf16 tl.dot wrongly), real bf16 dots are checked by the @gpu tests.
Interpreter cost grows with B*H*N^2, so the property test caps B*H*N (see ``_shape``).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels import patch_attn as pa
from kernels.patch_attn import patch_attention, patch_attention_ref
from tests.tolerance import assert_close_fa

DEV = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUTS = ("none", "equal_views", "unequal_views", "ragged", "interleaved", "one_token", "all_padding")


# ----------------------------------------------------------------------------- helpers

def make_segments(kind: str, B: int, N: int, gen: torch.Generator) -> torch.Tensor | None:
    """Segment-id layouts: (B, N) int64 or None."""
    if kind == "none":
        return None
    if kind == "equal_views":
        V = int(torch.randint(1, min(N, 6) + 1, (1,), generator=gen))
        n = math.ceil(N / V)
        return (torch.arange(N) // n).repeat(B, 1)
    rows = []
    for b in range(B):
        if kind == "unequal_views" or kind == "one_token":
            cuts = torch.randperm(max(N - 1, 1), generator=gen)[: int(torch.randint(0, 4, (1,), generator=gen))] + 1
            lens = torch.diff(torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([N])]))
            lens = lens[lens > 0]
            if kind == "one_token" and N >= 2:
                lens = torch.cat([lens[:1] - 1, torch.tensor([1]), lens[1:]]) if lens[0] > 1 else \
                    torch.cat([torch.tensor([1]), lens[:1] - 1, lens[1:]])
                lens = lens[lens > 0]
            ids = torch.repeat_interleave(torch.arange(len(lens)) * 3 + 1, lens)  # ids need not start at 0
        elif kind == "ragged":
            L = int(torch.randint(1, N + 1, (1,), generator=gen))
            ids = torch.full((N,), -1)
            ids[:L] = torch.arange(L) * 2 // max(L, 1)  # two objects, then padding
            if b == B - 1 and N > 1:
                ids[N // 2:] = -1  # at least one padded row in the batch
        elif kind == "interleaved":
            ids = torch.randint(-1, 3, (N,), generator=gen)
        elif kind == "all_padding":
            ids = torch.full((N,), -1) if b == 0 else torch.randint(0, 2, (N,), generator=gen).cumsum(0) // 2
        else:
            raise AssertionError(kind)
        rows.append(ids)
    return torch.stack(rows).long()


def rand_qkv(B, H, N, D, dtype, gen, device=DEV, requires_grad=True):
    out = []
    for _ in range(3):
        t = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        out.append(t.requires_grad_(requires_grad))
    return out


def run_with_grad(fn, q, k, v, do, *args):
    qq, kk, vv = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o = fn(qq, kk, vv, *args)
    grads = torch.autograd.grad(o, (qq, kk, vv), do.to(o.dtype))
    return o.detach(), [g.detach() for g in grads]


def check_against_ref(q, k, v, seg, scale=None, gen=None, grad_atol=None):
    """Kernel (input dtype) vs fp64 reference, bounded by the same-dtype reference error (FA rule)."""
    dtype = q.dtype
    do = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(q.device)
    o, g = run_with_grad(patch_attention, q, k, v, do, seg, scale)
    o64, g64 = run_with_grad(patch_attention_ref, q.double(), k.double(), v.double(), do, seg, scale)
    olo, glo = run_with_grad(patch_attention_ref, q, k, v, do, seg, scale)
    assert o.dtype == dtype and o.shape == q.shape and o.is_contiguous()
    assert_close_fa(o, o64, olo, k=2.0, dtype=dtype, name="out")
    for name, a, a64, alo in zip(("dq", "dk", "dv"), g, g64, glo):
        assert_close_fa(a, a64, alo, k=3.0, dtype=dtype, name=name, atol=grad_atol)
    if seg is not None:  # padding rows: exactly zero output and zero gradients, never garbage
        pad = (seg < 0)[:, None, :, None].expand_as(o).to(o.device)
        assert torch.all(o[pad] == 0)
        for a in g:
            assert torch.all(a[pad] == 0)
    return o, g


def _shape(B, H, N, cap=400):
    """Interpreter budget: shrink H, then B, until B*H*N <= cap (CUDA runs the full draw)."""
    if DEV == "cuda":
        return B, H
    while B * H * N > cap and H > 1:
        H -= 1
    while B * H * N > cap and B > 1:
        B -= 1
    return B, H


# ----------------------------------------------------------------------------- kernel vs reference

@settings(max_examples=6)
@given(B=st.integers(1, 3), H=st.integers(1, 4), N=st.integers(1, 300), D=st.sampled_from([8, 24, 48, 64, 72]),
       layout=st.sampled_from(LAYOUTS), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_matches_reference(B, H, N, D, layout, dtype, seed):
    B, H = _shape(B, H, N)
    gen = torch.Generator().manual_seed(seed)
    seg = make_segments(layout, B, N, gen)
    q, k, v = rand_qkv(B, H, N, D, dtype, gen)
    check_against_ref(q, k, v, None if seg is None else seg.to(DEV), gen=gen)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_fp32(layout):
    """Each segment layout once, deterministic, fp32, N not a multiple of any block size."""
    gen = torch.Generator().manual_seed(LAYOUTS.index(layout))
    B, H, N, D = 2, 1, 101, 24
    seg = make_segments(layout, B, N, gen)
    q, k, v = rand_qkv(B, H, N, D, torch.float32, gen)
    check_against_ref(q, k, v, None if seg is None else seg.to(DEV), gen=gen)


def test_custom_scale_and_head_dims_at_bucket_edges():
    gen = torch.Generator().manual_seed(3)
    for D in (16, 17, 33):
        q, k, v = rand_qkv(1, 2, 40, D, torch.float32, gen)
        seg = torch.tensor([[0] * 15 + [1] * 20 + [-1] * 5], device=DEV)
        check_against_ref(q, k, v, seg, scale=0.3, gen=gen)


def test_reference_mask_semantics_by_brute_force():
    """The reference against a per-row loop over the explicit rule s[i] == s[j] >= 0."""
    gen = torch.Generator().manual_seed(0)
    B, H, N, D = 2, 2, 13, 5
    q, k, v = rand_qkv(B, H, N, D, torch.float64, gen, device="cpu", requires_grad=False)
    seg = torch.tensor([[0, 0, 1, 1, 1, -1, 0, 2, 2, -1, 1, 3, 0], [-1] * 13])
    out = patch_attention_ref(q, k, v, seg, scale=0.7)
    for b in range(B):
        for i in range(N):
            js = [j for j in range(N) if seg[b, i] == seg[b, j] and seg[b, j] >= 0]
            if not js:
                assert torch.all(out[b, :, i] == 0)
                continue
            w = torch.softmax(0.7 * q[b, :, i, None] @ k[b, :, js].transpose(-1, -2), dim=-1)  # (H, 1, |js|)
            torch.testing.assert_close(out[b, :, i], (w @ v[b, :, js])[:, 0])


def test_reference_chunking_is_exact():
    gen = torch.Generator().manual_seed(1)
    q, k, v = rand_qkv(2, 3, 50, 8, torch.float64, gen, device="cpu")
    seg = make_segments("unequal_views", 2, 50, gen)
    do = torch.randn(2, 3, 50, 8, generator=gen, dtype=torch.float64)
    o1, g1 = run_with_grad(patch_attention_ref, q, k, v, do, seg)
    o2, g2 = run_with_grad(lambda *a: patch_attention_ref(*a, chunk_elems=2 * 3 * 50 * 7), q, k, v, do, seg)
    torch.testing.assert_close(o1, o2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- equivalences

def test_framewise_equal_views_equals_dense_on_reshape():
    """Frame-wise with V equal views == dense attention of the (B*V, H, n, D) reshape (kernel both ways)."""
    gen = torch.Generator().manual_seed(4)
    B, V, n, H, D = 2, 3, 45, 2, 48
    q, k, v = rand_qkv(B, H, V * n, D, torch.float32, gen)
    seg = torch.arange(V).repeat_interleave(n).repeat(B, 1).to(DEV)
    do = torch.randn(q.shape, generator=gen).to(DEV)
    o, g = run_with_grad(patch_attention, q, k, v, do, seg)

    def fold(t):  # (B, H, V*n, D) -> (B*V, H, n, D)
        return t.reshape(B, H, V, n, D).permute(0, 2, 1, 3, 4).reshape(B * V, H, n, D)

    od, gd = run_with_grad(lambda a, b_, c: patch_attention(fold(a), fold(b_), fold(c)), q, k, v, fold(do))
    torch.testing.assert_close(fold(o), od, atol=2e-6, rtol=1e-5)
    for a, b_ in zip(g, gd):
        torch.testing.assert_close(a, b_, atol=2e-6, rtol=1e-5)


def test_global_equals_plain_softmax_attention():
    """One segment id per sample (global) == no ids == PyTorch SDPA."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = rand_qkv(2, 2, 97, 64, torch.float32, gen)
    seg = torch.tensor([[7], [0]]).expand(2, 97).to(DEV)  # an expanded (stride-0) id tensor
    do = torch.randn(q.shape, generator=gen).to(DEV)
    o1, g1 = run_with_grad(patch_attention, q, k, v, do, seg)
    o2, g2 = run_with_grad(patch_attention, q, k, v, do, None)
    o3, g3 = run_with_grad(F.scaled_dot_product_attention, q, k, v, do)
    torch.testing.assert_close(o1, o2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(o1, o3, atol=1e-5, rtol=1e-4)
    for a, b, c in zip(g1, g2, g3):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)


def test_padding_rows_zero_output_zero_grad_and_no_influence():
    """Padding tokens: zero output rows, zero dq/dk/dv, and changing them changes nothing else."""
    gen = torch.Generator().manual_seed(6)
    B, H, N, D = 2, 2, 70, 24
    q, k, v = rand_qkv(B, H, N, D, torch.float32, gen)
    seg = torch.tensor([[0] * 30 + [1] * 25 + [-1] * 15, [-1] * 5 + [2] * 60 + [-1] * 5]).to(DEV)
    do = torch.randn(q.shape, generator=gen).to(DEV) * 10  # nonzero upstream gradient on padding rows too
    o, g = run_with_grad(patch_attention, q, k, v, do, seg)
    pad = (seg < 0)[:, None, :, None].expand_as(o)
    assert torch.equal(o[pad], torch.zeros_like(o[pad]))
    for a in g:
        assert torch.equal(a[pad], torch.zeros_like(a[pad]))
    q2, k2, v2 = [torch.where(pad, t.detach() * 100 + 3, t.detach()) for t in (q, k, v)]
    o2, g2 = run_with_grad(patch_attention, q2, k2, v2, do, seg)
    torch.testing.assert_close(o2, o, atol=0, rtol=0)
    for a, b in zip(g, g2):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_one_token_segment_attends_to_itself():
    gen = torch.Generator().manual_seed(7)
    q, k, v = rand_qkv(1, 2, 9, 8, torch.float32, gen)
    seg = torch.tensor([[0, 0, 0, 5, 1, 1, 1, 1, -1]]).to(DEV)
    o = patch_attention(q, k, v, seg)
    torch.testing.assert_close(o[:, :, 3], v[:, :, 3].detach(), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- block skipping

def _ranges_torch(seg, bm, bn):
    """Independent torch version of the block-range pre-pass: per-block min/max of ids >= 0 give [lo, hi);
    column blocks holding only the one id of a padding-free row block give the unmasked run [flo, fhi)."""
    B, N = seg.shape

    def minmax(bs):
        nb = math.ceil(N / bs)
        s = torch.full((B, nb * bs), -1, dtype=torch.long)
        s[:, :N] = seg
        s = s.view(B, nb, bs)
        return (torch.where(s >= 0, s, 2**31 - 1).amin(-1), torch.where(s >= 0, s, -1).amax(-1),
                s.amin(-1), s.amax(-1))

    (rmin, rmax, r_lo, _), (cmin, cmax, c_lo, c_hi) = minmax(bm), minmax(bn)
    meet = (cmin[:, None, :] <= rmax[:, :, None]) & (cmax[:, None, :] >= rmin[:, :, None])
    nc = meet.shape[-1]
    idx = torch.arange(nc)
    lo = torch.where(meet, idx, nc).amin(-1)
    hi = torch.where(meet, idx + 1, 0).amax(-1)
    lo = torch.minimum(lo, hi)
    one = (r_lo == rmax) & (rmax >= 0)
    full = one[:, :, None] & (c_lo[:, None, :] == rmax[:, :, None]) & (c_hi[:, None, :] == rmax[:, :, None])
    flo = torch.where(full, idx, nc).amin(-1)
    fhi = torch.where(full, idx + 1, 0).amax(-1)
    run = (full.sum(-1) > 0) & (full.sum(-1) == fhi - flo)
    return torch.stack([lo, hi, torch.where(run, flo, lo), torch.where(run, fhi, lo)], -1)


def test_block_range_kernel_matches_torch():
    gen = torch.Generator().manual_seed(19)
    for kind in ("interleaved", "unequal_views", "ragged", "all_padding", "equal_views"):
        for N, bm, bn in ((301, 64, 128), (1, 16, 16), (700, 128, 16)):
            seg = make_segments(kind, 2, N, gen)
            got = pa._block_ranges(seg.to(DEV, torch.int32), bm, bn).cpu()
            assert torch.equal(got.long(), _ranges_torch(seg, bm, bn)), (kind, N, bm, bn)
    # one id in blocks 0, 1 and 3 but another in block 2: those full blocks are not one run -> no unmasked run
    seg = torch.tensor([[0] * 32 + [5] * 16 + [0] * 16]).repeat(2, 1)
    seg[1, 40] = -1                                   # and a padding token inside a block of the other row
    got = pa._block_ranges(seg.to(DEV, torch.int32), 16, 16).cpu().long()
    assert torch.equal(got, _ranges_torch(seg, 16, 16))
    assert got[0, 0].tolist() == [0, 4, 0, 0] and got[0, 2].tolist() == [2, 3, 2, 3]
    assert got[1, 2].tolist() == [2, 3, 2, 2]         # row block 2 holds padding: masked


def _visited_pairs(seg, bm, bn):
    r = pa._block_ranges(seg.to(DEV, torch.int32), bm, bn).cpu()
    return int((r[..., 1] - r[..., 0]).clamp_min(0).sum())


def test_block_ranges_cover_every_allowed_pair():
    """For arbitrary ids (contiguous or not) every (i, j) with equal ids >= 0 lies in a visited block pair."""
    gen = torch.Generator().manual_seed(8)
    for kind in ("interleaved", "unequal_views", "ragged", "one_token", "all_padding"):
        for bm, bn in ((64, 128), (128, 64), (32, 32)):
            seg = make_segments(kind, 2, 301, gen).to(torch.int32)
            r = pa._block_ranges(seg.to(DEV), bm, bn).cpu()
            allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)
            bi = torch.arange(301) // bm
            bj = torch.arange(301) // bn
            b, i, j = allowed.nonzero(as_tuple=True)
            lo, hi = r[b, bi[i], 0], r[b, bi[i], 1]
            assert bool(((bj[j] >= lo) & (bj[j] < hi)).all()), (kind, bm, bn)
            # the unmasked run lies inside [lo, hi) and every pair of its tiles is allowed
            flo, fhi = r[..., 2], r[..., 3]
            assert bool(((r[..., 0] <= flo) & (flo <= fhi) & (fhi <= r[..., 1])).all()), (kind, bm, bn)
            pad = torch.full((2, 512), -1, dtype=torch.int32)
            pad[:, :301] = seg
            for b in range(2):
                for rb in range(r.shape[1]):
                    for cb in range(int(flo[b, rb]), int(fhi[b, rb])):
                        rows, cols = pad[b, rb * bm:(rb + 1) * bm], pad[b, cb * bn:(cb + 1) * bn]
                        assert bool((rows[:, None] == cols[None, :]).all() and (cols >= 0).all()), (kind, bm, bn)


def test_block_skipping_framewise_costs_one_over_v():
    """Contiguous views: frame-wise visits ~1/V of the block pairs of global attention."""
    V, n = 12, 197
    seg = torch.arange(V).repeat_interleave(n)[None]
    for bm, bn in ((128, 64), (64, 64), (64, 128)):
        glob = _visited_pairs(torch.zeros_like(seg), bm, bn)
        frame = _visited_pairs(seg, bm, bn)
        tight = math.ceil(V * n / bm) * math.ceil(V * n / bn)
        assert glob == tight
        # each query block meets the key blocks of at most 2-3 views: <= (n/bn + 2 + bm/bn) blocks per row block
        assert frame <= math.ceil(V * n / bm) * (math.ceil(n / bn) + 2 + math.ceil(bm / bn)), (frame, glob)
        assert frame < glob / 3
    # padding blocks are skipped entirely; all-padding rows visit nothing
    r = pa._block_ranges(torch.full((1, 300), -1, dtype=torch.int32, device=DEV), 64, 64).cpu()
    assert torch.all(r[..., 1] <= r[..., 0])


def test_interleaved_ids_with_skipping_layout_still_exact():
    """Ids that reappear far apart (0..., 1..., 0...) must not be cut off by the block ranges."""
    gen = torch.Generator().manual_seed(9)
    N = 300
    ids = torch.cat([torch.zeros(100), torch.ones(150), torch.zeros(50)]).long()[None]
    q, k, v = rand_qkv(1, 1, N, 16, torch.float32, gen)
    check_against_ref(q, k, v, ids.to(DEV), gen=gen)


# ----------------------------------------------------------------------------- autograd, op, determinism

def test_gradcheck_fp64_reference_and_kernel():
    gen = torch.Generator().manual_seed(10)
    seg = torch.tensor([[0, 0, 1, 1, 1, -1, 0]]).to(DEV)
    q, k, v = rand_qkv(1, 1, 7, 4, torch.float64, gen)
    assert torch.autograd.gradcheck(lambda a, b, c: patch_attention_ref(a, b, c, seg), (q, k, v))
    assert pa.use_triton(q)  # the Triton op (interpreted on CPU), fp64 accumulation
    # the interpreter is slow: random-projection (fast_mode) gradcheck for the kernel
    assert torch.autograd.gradcheck(lambda a, b, c: patch_attention(a, b, c, seg, 0.5), (q, k, v),
                                    fast_mode=DEV == "cpu")


def test_backward_is_deterministic():
    gen = torch.Generator().manual_seed(11)
    q, k, v = rand_qkv(2, 2, 150, 24, torch.float32, gen)
    seg = make_segments("unequal_views", 2, 150, gen).to(DEV)
    do = torch.randn(q.shape, generator=gen).to(DEV)
    o1, g1 = run_with_grad(patch_attention, q, k, v, do, seg)
    o2, g2 = run_with_grad(patch_attention, q, k, v, do, seg)
    assert torch.equal(o1, o2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)  # no atomics: bitwise equal


def test_opcheck_registered_op():
    gen = torch.Generator().manual_seed(12)
    q, k, v = rand_qkv(1, 2, 20, 16, torch.float32, gen)
    seg = torch.tensor([[0] * 8 + [1] * 9 + [-1] * 3], dtype=torch.int32, device=DEV)
    torch.library.opcheck(torch.ops.nano4d.patch_attention.default, (q, k, v, seg, 0.25))
    torch.library.opcheck(torch.ops.nano4d.patch_attention.default, (q, k, v, None, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_public_api_exported():
    assert kernels.patch_attention is patch_attention
    assert kernels.patch_attention_ref is patch_attention_ref
    assert "patch_attention" in kernels.__all__ and "patch_attention_ref" in kernels.__all__


def test_cpu_dispatch_uses_reference(monkeypatch):
    monkeypatch.setenv("NANO4D_FORCE_TRITON", "0")
    gen = torch.Generator().manual_seed(13)
    q, k, v = rand_qkv(1, 1, 5, 8, torch.float32, gen, device="cpu")
    calls = []
    monkeypatch.setattr(pa, "_patch_attn_fwd", lambda *a: calls.append(1))
    out = patch_attention(q, k, v, torch.tensor([[0, 0, 1, 1, -1]]))
    assert not calls and out.shape == q.shape and torch.all(out[0, 0, 4] == 0)


# ----------------------------------------------------------------------------- inputs

def test_non_contiguous_views_of_packed_qkv():
    """q, k, v as strided views of one (B, N, 3, H, D) tensor; also an expanded head axis; and bf16."""
    gen = torch.Generator().manual_seed(14)
    for dtype in (torch.float32, torch.bfloat16):
        B, N, H, D = 2, 77, 3, 24
        qkv = torch.randn(B, N, 3, H, D, generator=gen).to(DEV, dtype).requires_grad_()
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        assert not q.is_contiguous()
        seg = make_segments("ragged", B, N, gen).to(DEV)
        o = patch_attention(q, k, v, seg)
        do = torch.randn(o.shape, generator=gen).to(DEV, dtype)
        (gqkv,) = torch.autograd.grad(o, qkv, do)
        qc, kc, vc = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
        oc = patch_attention(qc, kc, vc, seg)
        gc = torch.autograd.grad(oc, (qc, kc, vc), do)
        assert torch.equal(o, oc)
        assert torch.equal(gqkv, torch.stack(gc, 0).permute(1, 3, 0, 2, 4))
    kx = torch.randn(1, 1, 30, 16, generator=gen).to(DEV).expand(2, 4, 30, 16)  # stride-0 batch/head
    q = torch.randn(2, 4, 30, 16, generator=gen).to(DEV)
    torch.testing.assert_close(patch_attention(q, kx, kx), patch_attention_ref(q, kx, kx), atol=1e-5, rtol=1e-5)
    # a non-contiguous upstream gradient (expanded) is accepted
    q, k, v = rand_qkv(1, 2, 10, 8, torch.float32, gen)
    patch_attention(q, k, v).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_empty_sequence_gives_empty_output_and_grads():
    for N in (0,):
        q, k, v = [torch.randn(2, 3, N, 16, device=DEV, requires_grad=True) for _ in range(3)]
        seg = torch.zeros(2, N, dtype=torch.long, device=DEV)
        o = patch_attention(q, k, v, seg)
        assert o.shape == (2, 3, 0, 16)
        o.sum().backward()
        assert q.grad.shape == q.shape
    o = patch_attention(*[torch.randn(0, 2, 5, 8, device=DEV) for _ in range(3)])
    assert o.shape == (0, 2, 5, 8)


@pytest.mark.parametrize("case,match", [
    (lambda q: dict(q=q[..., :-1]), "k"),
    (lambda q: dict(k=q[:, :, :-1]), "k"),
    (lambda q: dict(v=q[:1]), "v"),
    (lambda q: dict(q=q[0]), "q"),
    (lambda q: dict(v=q.half()), "v"),
    (lambda q: dict(q=q.int(), k=q.int(), v=q.int()), "q"),
    (lambda q: dict(segment_ids=torch.zeros(2, 9, dtype=torch.long)), "segment_ids"),
    (lambda q: dict(segment_ids=torch.zeros(2, 10)), "segment_ids"),
    (lambda q: dict(segment_ids=torch.zeros(2, 10, dtype=torch.bool)), "segment_ids"),
    (lambda q: dict(segment_ids=torch.zeros(20, dtype=torch.long)), "segment_ids"),
    (lambda q: dict(segment_ids=torch.zeros(2, 10, dtype=torch.long, device="meta")), "segment_ids"),
    (lambda q: dict(segment_ids=[[0] * 10] * 2), "segment_ids"),
    (lambda q: dict(scale=float("nan")), "scale"),
    (lambda q: dict(scale="0.5"), "scale"),
    (lambda q: dict(q=torch.zeros(2, 3, 10, 300), k=torch.zeros(2, 3, 10, 300), v=torch.zeros(2, 3, 10, 300)), "q"),
    (lambda q: dict(q=torch.zeros(2, 3, 10, 0), k=torch.zeros(2, 3, 10, 0), v=torch.zeros(2, 3, 10, 0)), "head dim"),
])
@pytest.mark.parametrize("force", ["1", "0"], ids=["kernel", "reference"])
def test_bad_inputs_raise_value_error(case, match, force, monkeypatch):
    monkeypatch.setenv("NANO4D_FORCE_TRITON", force)
    q = torch.randn(2, 3, 10, 8)
    args = dict(q=q, k=q.clone(), v=q.clone(), segment_ids=None, scale=None)
    args.update(case(q))
    with pytest.raises(ValueError, match=match):
        patch_attention(**args)


def test_int64_ids_beyond_int32_are_exact():
    gen = torch.Generator().manual_seed(21)
    q, k, v = rand_qkv(1, 1, 30, 8, torch.float32, gen, requires_grad=False)
    small = torch.tensor([[0] * 10 + [1] * 10 + [-1] * 10])
    big = torch.where(small >= 0, small * 2**40 + 2**33, small)     # distinct only as int64
    torch.testing.assert_close(patch_attention(q, k, v, big), patch_attention(q, k, v, small), rtol=0, atol=0)


@pytest.mark.parametrize("force", ["1", "0"], ids=["kernel", "reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_unattended_tokens_contribute_nothing(bad, force, monkeypatch):
    """NaN / Inf in q, k or v of padding tokens (both paths: the kernels never read them) and of tokens in
    other segments (reference: where-selects, not 0 * x): every other row's output and every gradient
    outside those tokens equal the clean run bit for bit."""
    monkeypatch.setenv("NANO4D_FORCE_TRITON", force)
    gen = torch.Generator().manual_seed(22)
    B, H, N, D = 1, 2, 70, 16
    q, k, v = rand_qkv(B, H, N, D, torch.float32, gen, requires_grad=False)
    seg = torch.tensor([[0] * 30 + [1] * 25 + [-1] * 15]).to(DEV)
    do = torch.randn(q.shape, generator=gen).to(DEV)
    o, g = run_with_grad(patch_attention, q, k, v, do, seg)
    # padding token only: nothing anywhere changes
    for which in range(3):
        x = [q.detach().clone(), k.detach().clone(), v.detach().clone()]
        x[which][:, :, 62] = bad
        o2, g2 = run_with_grad(patch_attention, *x, do, seg)
        torch.testing.assert_close(o2, o, rtol=0, atol=0)
        keep = torch.ones(N, dtype=torch.bool)
        keep[62] = False
        for a, b in zip(g2, g):
            torch.testing.assert_close(a[:, :, keep], b[:, :, keep], rtol=0, atol=0)
    # a token of segment 1 only: segment 0 rows and their gradients are untouched (both paths: the kernels read
    # finite copies and put the NaN back only into allowed pairs)
    seg0 = seg[0] == 0
    for which in range(3):
        x = [q.detach().clone(), k.detach().clone(), v.detach().clone()]
        x[which][:, :, 40] = bad
        o2, g2 = run_with_grad(patch_attention, *x, do, seg)
        torch.testing.assert_close(o2[:, :, seg0], o[:, :, seg0], rtol=0, atol=0)
        for a, b in zip(g2, g):
            torch.testing.assert_close(a[:, :, seg0], b[:, :, seg0], rtol=0, atol=0)
        if which == 2 and bad != bad:   # NaN in an attended value: its own segment's rows see it
            assert torch.isnan(o2[:, :, (seg[0] == 1)]).any()


@pytest.mark.parametrize("force", ["1", "0"], ids=["kernel", "reference"])
def test_nonfinite_upstream_gradient_stays_in_its_segment(force, monkeypatch):
    """NaN in dO of one row of segment 1 (e.g. a loss over a NaN output): segment 0's gradients are exact."""
    monkeypatch.setenv("NANO4D_FORCE_TRITON", force)
    gen = torch.Generator().manual_seed(23)
    q, k, v = rand_qkv(1, 2, 70, 16, torch.float32, gen, requires_grad=False)
    seg = torch.tensor([[0] * 30 + [1] * 25 + [-1] * 15]).to(DEV)
    do = torch.randn(q.shape, generator=gen).to(DEV)
    _, g = run_with_grad(patch_attention, q, k, v, do, seg)
    do2 = do.clone()
    do2[:, :, 41] = float("nan")
    do2[:, :, 63] = float("inf")          # and in a padding row: never read
    _, g2 = run_with_grad(patch_attention, q, k, v, do2, seg)
    seg0 = seg[0] == 0
    for a, b in zip(g2, g):
        torch.testing.assert_close(a[:, :, seg0], b[:, :, seg0], rtol=0, atol=0)
        assert torch.isnan(a[:, :, seg[0] == 1]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmasked_full_tiles_match_reference(dtype, monkeypatch):
    """Segments spanning whole blocks: the kernels take the unmasked path on those tiles (the pre-pass gives a
    non-empty run, checked here for the interpreter's block sizes) and still match the reference; a NaN inside
    a full tile reaches its own segment only."""
    monkeypatch.setenv("NANO4D_FORCE_TRITON", "1")
    gen = torch.Generator().manual_seed(24)
    N = 520
    seg = torch.tensor([[0] * 300 + [1] * 200 + [-1] * 20, [3] * 520])
    for bm, bn in (pa._fwd_config(16, dtype, pa.interpreting())[:2], pa._bwd_config(16, dtype, pa.interpreting())[:2]):
        r = pa._block_ranges(seg.to(DEV), bm, bn).cpu()
        assert bool((r[..., 3] > r[..., 2]).any()) and bool((r[1, :-1, 3] > r[1, :-1, 2]).all())
        r = pa._block_ranges(seg.to(DEV), bn, bm).cpu()
        assert bool((r[..., 3] > r[..., 2]).any())
    q, k, v = rand_qkv(2, 1, N, 16, dtype, gen)
    check_against_ref(q, k, v, seg.to(DEV), gen=gen)
    do = torch.randn(q.shape, generator=gen).to(DEV)
    o, g = run_with_grad(patch_attention, q, k, v, do, seg.to(DEV))
    for which in range(3):
        x = [q.detach().clone(), k.detach().clone(), v.detach().clone()]
        x[which][0, :, 10] = float("nan")           # segment 0, inside full tiles
        o2, g2 = run_with_grad(patch_attention, *x, do, seg.to(DEV))
        other = seg[0] != 0
        torch.testing.assert_close(o2[0, :, other], o[0, :, other], rtol=0, atol=0)
        torch.testing.assert_close(o2[1], o[1], rtol=0, atol=0)
        for a, b in zip(g2, g):
            torch.testing.assert_close(a[0, :, other], b[0, :, other], rtol=0, atol=0)
        rows = torch.isnan(o2[0, 0]).any(-1)
        assert bool(rows[10]) and (which == 0 or bool(rows[seg[0] == 0].all()))


def test_device_mismatch_raises():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="k"):
        patch_attention(q, q.to("meta"), q)


def test_nan_in_one_query_row_stays_in_that_row():
    gen = torch.Generator().manual_seed(15)
    q, k, v = rand_qkv(1, 1, 40, 8, torch.float32, gen, requires_grad=False)
    q[0, 0, 5] = float("nan")
    seg = torch.tensor([[0] * 20 + [1] * 20]).to(DEV)
    o = patch_attention(q, k, v, seg)
    assert torch.isnan(o[0, 0, 5]).all()
    rest = torch.ones(40, dtype=torch.bool)
    rest[5] = False
    assert torch.isfinite(o[0, 0, rest]).all()


def test_finite_extreme_logits_do_not_overflow():
    """Scores far beyond exp's range (|logit| up to ~150 > log(fp32 max) = 88.7): the running max
    keeps everything finite and within the FA bound, in fp32 and fp16."""
    gen = torch.Generator().manual_seed(16)
    for dtype in (torch.float32, torch.float16):
        q, k, v = rand_qkv(1, 1, 130, 16, dtype, gen)
        seg = make_segments("unequal_views", 1, 130, gen).to(DEV)
        # Gradients: the backward recomputes P = exp2(s - lse) from an fp32 LSE of magnitude up to ~250
        # (base 2), whose rounding (~250 * 2^-24) is a relative error of ~1e-5 on every P: a property of
        # any FlashAttention-style backward at such logits (the reference subtracts the max before exp).
        # So fp32 grads get that term on top of the FA rule; everything else keeps the plain rule.
        grad_atol = None if dtype != torch.float32 else 1e-5 + 8 * 250 * 2.0**-24 * 2.0
        o, g = check_against_ref(q, k, v, seg, scale=10.0, gen=gen, grad_atol=grad_atol)
        assert torch.isfinite(o).all() and all(torch.isfinite(a).all() for a in g)


def test_very_negative_logits_with_a_key_tail_stay_finite():
    """No ids, N not a multiple of the key block, every logit ~ -200: the zero-padded keys past N
    would get P = exp2(-lse) = inf without the tail mask (and inf * 0 = NaN in dQ)."""
    gen = torch.Generator().manual_seed(20)
    for seg in (None, torch.zeros(1, 130, dtype=torch.long)):
        q, k, v = rand_qkv(1, 1, 130, 16, torch.float32, gen, requires_grad=False)
        q = (q * 0.05 + 2.0).requires_grad_()
        k = (k * 0.05 - 2.0).requires_grad_()
        v.requires_grad_()
        o, g = check_against_ref(q, k, v, None if seg is None else seg.to(DEV), scale=3.0, gen=gen,
                                 grad_atol=1e-5 + 8 * 250 * 2.0**-24 * 2.0)
        assert torch.isfinite(o).all() and all(torch.isfinite(a).all() for a in g)


# ----------------------------------------------------------------------------- ahead-of-time compile

def _aot_all_kernels(dtype, block_d, has_seg=True):
    """Capture one forward + backward through the public op (GPU block sizes, nothing runs) and compile
    every launch as the JIT would: fwd, preprocess, dK/dV, dQ and, with ids, the block-range pre-passes.
    With ids: a ragged tail (EVEN_N False); without ids: the FlashAttention sweep (EVEN_N True)."""
    from tests.aot import aot_compile_launch, capture_launches
    N = 300 if has_seg else 256
    q, k, v = (torch.randn(1, 2, N, block_d, dtype=dtype).requires_grad_() for _ in range(3))
    seg = (torch.arange(N) // 100)[None] if has_seg else None
    with capture_launches() as launches:
        out = patch_attention(q, k, v, seg)
        out.backward(torch.ones_like(out))
    names = {x.name for x in launches}
    assert {"_patch_attn_fwd_kernel", "_patch_attn_bwd_dkdv_kernel", "_patch_attn_bwd_dq_kernel"} <= names
    assert ("_patch_attn_ranges_kernel" in names) == has_seg
    shared, spills = {}, {}
    for launch in launches:
        r = aot_compile_launch(launch, stats=True)
        key = f"{launch.name}{launch.kwargs.get('BLOCK_R', '')}"
        shared[key] = {a: c.metadata.shared for a, c in r.items()}
        spills[key] = max(spills.get(key, 0), r[90].metadata.spill_stores + r[90].metadata.spill_loads)
    print(f"patch_attn AOT {dtype} BLOCK_D={block_d} ids={has_seg}: shared bytes {shared}, sm_90 spills {spills}")
    return shared, spills


# Default run: bf16 at the 64 bucket (MuM's 48/64; GeoLRM's 24/48 use the 32/64 buckets, same code) with
# and without ids (fp16 has the same element size, so the same tiles and shared memory). The rest (-m slow: ~15 min of compiles on a 2-core CPU,
# fp32's exact "ieee" dots compile to long FMA loops) covers every bucket 16..256 x bf16/fp16/fp32.
_FAST = [(torch.bfloat16, 64, True), (torch.bfloat16, 64, False)]
_ALL = [(dt, bd, True) for dt in (torch.bfloat16, torch.float16, torch.float32) for bd in (16, 32, 64, 128, 256)] + \
    [(dt, bd, False) for dt in (torch.bfloat16, torch.float16) for bd in (64, 128)] + \
    [(torch.float64, 64, True), (torch.float64, 256, True)]  # fp64 (verification dtype): both tile branches


@pytest.mark.parametrize("dtype,block_d,has_seg", _FAST)
def test_aot_compile_model_head_dims(dtype, block_d, has_seg):
    """The models' bucket compiles for sm_80 / sm_90 within shared memory, and no kernel spills on sm_90
    (both loops of the forward, dK/dV and dQ: masked and unmasked tiles)."""
    _, spills = _aot_all_kernels(dtype, block_d, has_seg)
    assert not any(spills.values()), spills


@pytest.mark.slow
@pytest.mark.parametrize("dtype,block_d,has_seg", [c for c in _ALL if c not in _FAST])
def test_aot_compile_every_bucket_and_dtype(dtype, block_d, has_seg):
    _aot_all_kernels(dtype, block_d, has_seg)


def test_head_dim_buckets():
    assert [pa._head_block(d) for d in (1, 8, 16, 17, 24, 32, 48, 64, 72, 128, 129, 256)] == \
        [16, 16, 16, 32, 32, 32, 64, 64, 128, 128, 256, 256]


# ----------------------------------------------------------------------------- GPU (real sizes, real bf16 dots)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", ["mum_framewise", "mum_global", "geolrm_ragged", "interleaved_d72"])
def test_gpu_real_sizes(dtype, case):
    gen = torch.Generator().manual_seed(17)
    if case.startswith("mum"):
        B, V, n, H, D = 2, 12, 197, 16, 48
        N = V * n
        seg = torch.arange(V).repeat_interleave(n).repeat(B, 1) if case == "mum_framewise" else torch.zeros(B, N)
    elif case == "geolrm_ragged":
        B, N, H, D = 3, 2048, 16, 24
        seg = torch.full((B, N), -1)
        for b, L in enumerate((2048, 1500, 300)):
            seg[b, :L] = 0
    else:
        B, N, H, D = 2, 1000, 4, 72
        seg = torch.randint(-1, 5, (B, N), generator=gen)
    q, k, v = rand_qkv(B, H, N, D, dtype, gen, device="cuda")
    check_against_ref(q, k, v, seg.long().cuda(), gen=gen)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_nonfinite_stays_in_its_view(dtype):
    """MuM frame-wise sizes with real (pipelined, tensor-core) tiles: NaN in q, k, v or dO of one token of view 3
    leaves every other view's outputs and gradients bit-identical."""
    gen = torch.Generator().manual_seed(25)
    B, V, n, H, D = 2, 12, 197, 8, 48
    seg = torch.arange(V).repeat_interleave(n).repeat(B, 1).cuda()
    q, k, v = rand_qkv(B, H, V * n, D, dtype, gen, device="cuda", requires_grad=False)
    do = torch.randn(q.shape, generator=gen).cuda()
    o, g = run_with_grad(patch_attention, q, k, v, do, seg)
    other = seg[0] != 3
    for which in range(4):
        x = [q.clone(), k.clone(), v.clone(), do.clone()]
        x[which][:, :, 3 * n + 5] = float("nan")
        o2, g2 = run_with_grad(patch_attention, *x, seg)
        assert torch.equal(o2[:, :, other], o[:, :, other])
        assert all(torch.equal(a[:, :, other], b[:, :, other]) for a, b in zip(g2, g))
        assert torch.isnan(g2[0][:, :, seg[0] == 3]).any()


@pytest.mark.gpu
def test_gpu_determinism_at_scale():
    gen = torch.Generator().manual_seed(18)
    q, k, v = rand_qkv(4, 8, 1900, 64, torch.bfloat16, gen, device="cuda")
    seg = make_segments("unequal_views", 4, 1900, gen).cuda()
    do = torch.randn(q.shape, generator=gen).cuda()
    r1 = run_with_grad(patch_attention, q, k, v, do, seg)
    for _ in range(5):
        r2 = run_with_grad(patch_attention, q, k, v, do, seg)
        assert torch.equal(r1[0], r2[0]) and all(torch.equal(a, b) for a, b in zip(r1[1], r2[1]))



@pytest.mark.parametrize("force", ["1", "0"], ids=["kernel", "reference"])
def test_torch_compile_fullgraph_forward_backward(force, monkeypatch):
    """torch.compile(fullgraph=True) traces forward and backward without a graph break on both paths,
    with and without segment ids (aot_eager keeps the test cheap)."""
    monkeypatch.setenv("NANO4D_FORCE_TRITON", force)
    gen = torch.Generator().manual_seed(30)
    q, k, v = rand_qkv(1, 2, 20, 8, torch.float32, gen)
    for seg in (torch.tensor([[0] * 8 + [1] * 8 + [-1] * 4]).to(DEV), None):
        torch._dynamo.reset()
        fn = torch.compile(lambda a, b, c: patch_attention(a, b, c, seg).square().sum(), fullgraph=True,
                           backend="aot_eager")
        got = fn(q, k, v)
        g = torch.autograd.grad(got, (q, k, v))
        want = patch_attention(q, k, v, seg).square().sum()
        gw = torch.autograd.grad(want, (q, k, v))
        torch.testing.assert_close(got, want)
        for a, b in zip(g, gw):
            torch.testing.assert_close(a, b)
