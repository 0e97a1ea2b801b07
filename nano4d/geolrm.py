"""GeoLRM: geometry-aware large reconstruction model (Zhang et al., NeurIPS 2024, arXiv 2406.15333).

Posed images -> 3D Gaussians in two stages, as in the paper:
1. Proposal network: a dense grid of G^3 anchor tokens (xyz + learned embedding) runs through geometry-aware
   transformer blocks and unfolds each token into u^3 occupancy logits -> an R^3 occupancy grid
   (paper: 16^3 tokens x 8^3 = 128^3). Loss: BCE + scene-class affinity (precision/recall/specificity).
2. Reconstruction network: the occupied cells of the frozen proposal become anchor tokens (subsampled or
   padded to ``max_tokens``), run through deeper blocks, and a Gaussian head emits ``gaussians_per_token``
   Gaussians (14 numbers each) per token, rendered with ``kernels.rasterize_gaussians`` into the target views.
Both stages have their own hierarchical image encoder: a ViT in the DINOv2 parameter layout (loadable from a
Hugging Face ``facebook/dinov2-*`` state dict, see ``load_dinov2_hf``) whose last layer -> ConvTranspose(x2)+BN
is the high-level map, and RGB + Plucker rays -> Conv(k4, s4)+BN the low-level map. The two maps are the two
levels of the deformable cross-attention.

Geometry-aware block:  x = x + SelfAttn(RMSNorm(x))   3-D RoPE on q, k; ``kernels.patch_attention``
                       x = x + DeformCrossAttn(RMSNorm(x), image features)  anchors projected into every view
                       x = x + SwiGLU(RMSNorm(x))

Use:  model(batch) -> (loss, out)            training / evaluation front door (``GeoLRM.forward``)
      model.reconstruct(images, c2w, K)      one object's views -> ``Gaussians`` (deterministic given ``seed``)
      GeoLRM.from_official(state_dict)       the released checkpoint (alibaba-yuanjing-aigclab/GeoLRM)
      GeoLRM.from_checkpoint(run_dir)        a nano4d run's model.safetensors

The released model and the paper's model differ. nano4d's default is the paper's model (token attention with
3-D RoPE, visibility-masked view fusion, ...). The official code (alibaba-yuanjing-aigclab/GeoLRM) computes
something else in places; each difference is a config flag, all set by ``from_official`` (``OFFICIAL_FLAGS``):
- ``official_fp32_attention``: the official self-attention, in the fp32 branch every released config takes
  (stage 1 trains without autocast, stage 2 and inference set use_bf16 false), multiplies q (B, N, H, D) by
  k^T without moving the heads axis first: the softmax runs over the H heads *of one token* (scores
  q_h . k_h' / sqrt(D)), and the following transpose(1, 2).view(B, N, H*D) re-slices the (H, N, D) result
  into tokens, so output token n holds head results of tokens n*H .. n*H + H - 1 (mod N) of one head.
  Tokens never attend to each other, RoPE has no effect (one rotation per token cancels in q_h . k_h'), and
  the output depends on the token order and count. This flag computes exactly that (plain torch, any dtype;
  the official code would switch to flash-attn token attention for bf16/fp16 q, which no released config does).
- ``official_keep_padding``: every object is padded to exactly ``max_tokens`` with tokens at xyz = 0 that
  take part in attention and become Gaussians. Here padding gets segment id -1 (no attention in or out),
  opacity 0, and only pads to the largest count in the batch.
- ``official_residual_on_normed_query``: the official cross-attention adds its output to its own *normalized*
  query (stream = RMSNorm(h) + attn); here it is added to the residual stream (h + attn).
- ``official_rope_positions``: RoPE positions are the official ((xyz / 0.5 + 1) * (R - 1) / 2).long() of
  the float anchor coordinates (proposal: 128-grid indices 0, 8, 16, ... of the 16^3 anchors, as truncated
  in fp32); here they are the integer token / cell index. ``official_rope_inference_scale``: official
  inference uses xyz_scale 1.0 instead of training's 0.5 in that formula (reconstruction stage).
- ``official_cell_positions``: anchors at linspace(-1, 1, R) * 0.5 while the occupancy ground truth is binned
  as round((p + 0.5) R) - half a cell apart. Here cell i is centred at -0.5 + (i + 0.5) / R, matching a
  ground truth binned as floor((p + 0.5) R) (what ``nano4d.data`` produces).
- ``official_xyz_order``: proposal tokens and the rows of the occupancy head in (x, y, z) order (x slowest),
  reconstruction anchors ordered x-slowest; here (z, y, x). Only matters for porting weights and for the
  order-dependent official attention.
- ``official_shared_query``: one learned query token broadcast to all proposal anchors; here a per-anchor table.
- ``official_no_visibility_mask``: views are fused by a softmax over all views, also those where the anchor is
  behind the camera or outside the image (projected by plain division by z); here those get zero weight.
- ``official_plucker``: ray directions un-normalized (OpenCV camera ray with z = 1, rotated to world); here
  unit directions. Same world direction, different magnitudes in the (d, o x d) channels.
- ``official_conv_no_bias``: the ConvTranspose / low-level Conv before their BatchNorms have no bias.
- ``official_pos_interp``: the DINOv2 position table is resized as transformers 4.34 (the official pin) did:
  bicubic with scale factor (n + 0.1) / grid; here (as transformers >= 4.45) to the exact size.
- ``official_positive_offsets``: official offsets are sigmoid * offset_max (positive only); here tanh.
- ``official_color_clamp``: official colour is clamp(x, -0.5, 0.5) + 0.5 (zero gradient outside); here sigmoid.
- ``prop_dropout`` = 0.1 (official proposal net): dropout on the self-attention, cross-attention and FFN
  branches, and, with the official attention, on the pre-softmax scores as the official code does.
  With ``kernels.patch_attention`` there is no attention-probability dropout.
- ``official_rgb_clamp``: renders are clamped to [0, 1] before the MSE (zero gradient outside).
- ``official_depth_mask_left``: the edge-aware depth loss keeps a neighbour pair when its left/top pixel is
  in the mask (official); here both pixels must be.
- ``official_affinity_pooled``: the scene-class affinity terms are computed over the whole batch at once
  (official); here per object, then averaged.
- ``official_decay_all``: ``configure_optimizer`` decays every parameter (official AdamW on all parameters).
Sampling runs in fp32 under autocast (as the official mmcv op).

Conventions: c2w (B, V, 4, 4) OpenCV axes, K (B, V, 3, 3) in pixels of the image it belongs to, pixel centres at
+0.5, quaternions (w, x, y, z), voxel grids (B, Z, Y, X) over [-0.5, 0.5]^3.
Shape legend: B batch, V views, N tokens, C channels, H heads, D head dim, S feature tokens per view,
L levels (2), P sampling points, R occupancy resolution, G proposal grid, u = R / G.
This file imports only torch, ``kernels`` and the standard library.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels


@dataclasses.dataclass
class GeoLRMConfig:
    # image encoder (DINOv2 layout; paper: dinov2-base at 448 px)
    img_size: int = 448             # input image side in pixels (square; paper 448, the official inference script 560)
    patch_size: int = 14            # ViT patch size of the image encoder
    enc_dim: int = 768              # image-encoder width (dinov2-base: 768)
    enc_depth: int = 12             # image-encoder blocks
    enc_heads: int = 12             # image-encoder attention heads
    enc_mlp_ratio: float = 4.0      # image-encoder MLP hidden / width
    enc_pos_grid: int = 37              # learned position-embedding grid (DINOv2: 518 / 14)
    enc_layerscale: float = 1.0     # initial LayerScale value of the image encoder (DINOv2's checkpoint overrides it)
    feat_dim: int = 384                 # channels of both feature levels
    # occupancy / proposal network
    occ_res: int = 128                  # R: occupancy cells per axis over [-0.5, 0.5]^3
    prop_grid: int = 16                 # G: proposal tokens per axis (each unfolds to (R/G)^3 cells)
    prop_dim: int = 384             # proposal-transformer width
    prop_depth: int = 6             # proposal-transformer blocks
    prop_heads: int = 16            # proposal-transformer attention heads
    prop_dropout: float = 0.0           # dropout in the proposal blocks (official: 0.1; see the docstring)
    # reconstruction network
    dim: int = 768                  # reconstruction-transformer width
    depth: int = 16                 # reconstruction-transformer blocks
    heads: int = 16                 # reconstruction-transformer heads (head dim must be divisible by 6 for the 3-D RoPE)
    max_tokens: int = 4096              # anchors per object in training
    max_tokens_infer: int = 8192        # ... and at inference
    gaussians_per_token: int = 32   # Gaussians decoded from each anchor token
    offset_max: float = 0.2         # largest offset of a Gaussian from its anchor (object units)
    scale_max: float = 0.02         # largest Gaussian scale (object units)
    # geometry-aware blocks
    n_points: int = 8                   # deformable sampling points per head and level
    offset_init: float = 1.0            # initial spacing of the sampling points, in feature-map pixels
    ffn_multiple_of: int = 256      # SwiGLU hidden size is rounded up to a multiple of this
    rope_base: float = 10000.0      # 3-D RoPE frequency base
    render_capacity: int = 0        # tile intersections per render: 0 = one host read sizes them; > 0: no sync, NaN past it
    grad_checkpoint: bool = False   # recompute the reconstruction blocks in backward (saves memory; the paper recipe turns it on)
    # loss weights (reconstruction stage; proposal: BCE + affinity)
    w_rgb: float = 1.0              # weight of the RGB MSE (on [-1, 1])
    w_lpips: float = 2.0            # weight of LPIPS (VGG)
    w_alpha: float = 1.0            # weight of the alpha MSE
    w_depth: float = 0.2            # weight of the edge-aware log-L1 depth loss
    w_tv: float = 0.05              # weight of the total-variation loss on rendered depth
    # the official code's behaviour (see module docstring)
    official_fp32_attention: bool = False
    official_keep_padding: bool = False
    official_residual_on_normed_query: bool = False
    official_rope_positions: bool = False
    official_rope_inference_scale: bool = False
    official_cell_positions: bool = False
    official_xyz_order: bool = False
    official_shared_query: bool = False
    official_no_visibility_mask: bool = False
    official_plucker: bool = False
    official_conv_no_bias: bool = False
    official_pos_interp: bool = False
    official_positive_offsets: bool = False
    official_color_clamp: bool = False
    official_rgb_clamp: bool = False
    official_depth_mask_left: bool = False
    official_affinity_pooled: bool = False
    official_decay_all: bool = False


OFFICIAL_FLAGS = {f.name: True for f in dataclasses.fields(GeoLRMConfig) if f.name.startswith("official_")}
OFFICIAL_FLAGS["prop_dropout"] = 0.1

PRESETS = {
    # CPU preset: 32 px inputs in 8 px patches, 16^3 occupancy from 4^3 tokens, 192 anchors x 4 Gaussians
    "tiny": GeoLRMConfig(img_size=32, patch_size=8, enc_dim=96, enc_depth=2, enc_heads=2, enc_pos_grid=4,
                         feat_dim=48, occ_res=16, prop_grid=4, prop_dim=48, prop_depth=2, prop_heads=2,
                         dim=96, depth=3, heads=4, max_tokens=192, max_tokens_infer=384,
                         gaussians_per_token=4, offset_max=0.08, scale_max=0.06, n_points=4, ffn_multiple_of=32,
                         offset_init=0.25),  # 8x8 maps: keep the initial sampling spread local, as on 64-112 px maps
    "paper": GeoLRMConfig(),
    "official": GeoLRMConfig(**OFFICIAL_FLAGS),   # the released model's sizes and computation
}

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Anchors(NamedTuple):
    """Reconstruction tokens: xyz (B, N, 3) positions, pos (B, N, 3) integer (x, y, z) cell indices,
    seg (B, N) 0 for real tokens and -1 for padding."""
    xyz: torch.Tensor
    pos: torch.Tensor
    seg: torch.Tensor


class Gaussians(NamedTuple):
    """Activated 3D Gaussians, (B, M, .) or (M, .): means, quats (w, x, y, z) unit, scales > 0,
    opacities in [0, 1] (no trailing dim), rgb in [0, 1]. ``nano4d.ply.save_ply(path, *g)`` writes them."""
    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    rgb: torch.Tensor


# ============================================================================ cameras and positions


def invert_rigid(T: torch.Tensor) -> torch.Tensor:
    """(..., 4, 4) c2w <-> w2c for rotation + translation."""
    R, t = T[..., :3, :3], T[..., :3, 3:]
    out = torch.zeros_like(T)
    out[..., :3, :3] = R.transpose(-1, -2)
    out[..., :3, 3:] = -R.transpose(-1, -2) @ t
    out[..., 3, 3] = 1.0
    return out


def _fp32_geometry(fn):
    """Camera geometry runs in fp32 with autocast off (a bf16 ray or projection is off by pixels)."""
    def wrapped(*args, **kw):
        dev = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(dev, enabled=False):
            return fn(*(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64
                        else a for a in args), **kw)
    wrapped.__doc__, wrapped.__name__ = fn.__doc__, fn.__name__
    return wrapped


@_fp32_geometry
def plucker_rays(c2w: torch.Tensor, K: torch.Tensor, H: int, W: int, unit: bool = True) -> torch.Tensor:
    """Per-pixel (d, o x d): c2w, K (B, V, ...) -> (B, V, 6, H, W). ``unit``: |d| = 1; else d is the OpenCV
    camera ray K^-1 (u, v, 1) rotated to world (official)."""
    v, u = torch.meshgrid(torch.arange(H, device=K.device, dtype=K.dtype) + 0.5,
                          torch.arange(W, device=K.device, dtype=K.dtype) + 0.5, indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], -1)                                  # (H, W, 3)
    d_cam = pix @ torch.linalg.inv(K).transpose(-1, -2)[..., None, :, :]              # (B, V, H, W, 3)
    d = d_cam @ c2w[..., None, :3, :3].transpose(-1, -2)
    d = F.normalize(d, dim=-1) if unit else d
    o = c2w[..., None, None, :3, 3].expand_as(d)
    return torch.cat([d, torch.linalg.cross(o, d, dim=-1)], -1).movedim(-1, -3)


@_fp32_geometry
def project_anchors(xyz: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, H: int, W: int, near: float = 1e-3):
    """Anchors (B, N, 3) into every view -> ref (B, V, N, 2) in [0, 1] image fractions (x, y) and
    visible (B, V, N): in front of the camera and inside the image. ``near=None``: divide by z as is
    (official; points behind the camera land mirrored)."""
    w2c = invert_rigid(c2w)
    cam = xyz[:, None] @ w2c[..., :3, :3].transpose(-1, -2) + w2c[..., None, :3, 3]    # (B, V, N, 3)
    z = cam[..., 2]
    uv = (cam @ K.transpose(-1, -2))[..., :2] / (z if near is None else z.clamp_min(near))[..., None]  # pixels
    ref = uv / torch.tensor([W, H], dtype=uv.dtype, device=uv.device)
    visible = (z > (near or 0.0)) & (ref >= 0).all(-1) & (ref <= 1).all(-1)
    return ref, visible


def cell_centers(n: int, official: bool = False, device=None) -> torch.Tensor:
    """Centres of n cells along one axis of [-0.5, 0.5] (official: linspace(-1, 1, n) * 0.5)."""
    if official:
        return torch.linspace(-1, 1, n, device=device) * 0.5
    return -0.5 + (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n


def official_voxel_index(xyz: torch.Tensor, R: int, xyz_scale: float = 0.5) -> torch.Tensor:
    """The official RoPE position of a point: ((xyz / xyz_scale + 1) * (R - 1) / 2) truncated, in the
    point's float precision (so a cell index can come out one lower)."""
    return ((xyz / xyz_scale + 1.0) * (R - 1) / 2.0).long()


