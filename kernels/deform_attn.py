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
Grid: one flat axis of B * H * ceil(Q / BLOCK_Q) programs. spatial_shapes / level_start_index are
checked against each other and S on the host (a small device->host copy per call, so the op is not
CUDA-graph capturable). The reference (CPU path) has no limit on D and computes in value's dtype
(locations and weights are cast to it); use fp32 locations for large maps (bf16 has 8 mantissa bits).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import (FLOAT_DTYPES, check_index_range, check_same_device, check_tensor, interpreting,
                             next_pow2, use_triton)

MAX_D = 256  # channels per launch (larger head dims run in chunks)


# ============================================================================ Triton kernels

@triton.jit
def _corner_setup(loc_ptr, i, mask_q, Hm, Wm, ACC: tl.constexpr):
    """Pixel-space bilinear setup for one (m, p) sample of BLOCK_Q queries.

    Returns the integer top-left corner (x0, y0), the fractional parts (fx, fy) and, for the corners,
    validity masks. Non-finite / far-away coordinates are moved to -2 (no corner on the map)."""
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
    x0 = x0f.to(tl.int64)
    y0 = y0f.to(tl.int64)
    okx0 = (x0 >= 0) & (x0 < Wm)
    okx1 = (x0 + 1 >= 0) & (x0 + 1 < Wm)
    oky0 = (y0 >= 0) & (y0 < Hm)
    oky1 = (y0 + 1 >= 0) & (y0 + 1 < Hm)
    return x0, y0, fx, fy, okx0, okx1, oky0, oky1


@triton.jit
def _deform_attn_fwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attw_ptr, out_ptr,
    Q, H, M, P, D, n_qblocks,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_oq, stride_oh, stride_od,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // n_qblocks
    qb = pid % n_qblocks
    b = bh // H
    h = bh % H
    offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_q = offs_q < Q
    mask_d = offs_d < D
    row = ((b * Q + offs_q) * H + h) * (M * P)          # flat (b, q, h) row of loc / weights
    vbase = value_ptr + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd
    md = mask_d[None, :]
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=ACC)
    for m in range(M):
        Hm = tl.load(shapes_ptr + 2 * m)
        Wm = tl.load(shapes_ptr + 2 * m + 1)
        start = tl.load(starts_ptr + m)
        for p in range(P):
            i = row + m * P + p
            x0, y0, fx, fy, okx0, okx1, oky0, oky1 = _corner_setup(loc_ptr, i, mask_q, Hm, Wm, ACC)
            aw = tl.load(attw_ptr + i, mask=mask_q, other=0.0).to(ACC)
            pix = start + y0 * Wm + x0                    # flat index of the top-left corner
            p00 = vbase + (pix * stride_vs)[:, None]
            p01 = vbase + ((pix + 1) * stride_vs)[:, None]
            p10 = vbase + ((pix + Wm) * stride_vs)[:, None]
            p11 = vbase + ((pix + Wm + 1) * stride_vs)[:, None]
            v00 = tl.load(p00, mask=(mask_q & oky0 & okx0)[:, None] & md, other=0.0).to(ACC)
            v01 = tl.load(p01, mask=(mask_q & oky0 & okx1)[:, None] & md, other=0.0).to(ACC)
            v10 = tl.load(p10, mask=(mask_q & oky1 & okx0)[:, None] & md, other=0.0).to(ACC)
            v11 = tl.load(p11, mask=(mask_q & oky1 & okx1)[:, None] & md, other=0.0).to(ACC)
            gx = 1.0 - fx
            gy = 1.0 - fy
            acc += ((aw * gy * gx)[:, None] * v00 + (aw * gy * fx)[:, None] * v01
                    + (aw * fy * gx)[:, None] * v10 + (aw * fy * fx)[:, None] * v11)
    optr = out_ptr + b * stride_ob + h * stride_oh + offs_q[:, None] * stride_oq + offs_d[None, :] * stride_od
    tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=mask_q[:, None] & md)


