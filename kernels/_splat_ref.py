"""Pure-PyTorch reference for 3D Gaussian splatting (``kernels/splat.py`` holds the kernels and the math).

Written for clarity and independence from the Triton kernels (no shared helpers), with the same
thresholds (α clamp 0.99, skip α < 1/255, stop before T < 1e-4, 16-px tile membership of the 3σ square).
Differentiable by autograd in every float input (viewmats and Ks included). Two equivalent compositing
forms, tested equal to each other (tests/test_splat.py) and to a literal per-pixel Python loop:

* ``rasterize_from_projection_ref`` (``rasterize_gaussians_ref(..., dense=True)``): the oracle. Every pixel
  × every visible Gaussian of its view, sorted by depth (stable), in pixel blocks of ``REF_BLOCK``²; a
  block only looks at Gaussians whose tile rectangle overlaps it (exact: the others fail the per-pixel
  tile test); blocks run under ``torch.utils.checkpoint`` when autograd records, so memory stays
  O(pixels + Gaussians). Cost O(B·V·pixels·Gaussians-per-block): tests and small images only.
* ``rasterize_pairs_ref`` (the default, and the CPU path of ``kernels.rasterize_gaussians``): only the
  (pixel, Gaussian) pairs that can have α ≥ 1/255 (a provable per-row ellipse bound, widened by 1 px),
  composited per pixel with a padded row cumsum. Cost O(candidate pairs); memory O(pairs + pixels ×
  max pairs per pixel). Measured CPU time (1 thread, shared loaded 2-core machine, fwd / bwd):
  B=1, V=4, N=2000, 64² → 0.34 s / 0.09 s; B=2, V=6, N=8000, 64² (bench scene: ~110 overlapping
  Gaussians per pixel, 5.5 M pairs) → 2.6 s / 0.6 s; B=1, V=8, N=4000, 96² → 1.8 s / 0.7 s.
  Fine for tiny CPU training; use a GPU beyond.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

TILE = 16                # tile size (pixels); a Gaussian reaches the pixels of the tiles its 3σ box overlaps
ALPHA_MIN = 1.0 / 255.0  # contributions with α below this are skipped
ALPHA_MAX = 0.99         # α is clamped to this
T_MIN = 1e-4             # a pixel stops once its transmittance would fall below this
RADIUS_MAX = 2.0 ** 24   # radii are capped (float) before ceil so they fit in int32
REF_BLOCK = 32           # pixel block of the reference (multiple of TILE)


def _quat_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    R = torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                     2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                     2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1)
    return R.reshape(*q.shape[:-1], 3, 3)


def project_gaussians_ref(means, quats, scales, viewmats, Ks, width: int, height: int, near: float = 0.01,
                          far: float = 1e10, eps2d: float = 0.3):
    """EWA projection of B scenes x N Gaussians into B x V views (see ``kernels.splat`` docstring).

    Returns means2d (B,V,N,2), conics (B,V,N,3), depths (B,V,N), radii (B,V,N) int32. Culled Gaussians
    (radius 0) have zero means2d/conics/depths. Differentiable in all float inputs by autograd.
    """
    B, N = means.shape[:2]
    fin = (torch.isfinite(means).all(-1) & torch.isfinite(quats).all(-1) & torch.isfinite(scales).all(-1))
    fin = fin & (quats.detach().abs().sum(-1) > 0)
    # sanitize culled inputs so no NaN reaches autograd (0 * NaN = NaN in the backward of torch.where)
    means = torch.where(fin[..., None], means, torch.zeros_like(means))
    unit_q = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=quats.dtype, device=quats.device)
    quats = torch.where(fin[..., None], quats, unit_q)
    scales = torch.where(fin[..., None], scales, torch.ones_like(scales))

    R = _quat_to_rotmat(quats)                                     # (B,N,3,3)
    M = R * scales[..., None, :]                                   # R diag(s): Σ = M Mᵀ
    Wr, t = viewmats[..., :3, :3], viewmats[..., :3, 3]            # (B,V,3,3), (B,V,3)
    # broadcast products (tiny batched matmuls are slow on CPU): Mc = W M, p = W mean + t
    Mc = (Wr[:, :, None, :, :, None] * M[:, None, :, None, :, :]).sum(-2)        # (B,V,N,3,3)
    pc = (Wr[:, :, None] * means[:, None, :, None, :]).sum(-1) + t[:, :, None, :]  # (B,V,N,3)
    x, y, z = pc.unbind(-1)
    in_depth = (z >= near) & (z <= far)
    zs = torch.where(in_depth, z, torch.ones_like(z))
    fx, fy = Ks[..., 0, 0][:, :, None], Ks[..., 1, 1][:, :, None]
    cx, cy = Ks[..., 0, 2][:, :, None], Ks[..., 1, 2][:, :, None]
    # Σ₂ = J Mc Mcᵀ Jᵀ = T Tᵀ with the two rows of T = J Mc
    T0 = (fx / zs)[..., None] * Mc[..., 0, :] - (fx * x / (zs * zs))[..., None] * Mc[..., 2, :]
    T1 = (fy / zs)[..., None] * Mc[..., 1, :] - (fy * y / (zs * zs))[..., None] * Mc[..., 2, :]
    a, b, c = (T0 * T0).sum(-1) + eps2d, (T0 * T1).sum(-1), (T1 * T1).sum(-1) + eps2d
    # work on Σ₂ / m, m = max(a, c), with det = |T0 × T1|² + eps2d (a + c − eps2d) (Lagrange's identity): no
    # overflow for any finite Σ₂ (a·c overflows fp32 at scales ~1e10), no cancellation for thin Gaussians;
    # a non-finite Σ₂ is culled
    m = torch.maximum(a, c)
    m = torch.where(m > 0, m, torch.ones_like(m))
    cross = torch.linalg.cross(T0, T1, dim=-1) / m[..., None]
    a, b, c = a / m, b / m, c / m
    det = (cross * cross).sum(-1) + eps2d / m * (a + c - eps2d / m)
    ok_det = det > 0
    dets = torch.where(ok_det, det, torch.ones_like(det)) * m
    conics = torch.stack([c / dets, -b / dets, a / dets], -1)
    u, v = fx * x / zs + cx, fy * y / zs + cy
    with torch.no_grad():
        mid = 0.5 * (a + c)
        lam = m * (mid + torch.sqrt(torch.clamp(mid * mid - det, min=0.0)))
        r = torch.ceil(torch.clamp(3.0 * torch.sqrt(torch.clamp(lam, min=0.0)), max=RADIUS_MAX))
        valid = (fin[:, None] & in_depth & ok_det & (u + r > 0) & (u - r < width) & (v + r > 0)
                 & (v - r < height) & torch.isfinite(u) & torch.isfinite(v) & torch.isfinite(r)
                 & torch.isfinite(conics).all(-1))
        radii = torch.where(valid, r, torch.zeros_like(r)).to(torch.int32)
    vm = valid[..., None]
    means2d = torch.where(vm, torch.stack([u, v], -1), torch.zeros((), dtype=u.dtype, device=u.device))
    conics = torch.where(vm, conics, torch.zeros((), dtype=conics.dtype, device=conics.device))
    depths = torch.where(valid, z, torch.zeros((), dtype=z.dtype, device=z.device))
    return means2d, conics, depths, radii


def _tile_rect(means2d, radii):
    """Inclusive tile ranges [tx0, tx1] x [ty0, ty1] (unclamped) of each Gaussian's 3σ square."""
    r = radii.to(means2d.dtype)
    lo = torch.floor((means2d.detach() - r[..., None]) / TILE).to(torch.int64)
    hi = torch.floor((means2d.detach() + r[..., None]) / TILE).to(torch.int64)
    return lo[..., 0], hi[..., 0], lo[..., 1], hi[..., 1]


