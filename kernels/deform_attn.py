"""Multi-scale deformable attention (MSDA): Triton forward + backward, and a grid_sample reference.

For every batch b, query q and head h, the output is a weighted sum of bilinear samples taken from
M feature maps at P learned points per map:

    out[b, q, h, :] = sum_{m<M, p<P}  A[b,q,h,m,p] * bilinear(V_m[b, :, :, h, :], loc[b,q,h,m,p])

    V_m[b, i, j, h, :] = value[b, level_start_index[m] + i * W_m + j, h, :]    (i < H_m, j < W_m)
    loc = (x, y) in [0, 1]  ->  pixel coordinate (x * W_m - 0.5, y * H_m - 0.5)

Bilinear sampling follows ``F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)``:
in units of loc * (W_m, H_m), pixel (i, j) has its centre at (j + 0.5, i + 0.5), so loc 0 and 1 are the
outer edges of the map; each of the 4 corners that falls outside the map contributes zero (points off
the map are legal and common: anchors that project outside an image). This is exactly the standard
MSDA interface (Deformable-DETR / mmcv ``MultiScaleDeformableAttention``), without ``im2col_step``.

Layouts
    value               (B, S, H, D)   S = sum_m H_m * W_m, the M maps flattened row-major, concatenated
    spatial_shapes      (M, 2) int64   (H_m, W_m)
    level_start_index   (M,)   int64   exclusive cumsum of H_m * W_m
    sampling_locations  (B, Q, H, M, P, 2)   (x, y) order, normalized to [0, 1]
    attention_weights   (B, Q, H, M, P)      normalized by the caller (e.g. softmax over M*P)
    output              (B, Q, H * D)        in value's dtype

Multiple views (GeoLRM, BEVFormer-style) are handled by the caller folding views into the batch and
fusing the per-view results afterwards, e.g. GeoLRM's learned softmax over views:

    v = feats.flatten(0, 1)                                   # (B*V, S, H, D) per-view feature maps
    loc = project(anchors, cams).flatten(0, 1)                # (B*V, Q, H, M, P, 2) per-view points
    out = deform_attn(v, shapes, starts, loc, w.flatten(0, 1)).view(B, V, Q, H * D)
    score = view_logit(out).softmax(dim=1)                    # (B, V, Q, 1) learned view weights
    fused = (score * out).sum(dim=1)                          # (B, Q, H*D)

Differentiable w.r.t. value, sampling_locations and attention_weights (first order through the
kernel; the reference supports higher orders). As in grid_sample, the location gradient is the
right-sided derivative at the kinks of bilinear interpolation (integer pixel coordinates).

Non-finite locations: a NaN/Inf coordinate (or one so far outside that no corner can touch the map)
makes that sample contribute exactly zero, with zero gradient; no memory is ever read or written out
of bounds (corner loads/atomics are masked). NaN/Inf in ``value`` or ``attention_weights`` propagate
like in any weighted sum (note 0 * Inf = NaN).

Limits / dtypes: value, sampling_locations and attention_weights may each be fp32, bf16 or fp16 (or
fp64, for gradcheck); arithmetic accumulates in fp32 (fp64 if any input is fp64). The output and
grad_value take value's dtype, grad_loc / grad_weights their input's dtype. grad_value is accumulated
with fp32 atomics into a (B, S, H, D) fp32 buffer, then cast, so the GPU backward is deterministic only
up to the atomics' summation order. The Triton kernel takes any head dim D: up to 256 channels per
launch (padded to a power-of-two block with masks), larger D in near-equal chunks of <= 256 channels
(one launch each, location/weight gradients summed over chunks); any M >= 1 and P >= 1; int64 offsets.
Grid: one flat axis of B * H * ceil(Q / BLOCK_Q) programs. Host syncs: map metadata given as Python
ints is checked on the host for free (zero syncs per call); given as tensors, the public op checks their
values with one small device->host copy per call unless ``validate=False`` (then zero syncs, CUDA-graph
capturable). The backward never syncs. The reference (CPU path) has no limit on D and computes in value's dtype
(locations and weights are cast to it); use fp32 locations for large maps (bf16 has 8 mantissa bits).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import (FLOAT_DTYPES, acc_dtype, check_index_range, check_tensor, interpreting, launch,
                             next_pow2, tl_dtype, tracing, use_triton)

MAX_D = 256  # channels per launch (larger head dims run in chunks)
# Register budget of the backward on sm_90+: Triton runs ptxas with --regAllocOptLevel=2, which for some
# specializations settles at 128 registers and spills ~16 B; 168 leaves 3 blocks of 4 warps per SM.
BWD_MAXNREG = 168


# ============================================================================ Triton kernels
# Index math runs in int32 unless IDX64 (the launcher sets it when any tensor reaches 2^31 elements).
# D is a constexpr and VEC (a power of two dividing D and the value / output strides) is promised to the
# compiler with tl.multiple_of, so a corner's D channels are vector loads (and vector atomics in the
# backward) for any D that is a multiple of 8, not only multiples of 16.

@triton.jit
def _corner_setup(loc_ptr, i, mask_q, Hm, Wm, ACC: tl.constexpr):
    """Pixel-space bilinear setup for one (m, p) sample of BLOCK_Q queries.

    Returns the flat index of the top-left corner relative to the map start (y0 * W + x0), the
    fractional parts (fx, fy) and the validity masks of the two columns / rows. Non-finite / far-away
    coordinates are moved to -2 (no corner on the map)."""
    lx = tl.load(loc_ptr + 2 * i, mask=mask_q, other=0.0).to(ACC)
    ly = tl.load(loc_ptr + 2 * i + 1, mask=mask_q, other=0.0).to(ACC)
    wf = Wm.to(ACC)
    hf = Hm.to(ACC)
    x = lx * wf - 0.5
    y = ly * hf - 0.5
    # NaN fails every comparison, so it is replaced too; this also keeps floor() -> int in range.
    keep = (x > -2.0) & (x < wf + 1.0) & (y > -2.0) & (y < hf + 1.0)
    x = tl.where(keep, x, -2.0)
    y = tl.where(keep, y, -2.0)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    fx = x - x0f
    fy = y - y0f
    x0 = x0f.to(Wm.dtype)
    y0 = y0f.to(Wm.dtype)
    okx0 = (x0 >= 0) & (x0 < Wm)
    okx1 = (x0 >= -1) & (x0 < Wm - 1)
    oky0 = (y0 >= 0) & (y0 < Hm)
    oky1 = (y0 >= -1) & (y0 < Hm - 1)
    return y0 * Wm + x0, fx, fy, okx0, okx1, oky0, oky1


@triton.jit
def _program_coords(Q, H, n_qblocks, BLOCK_Q: tl.constexpr, IDX64: tl.constexpr):
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    bh = pid // n_qblocks
    qb = pid - bh * n_qblocks
    b = bh // H
    h = bh - b * H
    offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    return b, h, offs_q, offs_q < Q


@triton.jit
def _level(shapes_ptr, starts_ptr, m, IDX64: tl.constexpr):
    """(H_m, W_m, start_m) of map m, in the kernel's index type."""
    hm = tl.load(shapes_ptr + 2 * m)
    wm = tl.load(shapes_ptr + 2 * m + 1)
    st = tl.load(starts_ptr + m)
    if IDX64:
        return hm.to(tl.int64), wm.to(tl.int64), st.to(tl.int64)
    return hm.to(tl.int32), wm.to(tl.int32), st.to(tl.int32)