@triton.jit
def _deform_attn_bwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attw_ptr, gout_ptr,
    gvalue_ptr, gloc_ptr, gattw_ptr,
    Q, H, M, P, D, S, n_qblocks,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_gb, stride_gq, stride_gh, stride_gd,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """grad_value: atomics into a contiguous (B, S, H, D) accumulator (fp32, or fp64);
    grad_loc / grad_weights: reductions over D inside the program (each sample has one owner)."""
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // n_qblocks
    qb = pid % n_qblocks
    b = bh // H
    h = bh % H
    offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_q = offs_q < Q
    mask_d = offs_d < D
    md = mask_d[None, :]
    row = ((b * Q + offs_q) * H + h) * (M * P)
    vbase = value_ptr + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd
    gvbase = gvalue_ptr + (b * S * H + h) * D + offs_d[None, :]      # contiguous accumulator
    g = tl.load(gout_ptr + b * stride_gb + h * stride_gh + offs_q[:, None] * stride_gq
                + offs_d[None, :] * stride_gd, mask=mask_q[:, None] & md, other=0.0).to(ACC)
    for m in range(M):
        Hm = tl.load(shapes_ptr + 2 * m)
        Wm = tl.load(shapes_ptr + 2 * m + 1)
        start = tl.load(starts_ptr + m)
        for p in range(P):
            i = row + m * P + p
            x0, y0, fx, fy, okx0, okx1, oky0, oky1 = _corner_setup(loc_ptr, i, mask_q, Hm, Wm, ACC)
            aw = tl.load(attw_ptr + i, mask=mask_q, other=0.0).to(ACC)
            pix = start + y0 * Wm + x0
            m00 = (mask_q & oky0 & okx0)[:, None] & md
            m01 = (mask_q & oky0 & okx1)[:, None] & md
            m10 = (mask_q & oky1 & okx0)[:, None] & md
            m11 = (mask_q & oky1 & okx1)[:, None] & md
            v00 = tl.load(vbase + (pix * stride_vs)[:, None], mask=m00, other=0.0).to(ACC)
            v01 = tl.load(vbase + ((pix + 1) * stride_vs)[:, None], mask=m01, other=0.0).to(ACC)
            v10 = tl.load(vbase + ((pix + Wm) * stride_vs)[:, None], mask=m10, other=0.0).to(ACC)
            v11 = tl.load(vbase + ((pix + Wm + 1) * stride_vs)[:, None], mask=m11, other=0.0).to(ACC)
            gx = 1.0 - fx
            gy = 1.0 - fy
            # d(sample)/dx and d(sample)/dy in pixel units, then reduced against grad_out over D
            samp = (gy * gx)[:, None] * v00 + (gy * fx)[:, None] * v01 \
                + (fy * gx)[:, None] * v10 + (fy * fx)[:, None] * v11
            dsx = gy[:, None] * (v01 - v00) + fy[:, None] * (v11 - v10)
            dsy = gx[:, None] * (v10 - v00) + fx[:, None] * (v11 - v01)
            g_aw = tl.sum(g * samp, axis=1)
            g_x = aw * tl.sum(g * dsx, axis=1) * Wm.to(ACC)
            g_y = aw * tl.sum(g * dsy, axis=1) * Hm.to(ACC)
            tl.store(gattw_ptr + i, g_aw.to(gattw_ptr.dtype.element_ty), mask=mask_q)
            tl.store(gloc_ptr + 2 * i, g_x.to(gloc_ptr.dtype.element_ty), mask=mask_q)
            tl.store(gloc_ptr + 2 * i + 1, g_y.to(gloc_ptr.dtype.element_ty), mask=mask_q)
            ga = aw[:, None] * g
            gvp = gvbase + (pix * H * D)[:, None]
            tl.atomic_add(gvp, (gy * gx)[:, None] * ga, mask=m00, sem="relaxed")
            tl.atomic_add(gvp + H * D, (gy * fx)[:, None] * ga, mask=m01, sem="relaxed")
            tl.atomic_add(gvp + Wm * H * D, (fy * gx)[:, None] * ga, mask=m10, sem="relaxed")
            tl.atomic_add(gvp + (Wm + 1) * H * D, (fy * fx)[:, None] * ga, mask=m11, sem="relaxed")


# ============================================================================ reference