def _render_block(px, py, jt, it, mu, con, op, col, z, tx0, tx1, ty0, ty1, bg):
    """Dense front-to-back compositing of P pixels x G depth-sorted Gaussians.
    Returns colour (P,C), transmittance (P,), accumulated depth (P,)."""
    dx = px[:, None] - mu[None, :, 0]
    dy = py[:, None] - mu[None, :, 1]
    sigma = 0.5 * (con[None, :, 0] * dx * dx + con[None, :, 2] * dy * dy) + con[None, :, 1] * dx * dy
    alpha = torch.clamp(op[None, :] * torch.exp(-sigma), max=ALPHA_MAX)
    inbox = (tx0[None] <= jt[:, None]) & (jt[:, None] <= tx1[None]) & (ty0[None] <= it[:, None]) & (it[:, None] <= ty1[None])
    keep = inbox & (alpha >= ALPHA_MIN) & (sigma >= 0)
    alpha = torch.where(keep, alpha, torch.zeros((), dtype=alpha.dtype))
    la = torch.log1p(-alpha)                                        # log(1-α) >= log(0.01): safe
    cum = torch.cumsum(la, dim=1)                                   # log T after each Gaussian
    contrib = (torch.exp(cum) >= T_MIN).detach()                    # prefix of the depth order
    w = torch.where(contrib, alpha * torch.exp(cum - la), torch.zeros((), dtype=alpha.dtype))
    T = torch.exp(torch.where(contrib, la, torch.zeros((), dtype=la.dtype)).sum(1))
    return w @ col + T[:, None] * bg[None, :], T, w @ z