def rope_3d(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """3-D rotary embedding. x (B, H, N, D) with D % 6 == 0, pos (B, N, 3) integer (x, y, z) voxel indices.
    The head dim is split in thirds for x, y, z; inside a third of size 2Q the pairs are (i, i + Q),
    rotated by pos * base^(-i/Q) (CroCo's rotate-half layout extended to 3-D)."""
    D = x.shape[-1]
    assert D % 6 == 0, f"3-D RoPE needs a head dim divisible by 6, got {D}"
    Q = D // 6
    fdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    freqs = base ** (-torch.arange(Q, device=x.device, dtype=fdt) / Q)               # (Q,)
    out = []
    for a in range(3):
        u, v = x[..., 2 * Q * a:2 * Q * a + Q], x[..., 2 * Q * a + Q:2 * Q * (a + 1)]
        ang = pos[:, None, :, a, None].to(fdt) * freqs                              # (B, 1, N, Q)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        out += [u * cos - v * sin, v * cos + u * sin]
    return torch.cat(out, -1)


# ============================================================================ image encoder


class ViTBlock(nn.Module):
    """DINOv2 block: x + ls1 * Attn(LN(x)), x + ls2 * MLP(LN(x)); separate q, k, v as in the HF layout."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, ls_init: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.ls1 = nn.Parameter(torch.full((dim,), ls_init))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(dim, int(dim * mlp_ratio)), nn.Linear(int(dim * mlp_ratio), dim)
        self.ls2 = nn.Parameter(torch.full((dim,), ls_init))

    def forward(self, x):                                                             # (B, N, C)
        B, N, C = x.shape
        h = self.norm1(x)
        q, k, v = (f(h).view(B, N, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        x = x + self.ls1 * self.proj(kernels.patch_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
        return x + self.ls2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ImageEncoder(nn.Module):
    """Images (B, V, 3, h, w) in [0, 1] + cameras -> two feature levels flattened for deformable attention:
    feats (B*V, S, feat_dim); shapes ((h/4, w/4) low, (2h/p, 2w/p) high) and starts (2 ints): Python ints."""

    def __init__(self, cfg: GeoLRMConfig):
        super().__init__()
        E, p = cfg.enc_dim, cfg.patch_size
        self.patch, self.cfg = p, cfg
        self.patch_embed = nn.Conv2d(3, E, p, p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, E))
        self.register_buffer("mask_token", torch.zeros(1, E))                        # HF layout; unused
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + cfg.enc_pos_grid ** 2, E) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(E, cfg.enc_heads, cfg.enc_mlp_ratio, cfg.enc_layerscale)
                                    for _ in range(cfg.enc_depth))
        self.norm = nn.LayerNorm(E, eps=1e-6)
        bias = not cfg.official_conv_no_bias
        self.up = nn.ConvTranspose2d(E, cfg.feat_dim, 4, 2, 1, bias=bias)             # high level: x2
        self.up_bn = nn.BatchNorm2d(cfg.feat_dim)
        self.low = nn.Conv2d(9, cfg.feat_dim, 4, 4, bias=bias)                        # low level: RGB + Plucker
        self.low_bn = nn.BatchNorm2d(cfg.feat_dim)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """Learned position embedding, bicubically interpolated from its grid to h x w patches.
        ``official_pos_interp``: as transformers 4.34 (scale factor (h + 0.1) / grid, kept when h == w == grid)."""
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        g = int(math.isqrt(grid.shape[1]))
        if (g, g) != (h, w):
            grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)
            if self.cfg.official_pos_interp:
                size = dict(scale_factor=((h + 0.1) / g, (w + 0.1) / g))
            else:
                size = dict(size=(h, w))
            grid = F.interpolate(grid.float(), mode="bicubic", align_corners=False, **size)
            grid = grid.to(cls.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([cls, grid], 1)

    def forward(self, images, c2w, K):
        B, V, _, Hi, Wi = images.shape
        x = (images.flatten(0, 1) - self.mean) / self.std                             # (BV, 3, Hi, Wi)
        tok = self.patch_embed(x)                                                     # (BV, E, h, w)
        h, w = tok.shape[-2:]
        tok = torch.cat([self.cls_token.view(-1).expand(B * V, 1, -1), tok.flatten(2).transpose(1, 2)], 1)
        tok = tok + self.pos_embed_for(h, w)                                          # (BV, 1 + hw, E)
        for blk in self.blocks:
            tok = blk(tok)
        tok = self.norm(tok)[:, 1:].transpose(1, 2).reshape(B * V, -1, h, w)
        high = self.up_bn(self.up(tok))                                               # (BV, F, 2h, 2w)
        rays = plucker_rays(c2w, K, Hi, Wi, unit=not self.cfg.official_plucker).flatten(0, 1)  # (BV, 6, Hi, Wi)
        low = self.low_bn(self.low(torch.cat([x, rays.to(x.dtype)], 1)))              # (BV, F, Hi/4, Wi/4)
        shapes = (tuple(low.shape[-2:]), tuple(high.shape[-2:]))                     # Python ints: no host sync
        starts = (0, low.shape[-2] * low.shape[-1])
        feats = torch.cat([low.flatten(2), high.flatten(2)], 2).transpose(1, 2)       # (BV, S, F)
        return feats, shapes, starts


def _rename(key: str, table: list, reverse: bool = False):
    """Rename ``key`` by the first matching (source, target) template pair of ``table`` ({i}: a layer index,
    {n}: one character, {p}: a parameter name); ``reverse`` maps target -> source. None if nothing matches."""
    for src, dst in table:
        src, dst = (dst, src) if reverse else (src, dst)
        rx = re.escape(src)
        for name, group in (("i", r"(?P<i>\d+)"), ("n", r"(?P<n>\w)"), ("p", r"(?P<p>\w+)")):
            rx = rx.replace(r"\{" + name + r"\}", group)
        if m := re.fullmatch(rx, key):
            return dst.format(**m.groupdict())
    return None


_HF_NAMES = [  # Hugging Face Dinov2Model key -> ImageEncoder key (checkpoint names, then transformers >= 5 names)
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.mask_token", "mask_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.{p}", "patch_embed.{p}"),
    ("encoder.layer.{i}.norm{n}.{p}", "blocks.{i}.norm{n}.{p}"),
    ("encoder.layer.{i}.attention.attention.query.{p}", "blocks.{i}.q.{p}"),
    ("encoder.layer.{i}.attention.attention.key.{p}", "blocks.{i}.k.{p}"),
    ("encoder.layer.{i}.attention.attention.value.{p}", "blocks.{i}.v.{p}"),
    ("encoder.layer.{i}.attention.output.dense.{p}", "blocks.{i}.proj.{p}"),
    ("encoder.layer.{i}.layer_scale{n}.lambda1", "blocks.{i}.ls{n}"),
    ("encoder.layer.{i}.mlp.fc{n}.{p}", "blocks.{i}.fc{n}.{p}"),
    ("layernorm.{p}", "norm.{p}"),
    ("encoder.layer.{i}.attention.q_proj.{p}", "blocks.{i}.q.{p}"),
    ("encoder.layer.{i}.attention.k_proj.{p}", "blocks.{i}.k.{p}"),
    ("encoder.layer.{i}.attention.v_proj.{p}", "blocks.{i}.v.{p}"),
    ("encoder.layer.{i}.attention.o_proj.{p}", "blocks.{i}.proj.{p}"),
]


def map_dinov2_hf(state_dict: dict, where: str = "load_dinov2_hf") -> dict:
    """Hugging Face ``Dinov2Model`` / ``Dinov2Backbone`` keys (an optional ``dinov2.`` prefix is stripped)
    -> ``ImageEncoder`` keys. ValueError names the first key that matches no rule."""
    mapped = {}
    for key, val in state_dict.items():
        new = _rename(key.removeprefix("dinov2."), _HF_NAMES)
        if new is None:
            raise ValueError(f"{where}: unexpected key {key.removeprefix('dinov2.')!r}")
        mapped[new] = val
    return mapped


def load_dinov2_hf(encoder: ImageEncoder, state_dict: dict) -> list:
    """Copy a Hugging Face ``facebook/dinov2-{small,base,large}`` state dict (``model.safetensors`` of
    ``Dinov2Model``, or a transformers >= 5 model's in-memory ``state_dict()``; an optional ``dinov2.``
    prefix is stripped) into ``encoder``'s ViT. The ConvT/conv heads stay as they are. Raises ValueError on
    unknown keys, missing ViT keys or shape mismatches; returns the list of encoder keys that were loaded.
    (dinov2-giant's SwiGLU MLP is not supported.)"""
    own = encoder.state_dict()
    mapped = map_dinov2_hf(state_dict)
    vit_keys = [k for k in own if not k.startswith(("up", "low"))]
    missing = [k for k in vit_keys if k not in mapped]
    if missing:
        raise ValueError(f"load_dinov2_hf: state dict lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for k, v in mapped.items():
        if own[k].shape != v.shape:
            raise ValueError(f"load_dinov2_hf: {k}: checkpoint shape {tuple(v.shape)} != model {tuple(own[k].shape)}")
    encoder.load_state_dict(mapped, strict=False)
    return sorted(mapped)


# ============================================================================ geometry-aware transformer


class DeformCrossAttention(nn.Module):
    """Multi-view deformable cross-attention: each anchor samples P points per head in each of the 2 feature
    levels around its projection in every view (``kernels.deform_attn``, views folded into the batch); views
    are fused by a learned softmax weight, zero for views where the anchor is invisible (unless ``mask_views``
    is False: the official softmax over all views)."""

    def __init__(self, dim: int, feat_dim: int, heads: int, points: int, levels: int = 2, spacing: float = 1.0,
                 mask_views: bool = True):
        super().__init__()
        self.h, self.l, self.p, self.mask_views = heads, levels, points, mask_views
        self.value_proj = nn.Linear(feat_dim, dim)
        self.offsets = nn.Linear(dim, heads * levels * points * 2)
        self.weights = nn.Linear(dim, heads * levels * points)
        self.view_logit = nn.Linear(dim, 1)
        self.out_proj = nn.Linear(dim, dim)
        # Deformable-DETR init: head h looks along direction 2*pi*h/H, point i at (i + 1) * spacing level pixels
        nn.init.zeros_(self.offsets.weight)
        ang = torch.arange(heads, dtype=torch.float32) * (2 * math.pi / heads)
        dirs = torch.stack([ang.cos(), ang.sin()], -1)
        dirs = dirs / dirs.abs().max(-1, keepdim=True).values                         # (H, 2)
        grid = dirs[:, None, None] * torch.arange(1, points + 1, dtype=torch.float32)[:, None] * spacing  # (H,1,P,2)
        with torch.no_grad():
            self.offsets.bias.copy_(grid.expand(heads, levels, points, 2).flatten())
        nn.init.zeros_(self.weights.weight)
        nn.init.zeros_(self.weights.bias)

    def forward(self, x, ref, visible, feats, shapes, starts):
        # x (B, N, C); ref (B, V, N, 2) in [0,1]; visible (B, V, N); feats (B*V, S, F)
        B, N, C = x.shape
        V = ref.shape[1]
        # sampling runs in fp32 (as the official mmcv op): bf16 locations would be off by ~1/256 of the map
        value = self.value_proj(feats).float().view(B * V, -1, self.h, C // self.h)  # (BV, S, H, D)
        wh = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32, device=x.device)   # (L, 2) (W, H)
        off = self.offsets(x).float().view(B, 1, N, self.h, self.l, self.p, 2) / wh[:, None]
        loc = ref[:, :, :, None, None, None, :].float() + off                         # (B, V, N, H, L, P, 2)
        attn = self.weights(x).float().view(B, N, self.h, -1).softmax(-1).view(B, 1, N, self.h, self.l, self.p)
        out = kernels.deform_attn(value, shapes, starts, loc.flatten(0, 1),   # metadata built by the encoder:
                                  attn.expand(B, V, -1, -1, -1, -1).flatten(0, 1).contiguous(),
                                  validate=False)                               # trusted, no host sync
        out = out.view(B, V, N, C).to(x.dtype)
        logit = self.view_logit(out).squeeze(-1).float()                              # (B, V, N)
        if self.mask_views:
            w = (logit.masked_fill(~visible, -1e4).softmax(1) * visible).to(out.dtype)
        else:
            w = logit.softmax(1).to(out.dtype)
        return self.out_proj((w[..., None] * out).sum(1))                            # (B, N, C)


def official_head_attention(q, k, v, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """The official fp32 self-attention, literally: q, k, v (B, N, H, D) -> (B, N, H*D). Scores are taken
    between the heads of each token ((B, N, H, H), dropout on the scores, softmax over heads), and the
    (B, N, H, D) result is re-sliced through (B, H, N, D) into tokens (see the module docstring)."""
    B, N, H, D = q.shape
    s = F.dropout(q @ k.transpose(2, 3) / math.sqrt(D), dropout, training)
    out = F.softmax(s.float(), dim=-1).type_as(q) @ v                                # (B, N, H, D)
    return out.transpose(1, 2).reshape(B, N, H * D)


class GeoBlock(nn.Module):
    def __init__(self, dim: int, heads: int, feat_dim: int, cfg: GeoLRMConfig, dropout: float = 0.0):
        super().__init__()
        self.heads, self.rope_base, self.p = heads, cfg.rope_base, dropout
        self.residual_on_normed = cfg.official_residual_on_normed_query
        self.official_attention = cfg.official_fp32_attention
        self.norm1, self.norm2, self.norm3 = (nn.RMSNorm(dim, eps=1e-5) for _ in range(3))
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.cross = DeformCrossAttention(dim, feat_dim, heads, cfg.n_points, spacing=cfg.offset_init,
                                          mask_views=not cfg.official_no_visibility_mask)
        m = cfg.ffn_multiple_of
        hidden = m * math.ceil(int(8 * dim / 3) / m)                                  # paper: 768 -> 2048
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x, pos, seg, ref, visible, feats, shapes, starts):
        B, N, C = x.shape
        drop = lambda t: F.dropout(t, self.p, self.training) if self.p else t  # noqa: E731
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, N, D)
        q, k = rope_3d(q, pos, self.rope_base), rope_3d(k, pos, self.rope_base)
        if self.official_attention:
            a = official_head_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.p, self.training)
        else:
            a = kernels.patch_attention(q, k, v, segment_ids=seg).transpose(1, 2).reshape(B, N, C)
        x = x + drop(self.proj(a))
        h = self.norm2(x)
        x = (h if self.residual_on_normed else x) + drop(self.cross(h, ref, visible, feats, shapes, starts))
        h = self.norm3(x)
        return x + drop(self.w2(F.silu(self.w1(h)) * self.w3(h)))                     # SwiGLU


class GeoTransformer(nn.Module):
    """Anchor tokens (B, N, 3) -> features (B, N, dim). Image features are lifted by cross-attention."""

    def __init__(self, dim: int, depth: int, heads: int, cfg: GeoLRMConfig, dropout: float = 0.0):
        super().__init__()
        self.grad_checkpoint, self.near = cfg.grad_checkpoint, None if cfg.official_no_visibility_mask else 1e-3
        self.blocks = nn.ModuleList(GeoBlock(dim, heads, cfg.feat_dim, cfg, dropout) for _ in range(depth))
        self.norm = nn.RMSNorm(dim, eps=1e-5)

    def forward(self, x, xyz, pos, seg, c2w, K, img_hw, feats, shapes, starts):
        ref, visible = project_anchors(xyz, c2w, K, *img_hw, near=self.near)
        if seg is not None:
            visible = visible & (seg >= 0)[:, None]
        for blk in self.blocks:
            args = (x, pos, seg, ref, visible, feats, shapes, starts)
            x = checkpoint(blk, *args, use_reentrant=False) if self.grad_checkpoint and self.training else blk(*args)
        return self.norm(x)


# ============================================================================ stage 1: proposal network


class ProposalNet(nn.Module):
    """Images -> occupancy logits (B, R, R, R) (Z, Y, X) from G^3 dense anchor tokens, each unfolded to u^3."""

    def __init__(self, cfg: GeoLRMConfig):
        super().__init__()
        G, R = cfg.prop_grid, cfg.occ_res
        assert R % G == 0, f"occ_res {R} must be a multiple of prop_grid {G}"
        self.G, self.u, self.xyz_order = G, R // G, cfg.official_xyz_order
        self.encoder = ImageEncoder(cfg)
        self.transformer = GeoTransformer(cfg.prop_dim, cfg.prop_depth, cfg.prop_heads, cfg, cfg.prop_dropout)
        c = cell_centers(G, cfg.official_cell_positions)
        a, b, d = torch.meshgrid(c, c, c, indexing="ij")                              # token t = (a*G + b)*G + d
        anchors = torch.stack([a, b, d] if self.xyz_order else [d, b, a], -1).reshape(-1, 3)  # (x, y, z)
        self.register_buffer("anchors", anchors, persistent=False)
        if cfg.official_rope_positions:
            pos = official_voxel_index(anchors, R)                                    # 128-grid indices 0, 8, ...
        else:
            i = torch.arange(G)
            a, b, d = torch.meshgrid(i, i, i, indexing="ij")
            pos = torch.stack([a, b, d] if self.xyz_order else [d, b, a], -1).reshape(-1, 3)
        self.register_buffer("pos", pos, persistent=False)
        self.embed = nn.Parameter(torch.randn(1 if cfg.official_shared_query else G ** 3, cfg.prop_dim - 3) * 0.02)
        self.head = nn.Linear(cfg.prop_dim, self.u ** 3)

    def forward(self, images, c2w, K):
        B = images.shape[0]
        feats, shapes, starts = self.encoder(images, c2w, K)
        xyz = self.anchors.expand(B, -1, -1)                                          # (B, G^3, 3)
        x = torch.cat([xyz, self.embed.expand(B, self.G ** 3, -1).to(xyz.dtype)], -1)
        x = self.transformer(x, xyz, self.pos.expand(B, -1, -1), None, c2w, K, images.shape[-2:],
                             feats, shapes, starts)
        grid = unfold_cells(self.head(x).float(), self.G, self.u)
        return grid.transpose(1, 3) if self.xyz_order else grid                       # official grid is (X, Y, Z)


def unfold_cells(x: torch.Tensor, G: int, u: int) -> torch.Tensor:
    """Per-token cell values (B, G^3, u^3) -> grid (B, R, R, R), R = G u: token (gz, gy, gx) fills cells
    (gz u + dz, gy u + dy, gx u + dx), its values ordered (dz, dy, dx)."""
    B = x.shape[0]
    x = x.view(B, G, G, G, u, u, u)                                                   # (B, Gz, Gy, Gx, uz, uy, ux)
    return x.permute(0, 1, 4, 2, 5, 3, 6).reshape(B, G * u, G * u, G * u)


def _bce_one(s: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean binary cross-entropy of probabilities ``s`` against 1, i.e. -log s (clamped to [eps, 1 - eps]).
    Written out so that NaN gives NaN (F.binary_cross_entropy raises) and CUDA autocast accepts it."""
    return -torch.log(s.clamp(eps, 1 - eps)).mean()


def occupancy_loss(logits: torch.Tensor, occ: torch.Tensor, pooled: bool = False) -> dict:
    """BCE over all cells + scene-class affinity (MonoScene): BCE of precision, recall and specificity
    of the soft occupied class against 1, per object (``pooled``: over the whole batch at once, as the
    official code). logits, occ (B, R, R, R)."""
    logits, occ = logits.float(), occ.float()
    bce = F.binary_cross_entropy_with_logits(logits, occ)
    p, t = torch.sigmoid(logits).flatten(1), occ.flatten(1)
    if pooled:
        p, t = p.reshape(1, -1), t.reshape(1, -1)
    eps = 1e-6
    inter = (p * t).sum(1)
    precision = inter / (p.sum(1) + eps)
    recall = inter / (t.sum(1) + eps)
    specificity = ((1 - p) * (1 - t)).sum(1) / ((1 - t).sum(1) + eps)
    affinity = _bce_one(precision) + _bce_one(recall) + _bce_one(specificity)
    return {"bce": bce, "affinity": affinity, "loss": bce + affinity}


def occupancy_iou(logits: torch.Tensor, occ: torch.Tensor) -> torch.Tensor:
    """Per-object IoU of (logit > 0) vs the ground truth, (B,)."""
    pred, gt = (logits > 0).flatten(1), occ.bool().flatten(1)
    return (pred & gt).sum(1).float() / (pred | gt).sum(1).clamp_min(1).float()


# ============================================================================ stage 2: reconstruction network


def select_anchors(occ_logits: torch.Tensor, max_tokens: int, official_cells: bool = False, generator=None,
                   pad_to_max: bool = False, xyz_order: bool = False) -> Anchors:
    """Occupied cells (logit > 0) of (B, R, R, R) (Z, Y, X) -> ``Anchors``. Objects with more than
    ``max_tokens`` occupied cells keep a random subset (``generator``: a CPU torch.Generator for a
    reproducible one), in grid order (z slowest; ``xyz_order``: x slowest). N = the largest count in the
    batch (at least 1), or ``max_tokens`` with ``pad_to_max``; padding sits at xyz = 0."""
    B, R = occ_logits.shape[0], occ_logits.shape[-1]
    c = cell_centers(R, official_cells, occ_logits.device)
    idx = []
    for b in range(B):
        occ = occ_logits[b] > 0
        xyz_idx = torch.nonzero(occ.permute(2, 1, 0)) if xyz_order else torch.nonzero(occ).flip(-1)  # (k, 3) x,y,z
        if len(xyz_idx) > max_tokens:
            keep = torch.randperm(len(xyz_idx), generator=generator, device="cpu")[:max_tokens]
            xyz_idx = xyz_idx[keep.sort().values.to(xyz_idx.device)]
        idx.append(xyz_idx)
    N = max_tokens if pad_to_max else max(1, max(len(i) for i in idx))
    pos = torch.zeros(B, N, 3, dtype=torch.long, device=occ_logits.device)
    seg = torch.full((B, N), -1, dtype=torch.int32, device=occ_logits.device)
    for b, i in enumerate(idx):
        pos[b, :len(i)], seg[b, :len(i)] = i, 0
    xyz = c[pos] * (seg >= 0)[..., None]                                              # padding at xyz = 0
    return Anchors(xyz, pos, seg)


class ReconNet(nn.Module):
    """Anchors + images -> ``Gaussians`` (B, N*n, .)."""

    def __init__(self, cfg: GeoLRMConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ImageEncoder(cfg)
        self.transformer = GeoTransformer(cfg.dim, cfg.depth, cfg.heads, cfg)
        self.embed = nn.Parameter(torch.randn(cfg.dim - 3) * 0.02)
        n = cfg.gaussians_per_token
        self.head = nn.Sequential(nn.Linear(cfg.dim, n * 14), nn.SiLU(), nn.Linear(n * 14, n * 14))
        with torch.no_grad():                                                         # start small and half-transparent
            self.head[2].weight.mul_(0.1)
            self.head[2].bias.zero_()

    def rope_positions(self, xyz, pos):
        cfg = self.cfg
        infer_scale = cfg.official_rope_inference_scale and not self.training         # official inference: 1.0
        if cfg.official_rope_positions or infer_scale:
            return official_voxel_index(xyz, cfg.occ_res, 1.0 if infer_scale else 0.5)
        return pos

    def forward(self, xyz, pos, seg, images, c2w, K) -> Gaussians:
        B, N, _ = xyz.shape
        cfg = self.cfg
        feats, shapes, starts = self.encoder(images, c2w, K)
        x = torch.cat([xyz, self.embed.expand(B, N, -1).to(xyz.dtype)], -1)          # (B, N, dim)
        seg_attn = None if cfg.official_keep_padding else seg
        x = self.transformer(x, xyz, self.rope_positions(xyz, pos), seg_attn, c2w, K, images.shape[-2:],
                             feats, shapes, starts)
        raw = self.head(x).float().view(B, N, cfg.gaussians_per_token, 14)
        off, opa, scale, rot, rgb = raw.split([3, 1, 3, 4, 3], -1)
        off = cfg.offset_max * (torch.sigmoid(off) if cfg.official_positive_offsets else torch.tanh(off))
        opacity = torch.sigmoid(opa.squeeze(-1))                                      # (B, N, n)
        if not cfg.official_keep_padding:
            opacity = opacity * (seg >= 0)[..., None]
        rgb = rgb.clamp(-0.5, 0.5) + 0.5 if cfg.official_color_clamp else torch.sigmoid(rgb)
        g = Gaussians(xyz.float()[:, :, None] + off, F.normalize(rot, dim=-1), cfg.scale_max * torch.sigmoid(scale),
                      opacity, rgb)
        return Gaussians(*(t.flatten(1, 2) for t in g))                               # (B, N*n, .)


def render(g: Gaussians, c2w, K, H: int, W: int, background=None, capacity: int = 0) -> dict:
    """Gaussians (B, M, .) into every view (c2w, K (B, V, ...)) -> rgb (B, V, 3, H, W), alpha and
    depth (B, V, 1, H, W) (depth is alpha-weighted, not normalized). The model's own inputs are trusted
    (``validate=False``); ``capacity`` > 0 fixes the tile-intersection lists, so no host sync at all."""
    rgb, alpha, depth = kernels.rasterize_gaussians(
        g.means, g.quats, g.scales, g.opacities, g.rgb, invert_rigid(c2w.float()), K.float(),
        W, H, background=background, validate=False, max_intersections=capacity or None)
    return {"rgb": rgb.permute(0, 1, 4, 2, 3), "alpha": alpha.permute(0, 1, 4, 2, 3),
            "depth": depth.permute(0, 1, 4, 2, 3)}


def resize_views(images, K, size: int):
    """Input views (..., 3, H, W) -> the encoder's size x size (bilinear, antialiased), K scaled to match."""
    H, W = images.shape[-2:]
    if (H, W) == (size, size):
        return images, K
    lead = images.shape[:-3]
    images = F.interpolate(images.reshape(-1, 3, H, W), size=(size, size), mode="bilinear", antialias=True)
    K = K.clone()
    K[..., 0, :] *= size / W
    K[..., 1, :] *= size / H
    return images.reshape(*lead, 3, size, size), K


# ============================================================================ the model


class GeoLRM(nn.Module):
    """Proposal network + reconstruction network. ``stage`` ("proposal" | "recon") selects what ``forward``
    trains; ``lpips_fn`` (set with ``use_lpips``; not part of the state dict) adds the LPIPS term."""

    def __init__(self, cfg: GeoLRMConfig):
        super().__init__()
        self.cfg = cfg
        self.proposal = ProposalNet(cfg)
        self.recon = ReconNet(cfg)
        self.stage = "recon"
        object.__setattr__(self, "lpips_fn", None)

    def use_lpips(self, fn) -> None:
        """``fn``: callable (N, 3, H, W) x2 in [0, 1] -> (N,), or None to drop the LPIPS term."""
        object.__setattr__(self, "lpips_fn", fn)

    def _limit(self, max_tokens):
        return max_tokens or (self.cfg.max_tokens if self.training else self.cfg.max_tokens_infer)

    def _select(self, logits, max_tokens, generator):
        cfg = self.cfg
        return select_anchors(logits, self._limit(max_tokens), cfg.official_cell_positions, generator,
                              pad_to_max=cfg.official_keep_padding, xyz_order=cfg.official_xyz_order)

    @torch.no_grad()
    def propose_anchors(self, images, c2w, K, max_tokens: int | None = None, generator=None) -> Anchors:
        """Frozen stage 1 (eval mode) -> ``Anchors`` for stage 2."""
        was = self.proposal.training
        self.proposal.eval()
        logits = self.proposal(images, c2w, K)
        self.proposal.train(was)
        return self._select(logits, max_tokens, generator)

    def gt_anchors(self, occ: torch.Tensor, max_tokens: int | None = None, generator=None) -> Anchors:
        """Anchors from the occupied cells (> 0) of a grid (B, R, R, R): a ground-truth occupancy instead of
        the proposal network, or ``logits > 0`` of a proposal already computed."""
        return self._select(occ.float(), max_tokens, generator)

    def forward(self, batch: dict, stage: str | None = None):
        """The training / evaluation front door -> (loss, out); out["terms"] holds the named loss terms.
        batch: images (B, V, 3, s, s) in [0, 1] at ``img_size``, c2w (B, V, 4, 4), K (B, V, 3, 3);
          stage "proposal": occupancy (B, R, R, R) (Z, Y, X)                -> out: occ_logits, occ_iou
          stage "recon": target_rgb (B, T, 3, H, W) on ``background`` (B, T, 3), target_alpha,
            target_depth (B, T, 1, H, W), target_c2w, target_K; optional anchors (``Anchors``, e.g.
            ``gt_anchors``), else the frozen proposal's          -> out: rgb, alpha, depth, gaussians, anchors
        Non-finite inputs give a non-finite loss (never an exception), and a reconstruction with no
        occupied cell still gives a loss connected to the graph (zero gradient)."""
        stage = stage or self.stage
        images, c2w, K = batch["images"], batch["c2w"], batch["K"]
        poison = (images.float().sum() + c2w.float().sum() + K.float().sum()) * 0     # NaN/Inf in -> NaN loss
        if stage == "proposal":
            logits = self.proposal(images, c2w, K)
            terms = occupancy_loss(logits, batch["occupancy"], self.cfg.official_affinity_pooled)
            terms["loss"] = terms["loss"] + poison
            return terms["loss"], {"terms": terms, "occ_logits": logits,
                                   "occ_iou": occupancy_iou(logits, batch["occupancy"]).mean()}
        if stage != "recon":
            raise ValueError(f"stage must be 'proposal' or 'recon', got {stage!r}")
        anchors = batch.get("anchors")
        if anchors is None:
            anchors = self.propose_anchors(images, c2w, K)
        g = self.recon(*anchors, images, c2w, K)
        tgt = batch["target_rgb"]
        out = render(g, batch["target_c2w"], batch["target_K"], *tgt.shape[-2:], background=batch["background"],
                     capacity=self.cfg.render_capacity)
        terms = recon_loss(out, {"rgb": tgt, "alpha": batch["target_alpha"], "depth": batch["target_depth"]},
                           self.cfg, self.lpips_fn)
        terms["loss"] = terms["loss"] + poison + g.opacities.sum() * 0                # keeps the graph when empty
        return terms["loss"], {"terms": terms, **out, "gaussians": g, "anchors": anchors}

    @torch.no_grad()
    def reconstruct(self, images, c2w, K, seed: int = 0, max_tokens: int | None = None) -> Gaussians:
        """One object: views (V, 3, H, W) in [0, 1] on white (any size; resized to ``img_size``), c2w
        (V, 4, 4) OpenCV, K (V, 3, 3) pixels -> its ``Gaussians`` (M, .) without padding. Deterministic:
        the anchor subset (when more than ``max_tokens_infer`` cells are occupied) is drawn from a CPU
        generator seeded with ``seed``."""
        was = self.training
        self.eval()
        dev = next(self.parameters()).device
        img, Kr = resize_views(images[None].to(dev).float(), K[None].to(dev).float(), self.cfg.img_size)
        c2w = c2w[None].to(dev).float()
        anchors = self.propose_anchors(img, c2w, Kr, max_tokens, torch.Generator().manual_seed(seed))
        g = self.recon(*anchors, img, c2w, Kr)
        self.train(was)
        keep = (anchors.seg[0] >= 0).repeat_interleave(self.cfg.gaussians_per_token)
        if self.cfg.official_keep_padding:                                            # official: padding is kept
            keep = torch.ones_like(keep)
        return Gaussians(*(t[0][keep] for t in g))

    def configure_optimizer(self, lr: float, weight_decay: float = 0.05, betas=(0.9, 0.95), stage: str | None = None,
                            fused: bool | None = None) -> torch.optim.AdamW:
        """AdamW over the trainable parameters (of one ``stage``'s network if given). No decay on biases,
        norms and the query embeddings (the 1-D parameters and ``embed``), unless ``official_decay_all``.
        ``fused`` (default: where the device supports it, CPU included)."""
        prefix = {"proposal": "proposal.", "recon": "recon.", None: ""}[stage]
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad and n.startswith(prefix)]
        no_wd = lambda n, p: not self.cfg.official_decay_all and (p.ndim < 2 or "embed" in n)  # noqa: E731
        groups = [{"params": [p for n, p in named if not no_wd(n, p)], "weight_decay": weight_decay},
                  {"params": [p for n, p in named if no_wd(n, p)], "weight_decay": 0.0}]
        if fused is None:
            fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for _, p in named)
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
        except (RuntimeError, ValueError):
            return torch.optim.AdamW(groups, lr=lr, betas=betas)

    @classmethod
    def from_checkpoint(cls, path: str, map_location="cpu") -> "GeoLRM":
        """A model from a nano4d ``model.safetensors`` (or the run directory holding it): weights + the
        ``config["model"]`` stored in its metadata."""
        if os.path.isdir(path):
            path = os.path.join(path, "model.safetensors")
        tensors, meta = read_safetensors(path)
        fields = {f.name: f for f in dataclasses.fields(GeoLRMConfig)}
        stored = json.loads(meta.get("config", "{}")).get("model", {})
        unknown = sorted(set(stored) - set(fields))
        if unknown:
            raise ValueError(f"{path}: unknown GeoLRM config fields {unknown}")
        default = GeoLRMConfig()
        cfg = GeoLRMConfig(**{k: type(getattr(default, k))(v) if isinstance(getattr(default, k), tuple) else v
                              for k, v in stored.items()})
        model = cls(cfg)
        model.load_state_dict(tensors)
        return model.to(map_location)

    @classmethod
    def from_official(cls, state_dict: dict, **overrides) -> "GeoLRM":
        """The released GeoLRM weights: ``torch.load("geolrm.ckpt")`` (the Lightning wrapper's state dict as
        ``tools/save_state_dict.py`` writes it, or a full Lightning checkpoint): ``serializer.*`` is the proposal stage,
        ``lrm_generator.*`` the reconstruction stage, ``lpips.*`` is ignored. Sets every official flag,
        infers the sizes from the tensors; what the tensors cannot tell (heads 16 / 16, sampling points 8,
        occupancy grid 128, 448 px inputs, max tokens 4096 / 8192, offset 0.2, scale 0.02: the released
        configs) can be overridden. ValueError names any missing, unexpected or mis-shaped key."""
        if isinstance(state_dict.get("state_dict"), dict):                         # a full Lightning checkpoint
            state_dict = state_dict["state_dict"]
        sd = {k: v for k, v in state_dict.items() if not k.startswith(("lpips.", "ssim."))}
        get = lambda k: _need(sd, k).shape  # noqa: E731
        S, L = "serializer.", "lrm_generator."
        E = get(S + "encoder.model.embeddings.cls_token")[-1]
        p = get(S + "encoder.model.embeddings.patch_embeddings.projection.weight")[-1]
        layers = lambda pre: len({k[len(pre):].split(".")[0] for k in sd if k.startswith(pre)})  # noqa: E731
        up = get(S + "upsample.weight")
        u = round(up[0] ** (1 / 3))
        n14 = get(L + "renderer.latent_decoder.0.weight")[0]
        if n14 % 14:
            raise ValueError(f"from_official: {L}renderer.latent_decoder.0.weight has {n14} rows: only use_sh false "
                             "(14 numbers per Gaussian) is supported")
        occ_res = overrides.get("occ_res", 128)
        size = dict(
            img_size=448, patch_size=p, enc_dim=E, enc_depth=layers(S + "encoder.model.encoder.layer."),
            enc_heads=max(1, E // 64), enc_mlp_ratio=get(S + "encoder.model.encoder.layer.0.mlp.fc1.weight")[0] / E,
            enc_pos_grid=math.isqrt(get(S + "encoder.model.embeddings.position_embeddings")[1] - 1),
            feat_dim=get(S + "encoder.deconv.0.weight")[1], occ_res=occ_res, prop_grid=occ_res // u,
            prop_dim=up[1], prop_depth=layers(S + "transformer.layers."), prop_heads=16,
            dim=get(L + "transformer.query_token")[-1] + 3, depth=layers(L + "transformer.layers."), heads=16,
            max_tokens=4096, max_tokens_infer=8192, gaussians_per_token=n14 // 14, offset_max=0.2, scale_max=0.02,
            n_points=8, ffn_multiple_of=256)
        cfg = GeoLRMConfig(**{**size, **OFFICIAL_FLAGS, **overrides})
        model = cls(cfg)
        own = model.state_dict()
        stray = [k for k in sd if not k.startswith((S, L))]
        if stray:
            raise ValueError(f"from_official: unexpected key {stray[0]!r}")
        mapped = {}
        for pre, net in ((S, "proposal."), (L, "recon.")):
            part = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
            mapped.update({net + k: v for k, v in _map_official_stage(part, pre).items()})
        for k, v in mapped.items():
            if k not in own:
                raise ValueError(f"from_official: unexpected key {_official_name(k)!r}")
            if own[k].shape != v.shape:
                raise ValueError(f"from_official: {_official_name(k)} -> {k}: checkpoint shape {tuple(v.shape)} "
                                 f"!= model {tuple(own[k].shape)}")
        missing = [k for k in own if k not in mapped]
        if missing:
            raise ValueError(f"from_official: missing key {_official_name(missing[0])!r} (for {missing[0]!r})"
                             f"{f', and {len(missing) - 1} more' if len(missing) > 1 else ''}")
        model.load_state_dict(mapped)
        return model


def _need(sd: dict, key: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"from_official: missing key {key!r}")
    return sd[key]


_OFFICIAL_NAMES = [  # one stage of the official checkpoint (prefix stripped) -> ProposalNet / ReconNet keys
    ("encoder.deconv.0.{p}", "encoder.up.{p}"),
    ("encoder.deconv.1.{p}", "encoder.up_bn.{p}"),
    ("encoder.low_level_encoder.0.{p}", "encoder.low.{p}"),
    ("encoder.low_level_encoder.1.{p}", "encoder.low_bn.{p}"),
    ("transformer.query_token", "embed"),                                             # (1, 1, d - 3), reshaped
    ("transformer.layers.{i}.self_attention.wq.weight", "transformer.blocks.{i}.qkv.weight"),  # + wk, wv: fused
    ("transformer.layers.{i}.self_attention.wo.weight", "transformer.blocks.{i}.proj.weight"),
    ("transformer.layers.{i}.self_attention_norm.weight", "transformer.blocks.{i}.norm1.weight"),
    ("transformer.layers.{i}.cross_attention_norm.weight", "transformer.blocks.{i}.norm2.weight"),
    ("transformer.layers.{i}.ffn_norm.weight", "transformer.blocks.{i}.norm3.weight"),
    ("transformer.layers.{i}.feed_forward.w{n}.weight", "transformer.blocks.{i}.w{n}.weight"),
    ("transformer.layers.{i}.cross_attention.deformable_attention.sampling_offsets.{p}",
     "transformer.blocks.{i}.cross.offsets.{p}"),
    ("transformer.layers.{i}.cross_attention.deformable_attention.attention_weights.{p}",
     "transformer.blocks.{i}.cross.weights.{p}"),
    ("transformer.layers.{i}.cross_attention.deformable_attention.value_proj.{p}",
     "transformer.blocks.{i}.cross.value_proj.{p}"),
    ("transformer.layers.{i}.cross_attention.output_proj.{p}", "transformer.blocks.{i}.cross.out_proj.{p}"),
    ("transformer.layers.{i}.cross_attention.cross_view_weight.{p}", "transformer.blocks.{i}.cross.view_logit.{p}"),
    ("transformer.norm.weight", "transformer.norm.weight"),
    ("upsample.{p}", "head.{p}"),                                                     # proposal occupancy head
    ("renderer.latent_decoder.{n}.{p}", "head.{n}.{p}"),                              # Gaussian head
]


def _official_name(key: str) -> str:
    """nano4d key -> the official checkpoint key it comes from (for error messages)."""
    net, _, rest = key.partition(".")
    pre = {"proposal": "serializer.", "recon": "lrm_generator."}[net]
    if rest.startswith("encoder.") and (hf := _rename(rest[len("encoder."):], _HF_NAMES, reverse=True)):
        return pre + "encoder.model." + hf
    return pre + (_rename(rest, _OFFICIAL_NAMES, reverse=True) or rest)


def _map_official_stage(part: dict, prefix: str) -> dict:
    """Keys of one official stage (``serializer.`` or ``lrm_generator.`` stripped) -> nano4d keys. The
    DINOv2 backbone goes through the Hugging Face names, q/k/v are fused, the query token is reshaped."""
    out, qkv = {}, {}
    dino = {k[len("encoder.model."):]: v for k, v in part.items() if k.startswith("encoder.model.")}
    out.update({"encoder." + k: v for k, v in map_dinov2_hf(dino, "from_official").items()})
    for key, val in part.items():
        if key.startswith("encoder.model."):
            continue
        if m := re.fullmatch(r"transformer\.layers\.(\d+)\.self_attention\.w([qkv])\.weight", key):
            qkv.setdefault(m.group(1), {})[m.group(2)] = val
        elif key == "transformer.query_token":
            out["embed"] = val.reshape(1, -1) if prefix == "serializer." else val.reshape(-1)
        elif (new := _rename(key, _OFFICIAL_NAMES)) is not None:
            out[new] = val
        else:
            raise ValueError(f"from_official: unexpected key {prefix + key!r}")
    for i, d in qkv.items():
        if set(d) != {"q", "k", "v"}:
            miss = sorted({"q", "k", "v"} - set(d))[0]
            raise ValueError(f"from_official: missing key {prefix}transformer.layers.{i}.self_attention.w{miss}.weight")
        out[f"transformer.blocks.{i}.qkv.weight"] = torch.cat([d["q"], d["k"], d["v"]], 0)
    return out


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path: str) -> tuple:
    """A ``.safetensors`` file -> ({name: tensor}, metadata dict), with the standard library only: 8-byte
    little-endian header length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}},
    then the raw little-endian data."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            data = f.read()
        meta = header.pop("__metadata__", None) or {}
        out = {}
        for name, info in header.items():
            a, b = info["data_offsets"]
            if b > len(data):
                raise ValueError(f"tensor {name!r} ends at byte {b} of a {len(data)}-byte data section")
            dt = _ST_DTYPES[info["dtype"]]
            t = torch.frombuffer(bytearray(data[a:b]), dtype=dt) if b > a else torch.empty(0, dtype=dt)
            out[name] = t.reshape(info["shape"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a readable .safetensors file ({e}); re-save or re-download it") from e
    return out, meta


# ============================================================================ losses


def edge_aware_log_l1(pred, gt, image, mask, left_only: bool = False):
    """log(1 + |d - d_gt|) of the left/top pixel of horizontal and vertical neighbour pairs, weighted by
    exp(-mean_c |grad I|) of the ground-truth image, over pairs whose both pixels are in ``mask`` (``left_only``:
    whose left/top pixel is, as the official code). pred, gt, mask (N, 1, H, W)."""
    err = torch.log1p((pred - gt).abs())
    total = pred.new_zeros(())
    for dim in (-1, -2):
        n = err.shape[dim] - 1
        w = torch.exp(-(image.narrow(dim, 1, n) - image.narrow(dim, 0, n)).abs().mean(1, keepdim=True))
        m = mask.narrow(dim, 0, n).float() if left_only else (mask.narrow(dim, 1, n) * mask.narrow(dim, 0, n)).float()
        total = total + (err.narrow(dim, 0, n) * w * m).sum() / m.sum().clamp_min(1)
    return total


def tv_loss(d):
    """Total variation of (N, 1, H, W): mean |horizontal| + mean |vertical| differences."""
    return (d[..., :, 1:] - d[..., :, :-1]).abs().mean() + (d[..., 1:, :] - d[..., :-1, :]).abs().mean()


def recon_loss(out: dict, target: dict, cfg: GeoLRMConfig, lpips=None) -> dict:
    """Weighted reconstruction loss on the target views. ``out`` has rgb (B, T, 3, H, W), alpha and depth
    (B, T, 1, H, W) renders; ``target`` has rgb composited on the render background, alpha and z-depth.
    MSE is on images mapped to [-1, 1] (as the official code; ``official_rgb_clamp``: of the render clamped
    to [0, 1]). ``lpips``: callable (N,3,H,W)x2 in [0,1] -> (N,), or None to drop that term."""
    pr, pa, pd = (out[k].flatten(0, 1).float() for k in ("rgb", "alpha", "depth"))
    tr, ta, td = (target[k].flatten(0, 1).float() for k in ("rgb", "alpha", "depth"))
    pm = pr.clamp(0, 1) if cfg.official_rgb_clamp else pr
    terms = {"rgb": F.mse_loss(pm * 2 - 1, tr * 2 - 1), "alpha": F.mse_loss(pa, ta),
             "depth": edge_aware_log_l1(pd, td, tr, ta > 0, cfg.official_depth_mask_left), "tv": tv_loss(pd)}
    weights = {"rgb": cfg.w_rgb, "alpha": cfg.w_alpha, "depth": cfg.w_depth, "tv": cfg.w_tv}
    if lpips is not None and cfg.w_lpips > 0:
        terms["lpips"], weights["lpips"] = lpips(pr.clamp(0, 1), tr).mean(), cfg.w_lpips
    terms["loss"] = sum(weights[k] * terms[k] for k in weights)
    return terms