@triton.jit
def _deform_attn_fwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attw_ptr, out_ptr,
    Q, H, M, P, n_qblocks,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_oq, stride_oh,
    D: tl.constexpr, VEC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
    IDX64: tl.constexpr,
):
    """value / out have unit stride along D (the launcher guarantees it)."""
    b, h, offs_q, mask_q = _program_coords(Q, H, n_qblocks, BLOCK_Q, IDX64)
    stride_vs = tl.multiple_of(stride_vs, VEC)
    offs_d = tl.arange(0, BLOCK_D)
    md = (offs_d < D)[None, :]
    row = ((b * Q + offs_q) * H + h) * (M * P)          # flat (b, q, h) row of loc / weights
    vbase = value_ptr + tl.multiple_of(b * stride_vb + h * stride_vh, VEC) + offs_d[None, :]
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=ACC)
    for m in range(M):
        Hm, Wm, start = _level(shapes_ptr, starts_ptr, m, IDX64)
        for p in range(P):
            i = row + m * P + p
            pix, fx, fy, okx0, okx1, oky0, oky1 = _corner_setup(loc_ptr, i, mask_q, Hm, Wm, ACC)
            aw = tl.load(attw_ptr + i, mask=mask_q, other=0.0).to(ACC)
            p00 = vbase + ((start + pix) * stride_vs)[:, None]
            p10 = p00 + Wm * stride_vs
            v00 = tl.load(p00, mask=(mask_q & oky0 & okx0)[:, None] & md, other=0.0).to(ACC)
            v01 = tl.load(p00 + stride_vs, mask=(mask_q & oky0 & okx1)[:, None] & md, other=0.0).to(ACC)
            v10 = tl.load(p10, mask=(mask_q & oky1 & okx0)[:, None] & md, other=0.0).to(ACC)
            v11 = tl.load(p10 + stride_vs, mask=(mask_q & oky1 & okx1)[:, None] & md, other=0.0).to(ACC)
            gx = 1.0 - fx
            gy = 1.0 - fy
            acc += ((aw * gy * gx)[:, None] * v00 + (aw * gy * fx)[:, None] * v01
                    + (aw * fy * gx)[:, None] * v10 + (aw * fy * fx)[:, None] * v11)
    obase = out_ptr + tl.multiple_of(b * stride_ob + h * stride_oh, VEC)
    optr = obase + (offs_q * tl.multiple_of(stride_oq, VEC))[:, None] + offs_d[None, :]
    tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=mask_q[:, None] & md)