def rasterize_from_projection_ref(means2d, conics, depths, radii, opacities, colors, background, width: int,
                                  height: int):
    """Composite projected Gaussians into B x V images (dense per pixel block; see module docstring).
    Shapes: means2d (B,V,N,2), conics (B,V,N,3), depths/radii (B,V,N), opacities (B,N), colors (B,N,C),
    background (B,V,C). Returns colors (B,V,H,W,C), alphas (B,V,H,W,1), depths (B,V,H,W,1)."""
    B, V, N = radii.shape
    C = colors.shape[-1]
    dt, dev = means2d.dtype, means2d.device
    ii, jj = torch.meshgrid(torch.arange(height, device=dev), torch.arange(width, device=dev), indexing="ij")
    tx0, tx1, ty0, ty1 = _tile_rect(means2d, radii)
    use_ckpt = torch.is_grad_enabled() and any(
        t.requires_grad for t in (means2d, conics, depths, opacities, colors, background))
    out_c, out_a, out_d = [], [], []
    for b in range(B):
        for v in range(V):
            vis = torch.nonzero(radii[b, v] > 0).flatten()
            vis = vis[torch.argsort(depths[b, v, vis].detach(), stable=True)]   # front to back; ties by index
            bg = background[b, v]
            rows_c, rows_T, rows_d = [], [], []
            for r0 in range(0, height, REF_BLOCK):
                r1 = min(height, r0 + REF_BLOCK)
                blk_c, blk_T, blk_d = [], [], []
                for c0 in range(0, width, REF_BLOCK):
                    c1 = min(width, c0 + REF_BLOCK)
                    bt = (c0 // TILE, (c1 - 1) // TILE, r0 // TILE, (r1 - 1) // TILE)
                    g = vis[(tx0[b, v, vis] <= bt[1]) & (tx1[b, v, vis] >= bt[0])
                            & (ty0[b, v, vis] <= bt[3]) & (ty1[b, v, vis] >= bt[2])]
                    i_blk, j_blk = ii[r0:r1, c0:c1].reshape(-1), jj[r0:r1, c0:c1].reshape(-1)
                    P = i_blk.numel()
                    if g.numel() == 0:
                        blk_c.append(bg.expand(P, C))
                        blk_T.append(torch.ones(P, dtype=dt, device=dev))
                        blk_d.append(torch.zeros(P, dtype=dt, device=dev))
                        continue
                    args = (j_blk.to(dt) + 0.5, i_blk.to(dt) + 0.5, j_blk // TILE, i_blk // TILE,
                            means2d[b, v, g], conics[b, v, g], opacities[b, g], colors[b, g], depths[b, v, g],
                            tx0[b, v, g], tx1[b, v, g], ty0[b, v, g], ty1[b, v, g], bg)
                    oc, oT, od = (checkpoint(_render_block, *args, use_reentrant=False) if use_ckpt
                                  else _render_block(*args))
                    blk_c.append(oc), blk_T.append(oT), blk_d.append(od)
                h, wb = r1 - r0, [min(width, c0 + REF_BLOCK) - c0 for c0 in range(0, width, REF_BLOCK)]
                rows_c.append(torch.cat([x.reshape(h, w_, C) for x, w_ in zip(blk_c, wb)], 1))
                rows_T.append(torch.cat([x.reshape(h, w_) for x, w_ in zip(blk_T, wb)], 1))
                rows_d.append(torch.cat([x.reshape(h, w_) for x, w_ in zip(blk_d, wb)], 1))
            img_c, img_T, img_d = torch.cat(rows_c, 0), torch.cat(rows_T, 0), torch.cat(rows_d, 0)
            out_c.append(img_c), out_a.append(1.0 - img_T), out_d.append(img_d)
    colors_out = torch.stack(out_c).reshape(B, V, height, width, C)
    alphas = torch.stack(out_a).reshape(B, V, height, width, 1)
    depths_out = torch.stack(out_d).reshape(B, V, height, width, 1)
    return colors_out, alphas, depths_out


@torch.library.custom_op("nano4d::rasterize_gaussians_pairs", mutates_args=())
def _candidate_pairs(means2d: torch.Tensor, conics: torch.Tensor, depths: torch.Tensor, radii: torch.Tensor,
                     opacities: torch.Tensor, width: int, height: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contributing (pixel, Gaussian) pairs of ``rasterize_pairs_ref``, sorted by (pixel, depth):
    flat Gaussian index g = (b·V + v)·N + n, flat pixel, the position in the pixel's list, and an empty
    tensor whose length L (>= 2) is the longest list. A registered op (indices only, no autograd) so
    torch.compile treats its data-dependent sizes as opaque."""
    B, V, N = radii.shape
    H, W = height, width
    dt, dev = means2d.dtype, means2d.device
    rank = torch.empty(B, V, N, dtype=torch.int64, device=dev)      # depth rank per view (stable)
    rank.scatter_(-1, torch.argsort(depths, dim=-1, stable=True),
                  torch.arange(N, device=dev).expand(B, V, N).contiguous())
    tx0, tx1, ty0, ty1 = _tile_rect(means2d, radii)
    con = conics
    mc = torch.maximum(con[..., 0], con[..., 2])                # conic / mc: no under/overflow for any Σ₂
    mc = torch.where(mc > 0, mc, torch.ones_like(mc))
    na, nb, nc = con[..., 0] / mc, con[..., 1] / mc, con[..., 2] / mc
    det = na * nc - nb * nb
    o = opacities[:, None, :].expand(B, V, N)
    s = torch.log(torch.clamp(255.0 * o, min=1.0))              # σ bound (0 when o·255 <= 1)
    live = (radii > 0) & (o * 255.0 >= 1.0) & (det > 0)
    dets = torch.where(det > 0, det, torch.ones_like(det)) * mc
    hx = torch.sqrt(torch.clamp(2 * s * nc / dets, min=0)) + 1.0
    hy = torch.sqrt(torch.clamp(2 * s * na / dets, min=0)) + 1.0
    u, v = means2d[..., 0], means2d[..., 1]
    big = float(max(W, H) + 2)
    j0 = torch.maximum(torch.ceil(torch.clamp(u - hx - 0.5, -big, big)).long(), torch.clamp(tx0 * TILE, min=0))
    j1 = torch.minimum(torch.floor(torch.clamp(u + hx - 0.5, -big, big)).long(), torch.clamp(tx1 * TILE + TILE - 1, max=W - 1))
    i0 = torch.maximum(torch.ceil(torch.clamp(v - hy - 0.5, -big, big)).long(), torch.clamp(ty0 * TILE, min=0))
    i1 = torch.minimum(torch.floor(torch.clamp(v + hy - 0.5, -big, big)).long(), torch.clamp(ty1 * TILE + TILE - 1, max=H - 1))
    nx, ny = (j1 - j0 + 1).clamp(min=0), (i1 - i0 + 1).clamp(min=0)
    nrow = torch.where(live & (nx > 0), ny, torch.zeros_like(ny)).reshape(-1)
    keep_g = torch.nonzero(nrow).flatten()                                   # Gaussians with candidates
    nrow = nrow[keep_g]
    ints = torch.stack([j0, j1, i0, rank], -1).reshape(-1, 4)[keep_g]
    flts = torch.stack([u, v, con[..., 0], con[..., 1], con[..., 2], o, s, na, nb, nc, s / mc], -1).reshape(-1, 11)[keep_g]
    # level 1: (Gaussian, row); on each row the σ ≤ s ellipse spans an exact column interval, widened
    # by 1 px for rounding (rows the ellipse misses keep a ~3 px interval: still only a superset)
    rg = torch.repeat_interleave(torch.arange(keep_g.numel(), device=dev), nrow)
    ri = ints[rg, 2] + torch.arange(rg.numel(), device=dev) - (torch.cumsum(nrow, 0) - nrow)[rg]
    f = flts[rg]
    dyr = ri.to(dt) + 0.5 - f[:, 1]
    disc = (f[:, 8] * dyr) ** 2 - f[:, 7] * (f[:, 9] * dyr * dyr - 2 * f[:, 10])      # on the conic / mc
    sq = torch.sqrt(torch.clamp(disc, min=0))
    lo = f[:, 0] + (-f[:, 8] * dyr - sq) / f[:, 7] - 0.5 - 1.0
    hi = f[:, 0] + (-f[:, 8] * dyr + sq) / f[:, 7] - 0.5 + 1.0
    c0 = torch.maximum(torch.ceil(torch.clamp(lo, -big, big)).long(), ints[rg, 0])
    c1 = torch.minimum(torch.floor(torch.clamp(hi, -big, big)).long(), ints[rg, 1])
    ncol = (c1 - c0 + 1).clamp(min=0)
    # level 2: candidate pixels
    pr = torch.repeat_interleave(torch.arange(rg.numel(), device=dev), ncol)
    pj = c0[pr] + torch.arange(pr.numel(), device=dev) - (torch.cumsum(ncol, 0) - ncol)[pr]
    pi = ri[pr]
    loc = rg[pr]
    gf = flts[loc]
    # exact α test to drop the pairs that contribute nothing
    dx, dy = pj.to(dt) + 0.5 - gf[:, 0], pi.to(dt) + 0.5 - gf[:, 1]
    sig = 0.5 * (gf[:, 2] * dx * dx + gf[:, 4] * dy * dy) + gf[:, 3] * dx * dy
    keep = (torch.clamp(gf[:, 5] * torch.exp(-sig), max=ALPHA_MAX) >= ALPHA_MIN) & (sig >= 0)
    loc, pi, pj = loc[keep], pi[keep], pj[keep]
    g = keep_g[loc]                                                          # flat (b,v,n)
    pix = ((g // N) * H + pi) * W + pj
    order = torch.argsort(pix * N + ints[loc, 3])
    g, pix = g[order], pix[order]
    seg_pix, seg_id, seg_len = torch.unique_consecutive(pix, return_inverse=True, return_counts=True)
    L = max(int(seg_len.max()) if seg_len.numel() else 0, 2)
    pos = torch.arange(g.numel(), device=dev) - (torch.cumsum(seg_len, 0) - seg_len)[seg_id]
    return g, pix, pos, torch.empty(L, dtype=torch.int8, device=dev)


@_candidate_pairs.register_fake
def _(means2d, conics, depths, radii, opacities, width, height):
    ctx = torch.library.get_ctx()
    P = ctx.new_dynamic_size()
    e = means2d.new_empty
    return (e(P, dtype=torch.int64), e(P, dtype=torch.int64), e(P, dtype=torch.int64),
            e(ctx.new_dynamic_size(min=2), dtype=torch.int8))


def rasterize_pairs_ref(means2d, conics, depths, radii, opacities, colors, background, width: int, height: int):
    """Same result as ``rasterize_from_projection_ref``, evaluated on (pixel, Gaussian) pairs only.

    α ≥ 1/255 needs σ ≤ s = log(255·o), and σ ≤ s bounds |dy| ≤ sqrt(2 s Σ₂ᵧᵧ) (the rows) and, on each
    row, dx to the ellipse's chord. So only pixels on those rows and chords (+1 px margins for rounding),
    inside the Gaussian's tile rectangle and the image, can receive it: every other pair has α < 1/255 or fails the tile test, i.e. contributes
    exactly nothing. The surviving pairs are sorted by (pixel, depth), laid out as a padded
    (all pixels × max-pairs-per-pixel) matrix and composited front to back with a row cumsum.
    Cost O(pairs), not O(pixels × Gaussians): this is the CPU path of ``kernels.rasterize_gaussians``.
    """
    B, V, N = radii.shape
    C = colors.shape[-1]
    H, W = height, width
    dt, dev = means2d.dtype, means2d.device
    out_c = torch.zeros(B * V * H * W, C, dtype=dt, device=dev)
    out_l = torch.zeros(B * V * H * W, dtype=dt, device=dev)       # Σ log(1-α) per pixel -> T
    out_d = torch.zeros(B * V * H * W, dtype=dt, device=dev)
    g, pix, pos, lmax = torch.ops.nano4d.rasterize_gaussians_pairs(
        means2d.detach(), conics.detach(), depths.detach(), radii, opacities.detach(), width, height)
    L = lmax.shape[0]
    torch._check(L >= 2)      # (padded to >= 2 columns: lets torch.compile decide the size-1 special cases)
    n, b = g % N, g // (V * N)
    m2 = means2d.reshape(-1, 2)[g]
    cg = conics.reshape(-1, 3)[g]
    dx, dy = (pix % W).to(dt) + 0.5 - m2[:, 0], ((pix // W) % H).to(dt) + 0.5 - m2[:, 1]
    sig = 0.5 * (cg[:, 0] * dx * dx + cg[:, 2] * dy * dy) + cg[:, 1] * dx * dy
    alpha = torch.clamp(opacities[b, n] * torch.exp(-sig), max=ALPHA_MAX)
    la = torch.log1p(-alpha)
    dense = torch.zeros(B * V * H * W, L, dtype=dt, device=dev).index_put((pix, pos), la)
    cum = torch.cumsum(dense, dim=1)[pix, pos]                    # log T after this Gaussian
    contrib = (torch.exp(cum) >= T_MIN).detach()
    zero = torch.zeros((), dtype=dt, device=dev)
    w = torch.where(contrib, alpha * torch.exp(cum - la), zero)
    out_c = out_c.index_add(0, pix, w[:, None] * colors[b, n])
    out_d = out_d.index_add(0, pix, w * depths.reshape(-1)[g])
    out_l = out_l.index_add(0, pix, torch.where(contrib, la, zero))
    T = torch.exp(out_l).reshape(B, V, H, W, 1)
    colors_out = out_c.reshape(B, V, H, W, C) + T * background[:, :, None, None, :]
    return colors_out, 1.0 - T, out_d.reshape(B, V, H, W, 1)


def rasterize_gaussians_ref(means, quats, scales, opacities, colors, viewmats, Ks, width: int, height: int,
                            near: float = 0.01, far: float = 1e10, background=None, eps2d: float = 0.3,
                            dense: bool = False):
    """Reference rasterizer: ``project_gaussians_ref`` + depth-sorted compositing, either the dense
    every-pixel × every-Gaussian form (``dense=True``, the test oracle) or the equivalent pair form
    (default, fast enough for small CPU training). Gaussians with a non-finite opacity or colour are
    culled like those with non-finite geometry."""
    B, N = means.shape[:2]
    V, C = viewmats.shape[1], colors.shape[-1]
    means2d, conics, depths, radii = project_gaussians_ref(means, quats, scales, viewmats, Ks, width, height,
                                                           near, far, eps2d)
    ok = torch.isfinite(opacities) & torch.isfinite(colors).all(-1)                 # (B,N)
    radii = torch.where(ok[:, None], radii, torch.zeros_like(radii))
    opacities = torch.where(ok, opacities, torch.zeros_like(opacities))
    colors = torch.where(ok[..., None], colors, torch.zeros_like(colors))
    if background is None:
        background = torch.zeros(B, V, C, dtype=means2d.dtype, device=means2d.device)
    fn = rasterize_from_projection_ref if dense else rasterize_pairs_ref
    return fn(means2d, conics, depths, radii, opacities, colors, background, width, height)


__all__ = ["project_gaussians_ref", "rasterize_gaussians_ref", "rasterize_from_projection_ref", "rasterize_pairs_ref",
           "TILE", "ALPHA_MIN", "ALPHA_MAX", "T_MIN", "RADIUS_MAX"]