def deform_attn_ref(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                    sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch MSDA via ``F.grid_sample`` per map (the CPU path; differentiable to any order).

    Computes in ``value.dtype`` (locations and weights are cast to it). Same shapes as ``deform_attn``.
    """
    B, S, H, D = value.shape
    _, Q, _, M, P, _ = sampling_locations.shape
    dt = value.dtype
    loc = sampling_locations.to(dt)
    # Non-finite or far-off coordinates -> -1 (pixel -W-0.5: no corner on any map, zero gradient).
    loc = torch.where(torch.isfinite(loc) & (loc > -1.0) & (loc < 2.0), loc, torch.full_like(loc, -1.0))
    grid = 2.0 * loc - 1.0                                            # grid_sample's [-1, 1] convention
    attw = attention_weights.to(dt)
    shapes = [(int(hh), int(ww)) for hh, ww in spatial_shapes.tolist()]
    starts = [int(s) for s in level_start_index.tolist()]
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

def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                  kernel: bool = False):
    """Validate shapes / dtypes / consistency; raise ValueError naming the argument. Returns
    (B, S, H, D, Q, M, P)."""
    check_tensor("value", value, ndim=4, dtypes=FLOAT_DTYPES)
    B, S, H, D = value.shape
    check_tensor("spatial_shapes", spatial_shapes, ndim=2, dtypes=(torch.int64, torch.int32))
    if spatial_shapes.shape[1] != 2 or spatial_shapes.shape[0] < 1:
        raise ValueError(f"spatial_shapes: expected shape (M, 2) with M >= 1, got {tuple(spatial_shapes.shape)}")
    M = spatial_shapes.shape[0]
    check_tensor("level_start_index", level_start_index, shape=(M,), dtypes=(torch.int64, torch.int32))
    check_tensor("sampling_locations", sampling_locations, ndim=6, dtypes=FLOAT_DTYPES)
    Q, P = sampling_locations.shape[1], sampling_locations.shape[4]
    check_tensor("sampling_locations", sampling_locations, shape=(B, Q, H, M, P, 2))
    if P < 1:
        raise ValueError("sampling_locations: need at least one point per map (P >= 1)")
    check_tensor("attention_weights", attention_weights, shape=(B, Q, H, M, P), dtypes=FLOAT_DTYPES)
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if t.device != value.device:
            raise ValueError(f"{name}: on device {t.device}, but value is on {value.device}")
    shapes = spatial_shapes.tolist()
    if any(hh < 1 or ww < 1 for hh, ww in shapes):
        raise ValueError(f"spatial_shapes: every (H_m, W_m) must be >= 1, got {shapes}")
    sizes = [hh * ww for hh, ww in shapes]
    want = [sum(sizes[:m]) for m in range(M)]
    if level_start_index.tolist() != want:
        raise ValueError(f"level_start_index: expected {want} (exclusive cumsum of H_m*W_m from spatial_shapes), "
                         f"got {level_start_index.tolist()}")
    if sum(sizes) != S:
        raise ValueError(f"value: S = {S} but spatial_shapes sum to {sum(sizes)} positions")
    if kernel:
        check_index_range("value", value.numel(), 2**62)
        check_index_range("sampling_locations", sampling_locations.numel(), 2**62)
    return B, S, H, D, Q, M, P


def _acc_dtype(*tensors):
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def _block_sizes(D: int, Q: int, interpret: bool | None = None):
    """(BLOCK_Q, BLOCK_D, num_warps). GPU: a ~2k-element tile per program. Interpreter: few, big
    programs (each program costs ~0.4 ms of Python there)."""
    interpret = interpreting() if interpret is None else interpret
    block_d = max(16, next_pow2(D))
    if interpret:
        return max(16, min(128, next_pow2(Q))), block_d, 4
    block_q = max(8, min(64, 2048 // block_d))
    return block_q, block_d, (8 if block_d >= 256 else 4)


def _prep_meta(spatial_shapes, level_start_index, device):
    return (spatial_shapes.to(device=device, dtype=torch.int64).contiguous(),
            level_start_index.to(device=device, dtype=torch.int64).contiguous())


def _d_chunks(D: int):
    """Split the head dim into near-equal chunks of at most MAX_D channels (one launch each)."""
    n = -(-D // MAX_D)
    dc = -(-D // n)
    return [(c, min(D, c + dc)) for c in range(0, D, dc)]


def _deform_attn_fwd(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    B, S, H, D, Q, M, P = _check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights, kernel=True)
    out = value.new_empty(B, Q, H * D)
    if out.numel() == 0:
        return out
    shapes, starts = _prep_meta(spatial_shapes, level_start_index, value.device)
    loc = sampling_locations.contiguous()
    attw = attention_weights.contiguous()
    o4 = out.view(B, Q, H, D)
    for c0, c1 in _d_chunks(D):                      # one chunk unless D > MAX_D
        v, o = value[..., c0:c1], o4[..., c0:c1]
        block_q, block_d, warps = _block_sizes(c1 - c0, Q)
        nqb = triton.cdiv(Q, block_q)
        _deform_attn_fwd_kernel[(nqb * B * H,)](
            v, shapes, starts, loc, attw, o,
            Q, H, M, P, c1 - c0, nqb,
            *v.stride(), *o.stride(),
            BLOCK_Q=block_q, BLOCK_D=block_d, ACC=_acc_dtype(value, loc, attw), num_warps=warps)
    return out


def _deform_attn_bwd(grad_out, value, spatial_shapes, level_start_index, sampling_locations,
                     attention_weights):
    B, S, H, D, Q, M, P = _check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights, kernel=True)
    check_tensor("grad_out", grad_out, shape=(B, Q, H * D), dtypes=FLOAT_DTYPES, device=value.device)
    acc_t = _acc_dtype(value, sampling_locations, attention_weights)
    acc_torch = torch.float64 if acc_t == tl.float64 else torch.float32
    dev = value.device
    launch = grad_out.numel() > 0 and value.numel() > 0
    if not launch:
        return (torch.zeros_like(value), torch.zeros_like(sampling_locations),
                torch.zeros_like(attention_weights))
    shapes, starts = _prep_meta(spatial_shapes, level_start_index, dev)
    loc = sampling_locations.contiguous()
    attw = attention_weights.contiguous()
    g4 = grad_out.view(B, Q, H, D) if grad_out.is_contiguous() else grad_out.reshape(B, Q, H, D)
    chunks = _d_chunks(D)
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
        gv_acc = torch.zeros(B, S, H, c1 - c0, device=dev, dtype=acc_torch)   # contiguous, for atomics
        gl, gw = (gloc, gattw) if len(chunks) == 1 else (torch.empty_like(gloc), torch.empty_like(gattw))
        block_q, block_d, warps = _block_sizes(c1 - c0, Q)
        nqb = triton.cdiv(Q, block_q)
        _deform_attn_bwd_kernel[(nqb * B * H,)](
            v, shapes, starts, loc, attw, g,
            gv_acc, gl, gw,
            Q, H, M, P, c1 - c0, S, nqb,
            *v.stride(), *g.stride(),
            BLOCK_Q=block_q, BLOCK_D=block_d, ACC=acc_t, num_warps=warps)
        if len(chunks) == 1:
            return gv_acc.to(value.dtype), gloc, gattw
        gloc += gl
        gattw += gw
        gvalue[..., c0:c1] = gv_acc
    return gvalue, gloc.to(loc.dtype), gattw.to(attw.dtype)


# ============================================================================ registration

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

def deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention -> (B, Q, H*D); see the module docstring for the math.

    CUDA tensors run the Triton kernel (``torch.ops.nano4d.deform_attn``); CPU tensors run
    ``deform_attn_ref`` unless ``NANO4D_FORCE_TRITON=1`` (then the kernel runs in the interpreter).
    Raises ``ValueError`` naming the argument on bad shapes / dtypes / inconsistent map metadata.
    """
    if use_triton(value, sampling_locations, attention_weights):
        # devices first (a meta/fake tensor would otherwise route the op to its fake kernel); the
        # launcher inside the op does the full validation
        for name, t in (("value", value), ("spatial_shapes", spatial_shapes),
                        ("level_start_index", level_start_index), ("sampling_locations", sampling_locations),
                        ("attention_weights", attention_weights)):
            check_tensor(name, t)
        check_same_device(value=value, sampling_locations=sampling_locations,
                          attention_weights=attention_weights)
        return torch.ops.nano4d.deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                                            attention_weights)
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return deform_attn_ref(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