@triton.jit
def _deform_attn_bwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attw_ptr, gout_ptr,
    gvalue_ptr, gloc_ptr, gattw_ptr,
    Q, H, M, P, S, n_qblocks,
    stride_vb, stride_vs, stride_vh,
    stride_gb, stride_gq, stride_gh,
    D: tl.constexpr, VEC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
    IDX64: tl.constexpr,
):
    """grad_value: relaxed atomics into a contiguous (B, S, H, D) accumulator (fp32, or fp64);
    grad_loc / grad_weights: reductions over D inside the program (each sample has one owner)."""
    b, h, offs_q, mask_q = _program_coords(Q, H, n_qblocks, BLOCK_Q, IDX64)
    stride_vs = tl.multiple_of(stride_vs, VEC)
    offs_d = tl.arange(0, BLOCK_D)
    md = (offs_d < D)[None, :]
    row = ((b * Q + offs_q) * H + h) * (M * P)
    vbase = value_ptr + tl.multiple_of(b * stride_vb + h * stride_vh, VEC) + offs_d[None, :]
    gvbase = gvalue_ptr + (b * S * H + h) * D + offs_d[None, :]      # contiguous accumulator
    gbase = gout_ptr + tl.multiple_of(b * stride_gb + h * stride_gh, VEC)
    g = tl.load(gbase + (offs_q * tl.multiple_of(stride_gq, VEC))[:, None] + offs_d[None, :],
                mask=mask_q[:, None] & md, other=0.0).to(ACC)
    for m in range(M):
        Hm, Wm, start = _level(shapes_ptr, starts_ptr, m, IDX64)
        for p in range(P):
            i = row + m * P + p
            pix, fx, fy, okx0, okx1, oky0, oky1 = _corner_setup(loc_ptr, i, mask_q, Hm, Wm, ACC)
            aw = tl.load(attw_ptr + i, mask=mask_q, other=0.0).to(ACC)
            pix = start + pix
            m00 = (mask_q & oky0 & okx0)[:, None] & md
            m01 = (mask_q & oky0 & okx1)[:, None] & md
            m10 = (mask_q & oky1 & okx0)[:, None] & md
            m11 = (mask_q & oky1 & okx1)[:, None] & md
            p00 = vbase + (pix * stride_vs)[:, None]
            p10 = p00 + Wm * stride_vs
            v00 = tl.load(p00, mask=m00, other=0.0).to(ACC)
            v01 = tl.load(p00 + stride_vs, mask=m01, other=0.0).to(ACC)
            v10 = tl.load(p10, mask=m10, other=0.0).to(ACC)
            v11 = tl.load(p10 + stride_vs, mask=m11, other=0.0).to(ACC)
            gx = 1.0 - fx
            gy = 1.0 - fy
            # <g, corner> per corner; the sample, d/dx and d/dy are combinations of these four sums
            s00 = tl.sum(g * v00, axis=1)
            s01 = tl.sum(g * v01, axis=1)
            s10 = tl.sum(g * v10, axis=1)
            s11 = tl.sum(g * v11, axis=1)
            g_aw = gy * (gx * s00 + fx * s01) + fy * (gx * s10 + fx * s11)
            g_x = aw * (gy * (s01 - s00) + fy * (s11 - s10)) * Wm.to(ACC)
            g_y = aw * (gx * (s10 - s00) + fx * (s11 - s01)) * Hm.to(ACC)
            tl.store(gattw_ptr + i, g_aw.to(gattw_ptr.dtype.element_ty), mask=mask_q)
            tl.store(gloc_ptr + 2 * i, g_x.to(gloc_ptr.dtype.element_ty), mask=mask_q)
            tl.store(gloc_ptr + 2 * i + 1, g_y.to(gloc_ptr.dtype.element_ty), mask=mask_q)
            ga = aw[:, None] * g
            gvp = gvbase + (pix * (H * D))[:, None]
            gvp1 = gvp + Wm * (H * D)
            tl.atomic_add(gvp, (gy * gx)[:, None] * ga, mask=m00, sem="relaxed")
            tl.atomic_add(gvp + H * D, (gy * fx)[:, None] * ga, mask=m01, sem="relaxed")
            tl.atomic_add(gvp1, (fy * gx)[:, None] * ga, mask=m10, sem="relaxed")
            tl.atomic_add(gvp1 + H * D, (fy * fx)[:, None] * ga, mask=m11, sem="relaxed")


# ============================================================================ reference

def deform_attn_ref(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                    sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch MSDA via ``F.grid_sample`` per map (the CPU path; differentiable to any order).

    Computes in ``value.dtype`` (locations and weights are cast to it). Same shapes as ``deform_attn``;
    ``spatial_shapes`` a tensor or a list of (H_m, W_m) ints; the maps are taken as packed back to back
    (``level_start_index`` is accepted for the standard signature; the public op checks it).
    """
    B, S, H, D = value.shape
    _, Q, _, M, P, _ = sampling_locations.shape
    if isinstance(spatial_shapes, torch.Tensor):
        shapes = [(int(hh), int(ww)) for hh, ww in spatial_shapes.tolist()]
    else:
        shapes = [(int(hh), int(ww)) for hh, ww in spatial_shapes]
    starts = [sum(hh * ww for hh, ww in shapes[:m]) for m in range(len(shapes))]  # validated by the caller
    dt = value.dtype
    loc = sampling_locations.to(dt)
    # Non-finite or far-off coordinates -> -1 (pixel -W-0.5: no corner on any map, zero gradient).
    loc = torch.where(torch.isfinite(loc) & (loc > -1.0) & (loc < 2.0), loc, torch.full_like(loc, -1.0))
    grid = 2.0 * loc - 1.0                                            # grid_sample's [-1, 1] convention
    attw = attention_weights.to(dt)
    out = value.new_zeros(B * H, D, Q)
    for m, ((hm, wm), s0) in enumerate(zip(shapes, starts)):
        vm = value[:, s0:s0 + hm * wm]                                # (B, hm*wm, H, D)
        vm = vm.permute(0, 2, 3, 1).reshape(B * H, D, hm, wm)
        gm = grid[:, :, :, m].permute(0, 2, 1, 3, 4).reshape(B * H, Q, P, 2)
        samp = F.grid_sample(vm, gm, mode="bilinear", padding_mode="zeros", align_corners=False)
        wm_ = attw[:, :, :, m].permute(0, 2, 1, 3).reshape(B * H, 1, Q, P)
        out = out + (samp * wm_).sum(-1)                              # (B*H, D, Q)
    return out.view(B, H, D, Q).permute(0, 3, 1, 2).reshape(B, Q, H * D)


# ============================================================================ validation + launchers

_INT_DTYPES = (torch.int64, torch.int32)


def _check_meta(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Shape / dtype / device checks that read no tensor values (no host sync). Returns
    (B, S, H, D, Q, M, P)."""
    check_tensor("value", value, ndim=4, dtypes=FLOAT_DTYPES)
    B, S, H, D = value.shape
    check_tensor("spatial_shapes", spatial_shapes, ndim=2, dtypes=_INT_DTYPES)
    if spatial_shapes.shape[1] != 2 or spatial_shapes.shape[0] < 1:
        raise ValueError(f"spatial_shapes: expected shape (M, 2) with M >= 1, got {tuple(spatial_shapes.shape)}")
    M = spatial_shapes.shape[0]
    check_tensor("level_start_index", level_start_index, shape=(M,), dtypes=_INT_DTYPES)
    check_tensor("sampling_locations", sampling_locations, ndim=6, dtypes=FLOAT_DTYPES)
    Q, P = sampling_locations.shape[1], sampling_locations.shape[4]
    check_tensor("sampling_locations", sampling_locations, shape=(B, Q, H, M, P, 2))
    if P < 1:
        raise ValueError("sampling_locations: need at least one point per map (P >= 1)")
    check_tensor("attention_weights", attention_weights, shape=(B, Q, H, M, P), dtypes=FLOAT_DTYPES)
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights),
                    ("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.device != value.device:
            raise ValueError(f"{name}: on device {t.device}, but value is on {value.device}")
    return B, S, H, D, Q, M, P


def _check_levels(shapes, starts, S):
    """Host-side consistency of the map metadata given as Python lists."""
    M = len(shapes)
    if any(len(sh) != 2 for sh in shapes):
        raise ValueError(f"spatial_shapes: expected (H_m, W_m) pairs, got {shapes}")
    if any(hh < 1 or ww < 1 for hh, ww in shapes):
        raise ValueError(f"spatial_shapes: every (H_m, W_m) must be >= 1, got {shapes}")
    sizes = [hh * ww for hh, ww in shapes]
    want = [sum(sizes[:m]) for m in range(M)]
    if list(starts) != want:
        raise ValueError(f"level_start_index: expected {want} (exclusive cumsum of H_m*W_m from spatial_shapes), "
                         f"got {list(starts)}")
    if sum(sizes) != S:
        raise ValueError(f"value: S = {S} but spatial_shapes sum to {sum(sizes)} positions")


def _check_values(spatial_shapes, level_start_index, S):
    """The value checks of tensor map metadata: ONE device->host copy of both tensors."""
    M = spatial_shapes.shape[0]
    both = torch.cat([spatial_shapes.reshape(-1).to(torch.int64), level_start_index.to(torch.int64)]).tolist()
    _check_levels([tuple(both[2 * m:2 * m + 2]) for m in range(M)], both[2 * M:], S)


_LEVELS = {}   # (shapes, device) -> (spatial_shapes, level_start_index) tensors built from Python ints


def _levels_from_ints(spatial_shapes, level_start_index, device, S):
    """Python-int map metadata -> (spatial_shapes, level_start_index) validated int64 tensors on ``device``
    (built once per shape set) and the shapes as a tuple of (H_m, W_m) ints."""
    try:
        shapes = tuple((int(hh), int(ww)) for hh, ww in spatial_shapes)
    except (TypeError, ValueError):
        raise ValueError(f"spatial_shapes: expected an (M, 2) integer tensor or a list of (H_m, W_m) ints, "
                         f"got {spatial_shapes!r}") from None
    if not shapes:
        raise ValueError("spatial_shapes: expected shape (M, 2) with M >= 1, got no maps")
    sizes = [hh * ww for hh, ww in shapes]
    want = tuple(sum(sizes[:m]) for m in range(len(shapes)))
    if level_start_index is None:
        starts = want
    elif isinstance(level_start_index, torch.Tensor):
        raise ValueError("level_start_index: pass a list of ints (or None) when spatial_shapes is a list")
    else:
        starts = tuple(int(x) for x in level_start_index)
    _check_levels(shapes, starts, S)
    key = (shapes, str(device))
    if key not in _LEVELS or tracing():
        ss = torch.tensor(shapes, dtype=torch.int64, device=device)
        st = torch.tensor(want, dtype=torch.int64, device=device)
        if tracing():
            return ss, st, shapes
        _LEVELS[key] = (ss, st)
    return (*_LEVELS[key], shapes)


def _block_sizes(D: int, Q: int, interpret: bool | None = None):
    """(BLOCK_Q, BLOCK_D, num_warps). GPU: a ~2k-element tile per program. Interpreter: few, big
    programs (each program costs ~0.4 ms of Python there)."""
    interpret = interpreting() if interpret is None else interpret
    block_d = max(16, next_pow2(D))
    if interpret:
        return max(16, min(128, next_pow2(Q))), block_d, 4
    block_q = max(8, min(64, 2048 // block_d))
    return block_q, block_d, (8 if block_d >= 256 else 4)


def _vec(D: int, *strides: int) -> int:
    """Largest power of two <= 8 dividing D and every stride (elements): the vector width promised."""
    v = 8
    while v > 1 and (D % v or any(st % v for st in strides)):
        v //= 2
    return v


def _d_chunks(D: int):
    """Split the head dim into near-equal chunks of at most MAX_D channels (one launch each)."""
    n = -(-D // MAX_D)
    dc = -(-D // n)
    return [(c, min(D, c + dc)) for c in range(0, D, dc)]


def _unit_last(t):
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _idx64(*tensors) -> bool:
    return any(t.numel() >= 2**31 for t in tensors)


def _deform_attn_fwd(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    B, S, H, D, Q, M, P = _check_meta(value, spatial_shapes, level_start_index, sampling_locations,
                                      attention_weights)
    check_index_range("value", value.numel(), 2**62)
    out = value.new_empty(B, Q, H * D)
    if out.numel() == 0:
        return out
    shapes, starts = spatial_shapes.contiguous(), level_start_index.contiguous()
    loc = sampling_locations.contiguous()
    attw = attention_weights.contiguous()
    value = _unit_last(value)
    o4 = out.view(B, Q, H, D)
    acc = tl_dtype(acc_dtype(value, loc, attw))
    big = _idx64(value, loc, out)
    for c0, c1 in _d_chunks(D):                      # one chunk unless D > MAX_D
        v, o = value[..., c0:c1], o4[..., c0:c1]
        dc = c1 - c0
        block_q, block_d, warps = _block_sizes(dc, Q)
        nqb = triton.cdiv(Q, block_q)
        launch(_deform_attn_fwd_kernel, (nqb * B * H,),
               v, shapes, starts, loc, attw, o,
               Q, H, M, P, nqb,
               v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
               D=dc, VEC=_vec(dc, *v.stride()[:3], *o.stride()[:3]),
               BLOCK_Q=block_q, BLOCK_D=block_d, ACC=acc, IDX64=big, num_warps=warps)
    return out


def _deform_attn_bwd(grad_out, value, spatial_shapes, level_start_index, sampling_locations,
                     attention_weights):
    B, S, H, D, Q, M, P = _check_meta(value, spatial_shapes, level_start_index, sampling_locations,
                                      attention_weights)
    check_tensor("grad_out", grad_out, shape=(B, Q, H * D), dtypes=FLOAT_DTYPES, device=value.device)
    acc_torch = acc_dtype(value, sampling_locations, attention_weights)
    dev = value.device
    if grad_out.numel() == 0 or value.numel() == 0:
        return (torch.zeros_like(value), torch.zeros_like(sampling_locations),
                torch.zeros_like(attention_weights))
    shapes, starts = spatial_shapes.contiguous(), level_start_index.contiguous()
    loc = sampling_locations.contiguous()
    attw = attention_weights.contiguous()
    value = _unit_last(value)
    g4 = _unit_last(grad_out.view(B, Q, H, D) if grad_out.is_contiguous() else grad_out.reshape(B, Q, H, D))
    big = _idx64(value, loc, g4)
    chunks = _d_chunks(D)
    # the register budget is tuned on sm_90; sm_80 (a smaller register file per SM) keeps ptxas' choice
    maxnreg = BWD_MAXNREG if not value.is_cuda or torch.cuda.get_device_capability(value.device)[0] >= 9 else None
    if len(chunks) == 1:
        # every (b, q, h, m, p) entry of gloc / gattw is written exactly once by the kernel
        gloc = torch.empty(loc.shape, device=dev, dtype=loc.dtype)
        gattw = torch.empty(attw.shape, device=dev, dtype=attw.dtype)
    else:   # D > MAX_D: per-chunk partial sums over D, added up in the accumulation dtype
        gloc = torch.zeros(loc.shape, device=dev, dtype=acc_torch)
        gattw = torch.zeros(attw.shape, device=dev, dtype=acc_torch)
        gvalue = torch.empty(value.shape, device=dev, dtype=value.dtype)
    for c0, c1 in chunks:
        v, g = value[..., c0:c1], g4[..., c0:c1]
        dc = c1 - c0
        gv_acc = torch.zeros(B, S, H, dc, device=dev, dtype=acc_torch)   # contiguous, for atomics
        gl, gw = (gloc, gattw) if len(chunks) == 1 else (torch.empty_like(gloc), torch.empty_like(gattw))
        block_q, block_d, warps = _block_sizes(dc, Q)
        nqb = triton.cdiv(Q, block_q)
        launch(_deform_attn_bwd_kernel, (nqb * B * H,),
               v, shapes, starts, loc, attw, g,
               gv_acc, gl, gw,
               Q, H, M, P, S, nqb,
               v.stride(0), v.stride(1), v.stride(2), g.stride(0), g.stride(1), g.stride(2),
               D=dc, VEC=_vec(dc, *v.stride()[:3], *g.stride()[:3]),
               BLOCK_Q=block_q, BLOCK_D=block_d, ACC=tl_dtype(acc_torch), IDX64=big or gv_acc.numel() >= 2**31,
               num_warps=warps, maxnreg=maxnreg)
        if len(chunks) == 1:
            return gv_acc.to(value.dtype), gloc, gattw
        gloc += gl
        gattw += gw
        gvalue[..., c0:c1] = gv_acc
    return gvalue, gloc.to(loc.dtype), gattw.to(attw.dtype)


# ============================================================================ registration
# The registered ops trust the map metadata (spatial_shapes / level_start_index consistent with each
# other and with S): the public op checks it (or the caller promises it with validate=False).

@torch.library.custom_op("nano4d::deform_attn", mutates_args=())
def _deform_attn_op(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                    sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    return _deform_attn_fwd(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@_deform_attn_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    B, _, H, D = value.shape
    return value.new_empty(B, sampling_locations.shape[1], H * D)


@torch.library.custom_op("nano4d::deform_attn_backward", mutates_args=())
def _deform_attn_backward_op(grad_out: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
                             level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                             attention_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _deform_attn_bwd(grad_out, value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights)


@_deform_attn_backward_op.register_fake
def _(grad_out, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    value, spatial_shapes, level_start_index, loc, attw = ctx.saved_tensors
    gv, gl, gw = torch.ops.nano4d.deform_attn_backward(grad.contiguous(), value, spatial_shapes,
                                                       level_start_index, loc, attw)
    return gv, None, None, gl, gw


_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)


# ============================================================================ public op

def deform_attn(value: torch.Tensor, spatial_shapes, level_start_index, sampling_locations: torch.Tensor,
                attention_weights: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
    """Multi-scale deformable attention -> (B, Q, H*D); see the module docstring for the math.

    ``spatial_shapes`` is an (M, 2) integer tensor on value's device, or a list of M (H_m, W_m) Python
    ints (then ``level_start_index`` may be None or a list of ints; checked on the host for free, turned
    into device tensors once per shape set). With tensors the public op checks their values against each
    other and S (one device->host copy); ``validate=False`` skips that check (no host sync: the path for
    callers that build the metadata themselves, e.g. under CUDA graphs) and trusts the caller: inconsistent
    metadata then reads wrong rows. Under torch.compile the value check is skipped likewise.

    CUDA tensors run the Triton kernel (``torch.ops.nano4d.deform_attn``); CPU tensors run
    ``deform_attn_ref`` unless ``NANO4D_FORCE_TRITON=1`` (then the kernel runs in the interpreter).
    Raises ``ValueError`` naming the argument on bad shapes / dtypes / devices / inconsistent metadata.
    """
    check_tensor("value", value, ndim=4, dtypes=FLOAT_DTYPES)
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        check_tensor(name, t)
    py_shapes = not isinstance(spatial_shapes, torch.Tensor)
    if py_shapes:
        spatial_shapes, level_start_index, levels = _levels_from_ints(spatial_shapes, level_start_index,
                                                                      value.device, value.shape[1])
    else:
        check_tensor("level_start_index", level_start_index)
        _check_meta(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        if validate and not tracing():
            _check_values(spatial_shapes, level_start_index, value.shape[1])
    _check_meta(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if use_triton(value, sampling_locations, attention_weights):
        return torch.ops.nano4d.deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                                            attention_weights)
    if py_shapes:   # the reference slices by Python ints: no tensor -> list conversion (compile-friendly)
        return deform_attn_ref(value, levels, None, sampling_locations, attention_weights)
    return deform_attn_ref(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

