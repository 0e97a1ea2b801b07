"""MIM4D: masked multi-view *video* pretraining with SDF volume rendering (Zou et al., 2024).

What is implemented (one file; imports only torch, ``kernels`` and the standard library):
  1. masked image encoder   ConvNeXt (LayerNorm eps 1e-6, stochastic depth, frozen first stages, an output
                            LayerNorm on each stage the FPN reads) with SparK-style masking (30 % of the 32-px
                            patches of every image zeroed, every stage re-masked); FPN over stages 1-3 plus one
                            extra stride-2 conv -> 4 levels (strides 8/16/32/64) of ``fpn_dim`` channels;
                            ``input_proj`` (1x1 conv) on every level; one shared depth head (1x1 conv -> D bins,
                            softmax) applied to every level
  2. voxel lifting          every voxel point (LiDAR frame) projected into every camera and FPN level; features
                            sampled bilinearly with ``kernels.deform_attn`` (one point per level), weighted by
                            the depth probability at (u, v, d), summed over cameras and levels -> Conv3d -> 32 ch
  3. dropped-frame decoder  target frames {0, k} (frame 0 = the newest); every other frame's volume warped into
                            the target frame by the rigid motion between the two LiDAR frames, flattened to BEV,
                            projected (1x1 conv + per-cell LayerNorm), decoded by a short branch (the first other
                            frame) and a long branch (all other frames as a queue) of BEVFormer temporal
                            deformable attention (``kernels.deform_attn``) with learned BEV queries and a DETR
                            sine position encoding -> 3x3 conv + per-cell LayerNorm -> predicted volume
  4. SDF field + rendering  rays through LiDAR-supervised pixels of the target frame; stratified + NeuS
                            importance samples inside the ray/volume-box intersection; a *render field*
                            (``MIM4DConfig.field``, see section 4) turns the volume into colour and depth;
                            NeuS sharpness inv_s = exp(10 * variance)
  5. loss                   10 L1(rgb) + 10 L1(depth) on the predicted and the directly encoded volume of
                            both targets, averaged over the targets

Frames. Ego frame x forward, y left, z up (nuScenes); cameras OpenCV (``cam2ego`` (B, N, 4, 4), ``K`` pixels).
The voxel volume lives in the **LiDAR frame** (``lidar2ego`` (B, 4, 4)), as the official ``pc_range`` does.
Batches hold frames in time order (oldest first, as the data loaders return them); the model indexes them
newest first, like the official ``[key, t-1, t-2]``: model frame 0 is the newest batch frame.

Differences from the official code (hustvl/MIM4D vs0.1 + the UniPAD render head) and their flags:
  - voxel positions: the official lifting puts voxel i at ``min + i*size`` (size = range/N) while its renderer
    reads index i at ``min + i*range/(N-1)`` (up to one voxel of drift). Here both use the grid nodes
    ``min + i*range/(N-1)``, so the lifted, rendered and ray-picking boxes are all ``pc_range``.
    ``official_voxel_drift=True`` lifts at ``min + i*size`` again.
  - the official temporal warp applies the metric 4x4 motion to *voxel indices* (metres read as voxels,
    rotation about the grid corner). Here the warp is metric. ``official_index_warp=True`` restores it.
  - image features: the official samples FPN maps with ``grid_sample(align_corners=True)`` at u/W, i.e. a
    feature index of u/W*(w-1), not pixel centres. Here features are read at pixel centres (u/s - 1/2 at
    stride s). ``official_lift_align_corners=True`` restores the official index.
  - render field: ``field="voxel"`` (the default) runs the SDF/feature MLP once per voxel (1x1x1 convs) before
    the fused renderer ``kernels.render_sdf`` (section-form NeuS alpha, no cos term), composites the features
    and shades RGB after compositing (an MLP on the rendered feature + view direction). The official field
    evaluates the MLPs per sample with the cos term from autograd normals; ``field="official"`` (``OfficialField``,
    the ``paper`` preset's field) is its port, differentiating twice through ``kernels.trilinear``. In it, the
    last sample's spacing repeats the previous one (the official bin runs to the far end of the last stratified
    bin; the head hands fields sorted sample distances only). No flag.
  - importance sampling: the discrete NeuS weights at a fixed s = 64 from the section-form alpha and a
    deterministic mid-quantile inverse CDF; the official NeuS up-sampler estimates cos from neighbouring samples
    and jitters its PDF samples. No flag.
  - inv_s = exp(10 * variance) is clamped to [1e-3, 1e6] (the official is unclamped), so a diverging run ends
    in a non-finite loss instead of a renderer error. No flag (the clamp only acts far outside training values).
  - normalization: the official ``render_conv`` uses BatchNorm3d; here GroupNorm(4), so every sample's loss is
    independent of the batch. Batch size 1 is hard-coded in the official decoder; everything here takes a batch.
  - rays: the official picks 2048 projected LiDAR points per camera (with replacement when fewer) and shoots
    each ray through its exact LiDAR point (colour: the pixel it falls in); for a non-key target it projects the
    *key* frame's LiDAR into that frame's images. Here rays go through pixel centres of the target frame's own
    depth map (LiDAR projected by the data pipeline) whose surface point lies in the volume box, 3-50 m from the
    LiDAR in xy (``ray_radius``), valid pixels first then random, without duplicates. GT depth is the Euclidean
    distance along the ray in both. No flag (a data-pipeline choice).
  - weight decay: the official (mmcv) decays every parameter; ``configure_optimizer`` skips norms, biases,
    1-D parameters, queries and embeddings unless ``official_decay_all=True``.
  - EMA: the recipe's (decay 0.999 ramped by 1 - exp(-t/2000), BEVDepth's ``ModelEMA``) is ``EMA``'s
    default; the vs0.1 config's ``EMAHook`` entry resolves to mmcv's hook (decay 0.9998, no effective ramp,
    parameters only), which ``EMA(model, decay=0.9998, ramp=0)`` reproduces.
  - depth bins: as the official, bin k sits at k*depth_max/(D-1) and voxels outside (0, depth_max) camera
    depth are not lifted.
Shape legend: B batch, T frames, N cameras, C channels, Z/Y/X voxel grid, R rays, S samples per ray.
"""
from __future__ import annotations

import copy
import json
import math
import os
import struct
from dataclasses import dataclass, fields as dc_fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


@dataclass
class MIM4DConfig:
    img_size: tuple = (96, 176)          # (H, W) of the input images (padded to a multiple of 32 inside)
    num_cams: int = 6                    # number of surround cameras
    num_frames: int = 3                  # T frames per sample
    # masked ConvNeXt backbone
    depths: tuple = (1, 1, 2, 1)         # ConvNeXt blocks per stage
    dims: tuple = (24, 48, 96, 192)      # ConvNeXt channels per stage
    drop_path: float = 0.0               # stochastic depth, linear over blocks up to this rate
    frozen_stages: int = 0               # stem + the first ``frozen_stages`` stages get no gradient
    mask_ratio: float = 0.3              # fraction of image patches masked (SparK-style, per image)
    mask_patch: int = 32                 # masking patch size in pixels
    fpn_dim: int = 32                    # FPN / input_proj channels
    depth_bins: int = 16                 # depth bins of the per-level depth head
    depth_max: float = 40.0              # metres covered by the depth bins
    # voxel grid in the LiDAR frame: (x_min, y_min, z_min, x_max, y_max, z_max), nodes (X, Y, Z)
    pc_range: tuple = (-20.0, -20.0, -3.0, 20.0, 20.0, 3.0)
    grid: tuple = (32, 32, 4)            # voxel nodes (X, Y, Z) over pc_range
    vox_dim: int = 32                    # channels of each frame's volume after render_conv
    # dropped-frame temporal decoder
    short_dim: int = 64                  # temporal decoder short branch width
    short_heads: int = 4                 # short branch attention heads
    long_dim: int = 32                   # temporal decoder long branch width
    long_heads: int = 2                  # long branch attention heads
    dec_layers: int = 2                  # decoder layers per branch
    dec_points: int = 4                  # deformable sampling points per head
    # SDF field and rendering
    field: str = "voxel"                 # render field, a key of FIELDS (section 4)
    field_hidden: int = 32               # hidden width of the voxel field's per-voxel MLP
    render_feat: int = 16                # feature channels rendered next to the SDF (voxel field)
    # official per-sample field (field="official"): the UniPAD SDF / RGB decoders' sizes
    sample_hidden: int = 16              # width of both decoders
    sample_geo: int = 16                 # geometry features output next to the SDF
    sample_sdf_blocks: int = 5           # SDF decoder: fc_p + 6 linear layers (5 hidden + output)
    sample_rgb_blocks: int = 3           # RGB decoder: fc_p + 4 linear layers (3 hidden + output)
    rays_per_cam: int = 96                # supervised LiDAR rays per camera and target frame
    ray_radius: tuple = (3.0, 50.0)      # picked surface points lie this far from the LiDAR in xy (metres)
    num_uniform: int = 48                # stratified samples per ray
    num_importance: int = 16             # NeuS up-samples from the coarse pass
    coarse_inv_s: float = 64.0           # fixed NeuS sharpness of the coarse pass that places importance samples
    variance_init: float = 0.3           # inv_s = exp(10 * variance)
    near_min: float = 1.0                # metres (the official box collider clamps near to >= 1 m)
    rgb_weight: float = 10.0             # weight of the L1 RGB loss
    depth_weight: float = 10.0           # weight of the masked L1 depth loss
    # official behaviour, reachable by flags (see the docstring)
    official_voxel_drift: bool = False
    official_index_warp: bool = False
    official_lift_align_corners: bool = False
    official_decay_all: bool = False


PRESETS = {
    "tiny": MIM4DConfig(),
    # paper (vs0.1): ConvNeXt-B (drop path 0.2, stem + stage 0 frozen), FPN 128, 64 depth bins over 64 m,
    # +-51.2 m x +-51.2 m x [-5, 3] m (LiDAR frame) on 128 x 128 x 5 nodes, 2048 rays/cam, 72 + 24 samples,
    # 1600x900 images scaled by 0.5 -> 450x800 (padded to 480x800 inside)
    "paper": MIM4DConfig(img_size=(450, 800), depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), drop_path=0.2,
                         frozen_stages=1, fpn_dim=128, depth_bins=64, depth_max=64.0,
                         pc_range=(-51.2, -51.2, -5.0, 51.2, 51.2, 3.0), grid=(128, 128, 5), short_dim=128,
                         long_dim=64, field_hidden=64, render_feat=32, rays_per_cam=2048, num_uniform=72,
                         num_importance=24, field="official"),
}

INV_S_RANGE = (1e-3, 1e6)                # clamp of the NeuS sharpness exp(10 * variance)


class Rays(NamedTuple):
    """Rays in the volume (LiDAR) frame, metres. origins, dirs (B, R, 3) (dirs unit); pixels (B, R) flat index
    into the target frame's (N*H*W) pixels; depth (B, R) ground-truth distance along the ray; valid (B, R) bool."""
    origins: torch.Tensor
    dirs: torch.Tensor
    pixels: torch.Tensor
    depth: torch.Tensor
    valid: torch.Tensor


class Render(NamedTuple):
    """rgb (B, R, 3) in [0, 1]; depth (B, R) expected distance along the ray (metres); opacity (B, R);
    hit (B, R) bool: the ray crosses the volume box beyond the near plane."""
    rgb: torch.Tensor
    depth: torch.Tensor
    opacity: torch.Tensor
    hit: torch.Tensor


def _no_autocast(device):
    """Geometry (projections, poses, sample positions) always runs in fp32, also inside autocast regions."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


# ----------------------------------------------------------------------------- 1. masked image encoder

class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (eps 1e-6, as ConvNeXt)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__(dim, eps=eps)

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def drop_path(x, p: float, training: bool):
    """Stochastic depth: zero a sample's residual branch with probability p (rescaled by 1/(1-p))."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= p
    return x * keep.to(x.dtype) / (1 - p)


class ConvNeXtBlock(nn.Module):
    """dwconv 7x7 -> LN -> Linear 4C -> GELU -> Linear C -> layer scale -> drop path -> residual, re-masked
    (SparK): masked positions stay exactly zero, so the depthwise conv never spreads masked content.
    Parameter names follow facebookresearch/ConvNeXt (and the official ``MaskConvNeXt``)."""

    def __init__(self, dim, drop_path_rate=0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))
        self.drop_path = drop_path_rate

    def forward(self, x, keep):                        # x (B, C, h, w), keep (B, 1, h, w) in {0, 1}
        y = self.dwconv(x) * keep
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y.permute(0, 2, 3, 1))))) * self.gamma
        y = y.permute(0, 3, 1, 2) * keep
        return x + drop_path(y, self.drop_path, self.training)


class MaskedConvNeXt(nn.Module):
    """ConvNeXt trunk (``downsample_layers`` + ``stages``) with an output LayerNorm ``norm{i}`` per stage."""

    def __init__(self, cfg: MIM4DConfig):
        super().__init__()
        d = cfg.dims
        self.frozen_stages = cfg.frozen_stages
        self.downsample_layers = nn.ModuleList([nn.Sequential(nn.Conv2d(3, d[0], 4, stride=4), LayerNorm2d(d[0]))])
        self.downsample_layers.extend(nn.Sequential(LayerNorm2d(d[i - 1]), nn.Conv2d(d[i - 1], d[i], 2, stride=2))
                                      for i in range(1, 4))
        n = sum(cfg.depths)
        rates = [cfg.drop_path * i / max(n - 1, 1) for i in range(n)]             # linear 0 -> drop_path
        self.stages, j = nn.ModuleList(), 0
        for i in range(4):
            self.stages.append(nn.ModuleList(ConvNeXtBlock(d[i], rates[j + b]) for b in range(cfg.depths[i])))
            j += cfg.depths[i]
        for i in range(1, 4):                          # stage 0's output is not used (FPN start level 1)
            self.add_module(f"norm{i}", LayerNorm2d(d[i]))
        for m in self.modules():                       # ConvNeXt init: trunc normal 0.02, zero bias
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for p in self.frozen_parameters():
            p.requires_grad_(False)

    def frozen_parameters(self):
        for i in range(self.frozen_stages):
            yield from self.downsample_layers[i].parameters()
            yield from self.stages[i].parameters()

    def train(self, mode: bool = True):
        super().train(mode)
        for i in range(self.frozen_stages):            # frozen stages stay in eval mode (no stochastic depth)
            self.downsample_layers[i].eval()
            self.stages[i].eval()
        return self

    def forward(self, x, keep):                        # x (B, 3, H, W), keep (B, 1, H/32, W/32) patch mask
        """-> the normalized outputs of stages 1..3 (strides 8, 16, 32), masked positions zero."""
        x = x * F.interpolate(keep, size=x.shape[-2:], mode="nearest")   # masked pixels never enter
        outs = []
        for i in range(4):
            x = self.downsample_layers[i](x)
            k = F.interpolate(keep, size=x.shape[-2:], mode="nearest")
            x = x * k
            for blk in self.stages[i]:
                x = blk(x, k)
            if i > 0:
                outs.append(getattr(self, f"norm{i}")(x) * k)
        return outs


class FPN(nn.Module):
    """mmdet FPN as the official config uses it: in = stages 1..3, out ``fpn_dim``, ``start_level=1``,
    ``num_outs=4`` with the extra level a stride-2 3x3 conv on the last output -> strides 8/16/32/64."""

    def __init__(self, cfg: MIM4DConfig):
        super().__init__()
        c = cfg.fpn_dim
        self.lateral_convs = nn.ModuleList(nn.Conv2d(d, c, 1) for d in cfg.dims[1:])
        self.fpn_convs = nn.ModuleList([nn.Conv2d(c, c, 3, padding=1) for _ in cfg.dims[1:]]
                                       + [nn.Conv2d(c, c, 3, stride=2, padding=1)])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats):                          # feats: 3 maps, strides 8, 16, 32
        lat = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lat)]
        outs.append(self.fpn_convs[-1](outs[-1]))
        return outs                                    # (B, fpn_dim, H/s, W/s), s = 8, 16, 32, 64


# ----------------------------------------------------------------------------- voxel grid helpers

def voxel_points(cfg: MIM4DConfig, device=None, lifted: bool = True) -> torch.Tensor:
    """LiDAR-frame coordinates (Z, Y, X, 3) of the voxels: the grid nodes ``min + i*(max-min)/(N-1)``, the
    points the renderer's normalized frame puts at integer indices. ``lifted`` with ``official_voxel_drift``:
    ``min + i*(max-min)/N`` instead, where the official lifting samples the images."""
    drift = lifted and cfg.official_voxel_drift
    axes = []
    for i in range(3):
        lo, hi, n = cfg.pc_range[i], cfg.pc_range[i + 3], cfg.grid[i]
        idx = torch.arange(n, dtype=torch.float32)
        axes.append(lo + idx * (hi - lo) / (n if drift else max(n - 1, 1)))
    z, y, x = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    return torch.stack([x, y, z], -1).to(device)


def metric_to_unit(cfg: MIM4DConfig, p: torch.Tensor, direction: bool = False) -> torch.Tensor:
    """LiDAR-frame metres -> the volume's normalized frame: ``pc_range`` maps to [-1, 1]^3 (align_corners=True:
    -1 / +1 at the first / last node). One box for lifting, ray picking and rendering."""
    lo = torch.tensor(cfg.pc_range[:3], device=p.device, dtype=p.dtype)
    hi = torch.tensor(cfg.pc_range[3:], device=p.device, dtype=p.dtype)
    scale = 2 / (hi - lo)
    return p * scale if direction else (p - lo) * scale - 1


def in_volume(cfg: MIM4DConfig, p: torch.Tensor) -> torch.Tensor:
    """(...,) bool: LiDAR-frame points (..., 3) inside the volume box ``pc_range``."""
    lo, hi = p.new_tensor(cfg.pc_range[:3]), p.new_tensor(cfg.pc_range[3:])
    return ((p >= lo) & (p <= hi)).all(-1)


def transform(T: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Apply 4x4 poses T (..., 4, 4) to points p (..., P, 3)."""
    return p @ T[..., :3, :3].transpose(-1, -2) + T[..., None, :3, 3]


# ----------------------------------------------------------------------------- 2. voxel lifting

def project_voxels(cfg, K, cam2ego, lidar2ego):
    """Voxel points -> pixel coordinates uv (B, N, Q, 2) and camera z-depth (B, N, Q); Q = Z*Y*X in (Z, Y, X)
    order. K (B, N, 3, 3) pixels, cam2ego (B, N, 4, 4) OpenCV camera -> ego, lidar2ego (B, 4, 4)."""
    with _no_autocast(K.device):
        pts = voxel_points(cfg, K.device).reshape(-1, 3)                         # (Q, 3) LiDAR metres
        lidar2cam = torch.linalg.inv(cam2ego.float()) @ lidar2ego.float()[:, None]
        cam = transform(lidar2cam, pts)                                          # (B, N, Q, 3)
        z = cam[..., 2]
        uv = (cam @ K.float().transpose(-1, -2))[..., :2] / z.clamp_min(1e-5)[..., None]
    return uv, z


def lift_to_voxels(cfg, maps, probs, K, cam2ego, lidar2ego, img_hw):
    """Sum image features into voxel points over cameras and FPN levels.
    maps / probs: per level (B*N, C, h, w) / (B*N, D, h, w); K, cam2ego (B, N, 3|4, 3|4); lidar2ego (B, 4, 4);
    img_hw = padded (H, W). Returns (B, C, Z, Y, X)."""
    BN, C = maps[0].shape[:2]
    B, N = K.shape[:2]
    X, Y, Z = cfg.grid
    M = len(maps)
    uv, z = project_voxels(cfg, K, cam2ego, lidar2ego)                          # (B, N, Q, 2), (B, N, Q)
    with _no_autocast(K.device):
        H, W = img_hw
        frac = uv / torch.tensor([W, H], device=uv.device, dtype=uv.dtype)     # image fraction
        vis = (z > 1e-5) & (z < cfg.depth_max) & (frac > 0).all(-1) & (frac < 1).all(-1)
        frac = torch.where(vis[..., None], frac, torch.full_like(frac, -1.0))   # off-image: sample nothing
        d_norm = (z / cfg.depth_max * 2 - 1).reshape(BN, -1, 1)                # bin k at k * depth_max / (D - 1)
        locs, weights = [], []
        for m, p in zip(maps, probs):
            hw = torch.tensor(m.shape[-2:][::-1], device=uv.device, dtype=uv.dtype)   # (w, h)
            if cfg.official_lift_align_corners:
                ix = frac * (hw - 1)                                            # feature index u/W * (w - 1)
            else:
                ix = frac * hw - 0.5                                            # pixel centres
            ix = ix.reshape(BN, -1, 2)
            locs.append((ix + 0.5) / hw)                                        # deform_attn: [0, 1] fraction
            g = torch.cat([ix / (hw - 1).clamp_min(1) * 2 - 1, d_norm], -1)     # grid_sample, align_corners=True
            w = F.grid_sample(p.float()[:, None], g.reshape(BN, 1, 1, -1, 3), align_corners=True)
            weights.append(w[:, 0, 0, 0])                                       # (B*N, Q)
        weights = torch.stack(weights, -1) * vis.reshape(BN, -1, 1)            # (B*N, Q, M)
        locs = torch.stack(locs, 2)                                             # (B*N, Q, M, 2)
    # one deform_attn call: M levels x 1 point, 1 head of C channels, cameras folded into the batch
    value = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)[:, :, None]   # (B*N, S, 1, C)
    shapes = [tuple(m.shape[-2:]) for m in maps]                           # Python ints: no host sync
    out = kernels.deform_attn(value, shapes, None, locs[:, :, None, :, None].to(value.dtype),
                              weights.reshape(BN, -1, 1, M, 1).to(value.dtype))
    out = out.reshape(B, N, Z, Y, X, C).sum(1)                                  # sum over cameras
    return out.permute(0, 4, 1, 2, 3).contiguous()                              # (B, C, Z, Y, X)


# ----------------------------------------------------------------------------- 3. dropped-frame decoder

def frame_order(T: int, target: int) -> list:
    """The frames that predict ``target``, in the official order: model index order (newest first), target
    skipped. The first one feeds the short branch."""
    return [j for j in range(T) if j != target]


def nearest_frame(T: int, target: int) -> int:
    """The other frame closest in time to ``target`` (the newer one on ties): the warp-only baseline."""
    return min(frame_order(T, target), key=lambda j: (abs(j - target), j))


def warp_volume(cfg, vol, src2tgt):
    """Resample ``vol`` (B, C, Z, Y, X), built in a source LiDAR frame, into the target LiDAR frame.
    ``src2tgt`` (B, 4, 4) maps source metres to target metres. Metric (default): for each target voxel node p,
    read the source volume at inv(src2tgt) p. ``official_index_warp``: apply the metric transform to voxel
    indices, as the official ``shift_feature`` does."""
    B = vol.shape[0]
    X, Y, Z = cfg.grid
    with _no_autocast(vol.device):
        tgt2src = torch.linalg.inv(src2tgt.float())
        if cfg.official_index_warp:
            zi, yi, xi = torch.meshgrid(*[torch.arange(n, device=vol.device, dtype=torch.float32) for n in (Z, Y, X)],
                                        indexing="ij")
            src_idx = transform(tgt2src, torch.stack([xi, yi, zi], -1).reshape(1, -1, 3))
            n = torch.tensor(cfg.grid, device=vol.device, dtype=torch.float32)
            unit = src_idx / (n - 1) * 2 - 1
        else:
            p = voxel_points(cfg, vol.device, lifted=False).reshape(1, -1, 3)    # nodes as the renderer reads them
            unit = metric_to_unit(cfg, transform(tgt2src, p))                      # (B, Q, 3)
    grid = unit.reshape(B, Z, Y, X, 3).to(vol.dtype)
    return F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def sine_position_encoding(Y: int, X: int, num_feats: int, temperature: float = 10000.0, device=None):
    """DETR / mmdet ``SinePositionalEncoding(normalize=True)`` of a Y x X map -> (Y*X, 2*num_feats):
    coordinates (i + 1) / n * 2 pi, frequencies temperature^(-2*(k//2)/num_feats), sin/cos interleaved,
    y channels first then x channels."""
    y = (torch.arange(Y, device=device, dtype=torch.float32) + 1) / (Y + 1e-6) * 2 * math.pi
    x = (torch.arange(X, device=device, dtype=torch.float32) + 1) / (X + 1e-6) * 2 * math.pi
    k = torch.arange(num_feats, device=device, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / num_feats)

    def enc(c):                                       # (n,) -> (n, num_feats)
        a = c[:, None] / dim_t
        return torch.stack([a[:, 0::2].sin(), a[:, 1::2].cos()], -1).flatten(1)
    py, px = enc(y), enc(x)
    return torch.cat([py[:, None].expand(Y, X, num_feats), px[None].expand(Y, X, num_feats)], -1).reshape(Y * X, -1)


class TemporalSelfAttention(nn.Module):
    """BEVFormer temporal self-attention over a queue of L BEV maps (1 level, P points): offsets and weights
    come from query + position (softmax over the points of each queue entry and head); every queue entry is
    sampled with ``kernels.deform_attn``; results averaged over the queue; output projection; residual on the
    query without position."""

    def __init__(self, dim, heads, points, queue):
        super().__init__()
        self.h, self.p, self.L = heads, points, queue
        self.sampling_offsets = nn.Linear(dim, queue * heads * points * 2)
        self.attention_weights = nn.Linear(dim, queue * heads * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(heads, dtype=torch.float32) * (2 * math.pi / heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().amax(-1, keepdim=True)                         # unit square direction per head
        grid = grid[:, None, None] * torch.arange(1, points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():                          # bias layout (heads, queue, points, 2) as the official
            self.sampling_offsets.bias.copy_(grid.expand(heads, queue, points, 2).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, q, pos, values, ref, hw):        # q, pos (B, Q, C); values (B, L, Q, C); ref (Q, 2) in [0, 1]
        B, Q, C = q.shape
        Y, X = hw
        L, H, P = self.L, self.h, self.p
        qp = q + pos
        off = self.sampling_offsets(qp).reshape(B, Q, H, L, P, 2) / torch.tensor([X, Y], device=q.device, dtype=q.dtype)
        loc = ref[None, :, None, None, None] + off                              # (B, Q, H, L, P, 2)
        w = self.attention_weights(qp).reshape(B, Q, H, L, P).softmax(-1)
        v = self.value_proj(values).reshape(B * L, Q, H, C // H)                # queue folded into batch
        loc = loc.permute(0, 3, 1, 2, 4, 5).reshape(B * L, Q, H, 1, P, 2)
        w = w.permute(0, 3, 1, 2, 4).reshape(B * L, Q, H, 1, P)
        out = kernels.deform_attn(v, [(Y, X)], None, loc.to(v.dtype), w.to(v.dtype))   # int shapes: no sync
        out = out.reshape(B, L, Q, C).mean(1)                                   # average over the queue
        return q + self.output_proj(out)


class TemporalLayer(nn.Module):
    """BEVFormerLayer with operation order (self_attn, norm, ffn, norm); FFN dim -> 2 dim -> dim, ReLU."""

    def __init__(self, dim, heads, points, queue):
        super().__init__()
        self.attn = TemporalSelfAttention(dim, heads, points, queue)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, q, pos, values, ref, hw):
        q = self.norm1(self.attn(q, pos, values, ref, hw))
        return self.norm2(q + self.ffn(q))


class DroppedFrameDecoder(nn.Module):
    """Official ``BiTemporalPredictor_longshort``: predict a target frame's (vox_dim, Z, Y, X) volume from the
    other frames' warped volumes (given in ``frame_order``)."""

    def __init__(self, cfg: MIM4DConfig):
        super().__init__()
        X, Y, Z = cfg.grid
        self.cfg = cfg
        cz, ds, dl = cfg.vox_dim * Z, cfg.short_dim, cfg.long_dim
        self.proj = nn.Linear(cz, ds, bias=False)                               # 1x1 conv per cell
        self.proj_norm = nn.LayerNorm(ds, eps=1e-6)                             # per-cell LayerNorm
        self.frame_embeds = nn.Parameter(torch.randn(cfg.num_frames, ds))
        self.queries_short = nn.Parameter(torch.empty(Y * X, ds))
        self.queries_long = nn.Parameter(torch.empty(Y * X, dl))
        self.input_proj = nn.Sequential(nn.Linear(ds, dl), nn.LayerNorm(dl))
        L = cfg.num_frames - 1
        self.short = nn.ModuleList(TemporalLayer(ds, cfg.short_heads, cfg.dec_points, 1) for _ in range(cfg.dec_layers))
        self.long = nn.ModuleList(TemporalLayer(dl, cfg.long_heads, cfg.dec_points, L) for _ in range(cfg.dec_layers))
        self.output_proj = nn.Conv2d(ds + dl, cz, 3, padding=1, bias=False)
        self.output_norm = LayerNorm2d(cz)                                      # per-cell LayerNorm
        for p in (self.proj.weight, self.queries_short, self.queries_long, self.input_proj[0].weight,
                  self.output_proj.weight):
            nn.init.xavier_uniform_(p)
        for layer in (*self.short, *self.long):
            for lin in (layer.ffn[0], layer.ffn[2]):
                nn.init.xavier_uniform_(lin.weight)
        self.register_buffer("pos_short", sine_position_encoding(Y, X, ds // 2), persistent=False)
        self.register_buffer("pos_long", sine_position_encoding(Y, X, dl // 2), persistent=False)
        ys, xs = torch.meshgrid(torch.arange(Y), torch.arange(X), indexing="ij")
        self.register_buffer("ref", torch.stack([(xs + 0.5) / X, (ys + 0.5) / Y], -1).reshape(-1, 2).float(),
                             persistent=False)

    def forward(self, warped):                         # warped (B, T-1, vox_dim, Z, Y, X) in frame_order
        B, L, C, Z, Y, X = warped.shape
        bev = warped.reshape(B, L, C * Z, Y * X).transpose(2, 3)                # (B, L, Y*X, C*Z)
        v = self.proj_norm(self.proj(bev)) + self.frame_embeds[None, :L, None].to(bev.dtype)   # (B, L, Q, ds)
        ref, hw = self.ref.to(v.dtype), (Y, X)
        s = self.queries_short[None].expand(B, -1, -1).to(v.dtype)
        for layer in self.short:
            s = layer(s, self.pos_short.to(v.dtype), v[:, :1], ref, hw)
        vl = self.input_proj(v)
        lq = self.queries_long[None].expand(B, -1, -1).to(v.dtype)
        for layer in self.long:
            lq = layer(lq, self.pos_long.to(v.dtype), vl, ref, hw)
        x = torch.cat([s, lq], -1).transpose(1, 2).reshape(B, -1, Y, X)
        return self.output_norm(self.output_proj(x)).reshape(B, C, Z, Y, X)


# ----------------------------------------------------------------------------- 4. render fields and rendering
#
# A render field turns a volume (B, vox_dim, Z, Y, X) into colour and depth along rays. ``MIM4DConfig.field``
# picks one from FIELDS. A field class takes the config and implements
#   prepare(vol)                          -> a per-volume state (anything; computed once per render)
#   sdf(state, o, d, t)                   -> (B, R, S) signed distance at o + t d (called under no_grad, for
#                                            importance sampling)
#   render(state, o, d, t, inv_s)         -> rgb (B, R, 3), depth_sum (B, R) = sum_i w_i t_i, opacity (B, R) =
#                                            sum_i w_i (NeuS weights over the sorted samples t)
# with o, d (B, R, 3) LiDAR-frame metres (d unit), t (B, R, S) sorted metres inside the box, inv_s a scalar
# tensor. ``metric_to_unit`` maps positions to the volume's [-1, 1] frame (align_corners=True).


class VoxelField(nn.Module):
    """``field="voxel"``: the SDF/feature MLP runs once per voxel (1x1x1 convs, Softplus beta=100) before the
    fused renderer ``kernels.render_sdf`` (trilinear fetch, section-form NeuS alpha, composited features);
    an MLP on [rendered feature, view direction] -> RGB."""

    def __init__(self, cfg: MIM4DConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.field_hidden
        self.mlp = nn.Sequential(nn.Conv3d(cfg.vox_dim, h, 1), nn.Softplus(beta=100), nn.Conv3d(h, h, 1),
                                 nn.Softplus(beta=100), nn.Conv3d(h, 1 + cfg.render_feat, 1))
        self.rgb = nn.Sequential(nn.Linear(cfg.render_feat + 3, h), nn.ReLU(), nn.Linear(h, 3))

    def prepare(self, vol):
        return self.mlp(vol).float()                                            # (B, 1 + F, Z, Y, X)

    def sdf(self, state, o, d, t):
        B, R, S = t.shape
        p = metric_to_unit(self.cfg, o[..., None, :] + t[..., None] * d[..., None, :])
        return F.grid_sample(state[:, :1], p.reshape(B, 1, R, S, 3), align_corners=True)[:, 0, 0]

    def render(self, state, o, d, t, inv_s):
        feat, depth, opacity = kernels.render_sdf(state, metric_to_unit(self.cfg, o),   # trusted: sorted t, clamped
                                                  metric_to_unit(self.cfg, d, direction=True), t.contiguous(), inv_s,
                                                  validate=False)
        rgb = torch.sigmoid(self.rgb(torch.cat([feat, d], -1)))
        return rgb, depth, opacity


FIELDS = {"voxel": VoxelField}


# ----------------------------------------------------------------------------- 4b. the official per-sample field

class SampleDecoder(nn.Module):
    """UniPAD's decoder pattern: ``x = fc_p(p)``, then for every linear layer l ``x = lin_l(x + fc_c[l](c))``,
    with ``act`` between layers (not after the last). p (..., 3) positions, c (..., in_dim) conditioning."""

    def __init__(self, in_dim, out_dim, hidden, blocks, act):
        super().__init__()
        self.fc_p = nn.Linear(3, hidden)
        self.fc_c = nn.ModuleList(nn.Linear(in_dim, hidden) for _ in range(blocks + 1))
        self.lins = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(blocks)] + [nn.Linear(hidden, out_dim)])
        self.act = act

    def forward(self, p, c):
        x = self.fc_p(p)
        for i, (fc, lin) in enumerate(zip(self.fc_c, self.lins)):
            x = lin(x + fc(c))
            if i < len(self.lins) - 1:
                x = self.act(x)
        return x


class OfficialField(nn.Module):
    """``field="official"``: the UniPAD / MIM4D SDF field, evaluated per sample.

    Positions are LiDAR-frame metres times ``scale = 1 / max|pc_range|`` (the official scene normalization; SDF,
    sample spacing and normals are in these units). At each sample p the volume's features are fetched by
    ``kernels.trilinear`` (zero padding, align_corners=True); the SDF decoder (Softplus beta=100) maps
    (p, features) to the SDF and ``sample_geo`` geometry features; ``n = d sdf / d p`` comes from autograd with
    ``create_graph=True`` (so training differentiates through the sampler twice); NeuS alpha with the cos term
    ``cos = -relu(-<d, n>)`` (cos anneal ratio 1): the SDF at the section ends is ``sdf -+ cos * delta / 2``
    with ``delta_i = t_{i+1} - t_i`` (the last sample reuses the previous spacing: the head gives no bin end),
    ``alpha = clip((Phi(prev) - Phi(next) + 1e-5) / (Phi(prev) + 1e-5), 0, 1)``, ``Phi = sigmoid(inv_s *)``;
    weights ``w_i = alpha_i prod_{j<i} (1 - alpha_j + 1e-7)``; colour per sample from the RGB decoder (ReLU,
    sigmoid) on (p, [view dir, features, n, geometry]) composited with w over a black background. The NeuS math
    runs in fp32; the decoders follow autocast."""

    def __init__(self, cfg: MIM4DConfig):
        super().__init__()
        self.cfg = cfg
        self.scale = 1.0 / max(abs(v) for v in cfg.pc_range)
        h, g = cfg.sample_hidden, cfg.sample_geo
        self.sdf_net = SampleDecoder(cfg.vox_dim, 1 + g, h, cfg.sample_sdf_blocks, nn.Softplus(beta=100))
        self.rgb_net = SampleDecoder(3 + cfg.vox_dim + 3 + g, 3, h, cfg.sample_rgb_blocks, nn.ReLU())

    def prepare(self, vol):
        return vol

    def points(self, o, d, t):
        """Scaled sample positions (B, R*S, 3) for rays o, d (B, R, 3) (metres) at distances t (B, R, S)."""
        p = o[..., None, :] + t[..., None] * d[..., None, :]
        return (p * self.scale).flatten(1, 2)

    def sdf_and_features(self, vol, p):
        """p (B, M, 3) scaled positions -> sdf (B, M), geometry (B, M, geo), volume features (B, M, vox_dim)."""
        u = metric_to_unit(self.cfg, p.to(torch.promote_types(p.dtype, torch.float32)) / self.scale)
        feat = kernels.trilinear(vol, u)
        if not torch.is_autocast_enabled(feat.device.type):     # e.g. a bf16 volume read outside autocast
            feat = feat.to(self.sdf_net.fc_p.weight.dtype)
        h = self.sdf_net(p, feat)
        return h[..., 0], h[..., 1:], feat

    def sdf(self, state, o, d, t):
        return self.sdf_and_features(state, self.points(o, d, t))[0].reshape(t.shape)

    def render(self, state, o, d, t, inv_s):
        B, R, S = t.shape
        train = torch.is_grad_enabled()
        with torch.enable_grad():                      # normals need autograd, also under no_grad evaluation
            p = self.points(o, d, t).detach().requires_grad_(True)
            sdf, geo, feat = self.sdf_and_features(state, p)
            (n,) = torch.autograd.grad(sdf, p, torch.ones_like(sdf), create_graph=train)
        dirs = d[..., None, :].expand(B, R, S, 3).reshape(B, R * S, 3)
        with torch.set_grad_enabled(train):
            rgb = torch.sigmoid(self.rgb_net(p.detach(), torch.cat([dirs, feat, n, geo], -1)))
            with _no_autocast(t.device):               # NeuS weights in fp32 (fp64 if the rays are)
                acc = torch.promote_types(t.dtype, torch.float32)
                sdf, n, rgb = sdf.to(acc).reshape(B, R, S), n.to(acc).reshape(B, R, S, 3), rgb.to(acc)
                ts = t.to(acc) * self.scale
                delta = ts[..., 1:] - ts[..., :-1]
                delta = torch.cat([delta, delta[..., -1:]], -1)
                cos = -F.relu(-(d[..., None, :].to(acc) * n).sum(-1))
                phi_prev = torch.sigmoid((sdf - cos * delta * 0.5) * inv_s)
                phi_next = torch.sigmoid((sdf + cos * delta * 0.5) * inv_s)
                alpha = ((phi_prev - phi_next + 1e-5) / (phi_prev + 1e-5)).clamp(0.0, 1.0)
                trans = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1.0 - alpha + 1e-7], -1), -1)
                w = alpha * trans[..., :-1]
                rgb = (w[..., None] * rgb.reshape(B, R, S, 3)).sum(-2)
                return rgb, (w * ts / self.scale).sum(-1), w.sum(-1)


FIELDS["official"] = OfficialField


def ray_box(o, d):
    """Slab intersection of rays o + t d with the box [-1, 1]^3: (t_near, t_far); t_far < t_near = miss."""
    inv = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
    t0, t1 = (-1 - o) * inv, (1 - o) * inv
    return torch.minimum(t0, t1).amax(-1), torch.maximum(t0, t1).amin(-1)


@torch.no_grad()
def importance_samples(sdf, t, inv_s: float, n: int):
    """NeuS up-sampling: discrete NeuS weights of the coarse samples at a fixed sharpness, ``n`` new samples
    by inverse CDF of the section weights (mid-quantiles). sdf, t (B, R, S) -> sorted t (B, R, S + n)."""
    B, R, S = t.shape
    phi = torch.sigmoid(sdf * inv_s)
    alpha = ((phi[..., :-1] - phi[..., 1:] + 1e-5) / (phi[..., :-1] + 1e-5)).clamp(0, 1)
    T = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1 - alpha + 1e-7], -1), -1)[..., :-1]
    w = alpha * T + 1e-5                                                        # (B, R, S-1)
    cdf = torch.cat([torch.zeros_like(w[..., :1]), (w / w.sum(-1, keepdim=True)).cumsum(-1)], -1)
    u = (torch.arange(n, device=t.device, dtype=t.dtype) + 0.5) / n
    idx = torch.searchsorted(cdf.contiguous(), u.expand(B, R, n).contiguous(), right=True).clamp(1, S - 1)
    c0, c1 = cdf.gather(-1, idx - 1), cdf.gather(-1, idx)
    t0, t1 = t.gather(-1, idx - 1), t.gather(-1, idx)
    frac = ((u - c0) / (c1 - c0).clamp_min(1e-8)).clamp(0, 1)
    return torch.sort(torch.cat([t, t0 + frac * (t1 - t0)], -1), -1).values


class RenderHead(nn.Module):
    """Ray/box intersection, stratified + importance samples, the render field, NeuS sharpness."""

    def __init__(self, cfg: MIM4DConfig):
        super().__init__()
        if cfg.field not in FIELDS:
            raise ValueError(f"field: unknown render field {cfg.field!r}, expected one of {sorted(FIELDS)}")
        self.cfg = cfg
        self.field = FIELDS[cfg.field](cfg)
        self.variance = nn.Parameter(torch.tensor(float(cfg.variance_init)))

    def inv_s(self):
        """NeuS sharpness exp(10 * variance), clamped to INV_S_RANGE (never 0 or inf)."""
        lo, hi = math.log(INV_S_RANGE[0]), math.log(INV_S_RANGE[1])
        return torch.exp((10 * self.variance.float()).clamp(lo, hi))

    def forward(self, vol, o, d, perturb: bool) -> Render:
        """vol (B, vox_dim, Z, Y, X); rays in LiDAR-frame metres: o, d (B, R, 3), d unit."""
        cfg = self.cfg
        state = self.field.prepare(vol)
        with _no_autocast(o.device):
            o, d = o.float(), d.float()
            near, far = ray_box(metric_to_unit(cfg, o), metric_to_unit(cfg, d, direction=True))   # metres
            near = near.clamp_min(cfg.near_min)
            hit = far > near + 1e-3
            far = torch.where(hit, far, near + 1e-2)
            S = cfg.num_uniform
            u = (torch.arange(S, device=o.device, dtype=o.dtype) + 0.5) / S
            if perturb:                                                         # stratified: one jitter per ray
                u = u + (torch.rand(*o.shape[:2], 1, device=o.device) - 0.5) / S
            t = near[..., None] + (far - near)[..., None] * u
            if cfg.num_importance > 0:
                with torch.no_grad():
                    sdf = self.field.sdf(state, o, d, t).float()
                t = importance_samples(sdf, t, cfg.coarse_inv_s, cfg.num_importance)
        rgb, depth, opacity = self.field.render(state, o, d, t, self.inv_s())
        depth = torch.minimum(torch.maximum(depth.float() / (opacity.float() + 1e-10), t[..., 0]), t[..., -1])
        return Render(rgb.float(), depth, opacity.float(), hit)


def sample_rays(cfg: MIM4DConfig, depths, K, cam2ego, lidar2ego, num: int | None = None) -> Rays:
    """Rays through pixels of one frame's cameras. depths (B, N, 1, H, W) camera z-depth (0 = none).
    A pixel has ground truth (``valid``) when its surface point lies in the volume box, beyond ``near_min``
    along the ray and ``ray_radius`` from the LiDAR in xy. ``num`` rays per camera: valid pixels first, in
    random order (global RNG); None: every pixel in raster order (renders of whole images)."""
    B, N, _, H, W = depths.shape
    dev = depths.device
    with _no_autocast(dev):
        v, u = torch.meshgrid(torch.arange(H, device=dev) + 0.5, torch.arange(W, device=dev) + 0.5, indexing="ij")
        pix_h = torch.stack([u, v, torch.ones_like(u)], -1).reshape(-1, 3)      # (H*W, 3) pixel centres
        d_cam = pix_h @ torch.linalg.inv(K.float()).transpose(-1, -2)          # (B, N, H*W, 3), z = 1
        z = depths[:, :, 0].flatten(2).float()                                  # (B, N, H*W)
        cam2lidar = torch.linalg.inv(lidar2ego.float())[:, None] @ cam2ego.float()
        d_l = d_cam @ cam2lidar[..., :3, :3].transpose(-1, -2)
        o_l = cam2lidar[..., :3, 3]                                             # (B, N, 3)
        surf = o_l[:, :, None] + z[..., None] * d_l                            # LiDAR-frame surface point
        gt = z * d_cam.norm(dim=-1)                                             # Euclidean distance along the ray
        r_xy = surf[..., :2].norm(dim=-1)
        valid = ((z > 0) & (gt > cfg.near_min) & in_volume(cfg, surf) & (r_xy > cfg.ray_radius[0])
                 & (r_xy < cfg.ray_radius[1]))
        if num is None:
            pix = torch.arange(H * W, device=dev).expand(B, N, -1)
        else:
            score = torch.rand(B, N, H * W, device=dev) + valid.float()
            pix = score.topk(min(num, H * W), dim=-1).indices
        d = F.normalize(d_l.gather(2, pix[..., None].expand(-1, -1, -1, 3)), dim=-1)
        o = o_l[:, :, None].expand_as(d)
        flat = pix + (torch.arange(N, device=dev) * H * W)[None, :, None]
        return Rays(o.flatten(1, 2), d.flatten(1, 2), flat.flatten(1), gt.gather(-1, pix).flatten(1),
                    valid.gather(-1, pix).flatten(1))


# ----------------------------------------------------------------------------- the model

class MIM4D(nn.Module):
    """Front door: ``loss, out = model(batch)`` for training (``model.train()``) and evaluation (``model.eval()``
    under ``torch.no_grad()``). Named stages: ``random_masking`` -> ``encode_frames`` -> ``predict_frame`` ->
    ``sample_rays`` -> ``render`` -> ``forward_loss``."""

    def __init__(self, cfg: MIM4DConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = MaskedConvNeXt(cfg)
        self.fpn = FPN(cfg)
        self.input_proj = nn.Conv2d(cfg.fpn_dim, cfg.fpn_dim, 1)
        self.depth_net = nn.Conv2d(cfg.fpn_dim, cfg.depth_bins, 1)             # shared by the 4 levels
        self.to_vox = nn.Sequential(nn.Conv3d(cfg.fpn_dim, cfg.vox_dim, 3, padding=1), nn.GroupNorm(4, cfg.vox_dim),
                                    nn.ReLU())
        self.decoder = DroppedFrameDecoder(cfg)
        self.render_head = RenderHead(cfg)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    # -- 1. masking (SparK): 1 = visible patch, per image independently (global RNG)
    def random_masking(self, n_images, hw, device=None):
        Hp, Wp = -(-hw[0] // 32), -(-hw[1] // 32)
        Hp, Wp = Hp * 32 // self.cfg.mask_patch, Wp * 32 // self.cfg.mask_patch
        L = Hp * Wp
        n_mask = int(round(self.cfg.mask_ratio * L))
        noise = torch.rand(n_images, L, device=device)
        keep = torch.ones(n_images, L, device=device)
        keep.scatter_(1, noise.argsort(1)[:, :n_mask], 0.0)
        return keep.reshape(n_images, 1, Hp, Wp)

    @staticmethod
    def _pad(images):                                  # pad bottom/right to a multiple of 32 (K unchanged)
        H, W = images.shape[-2:]
        ph, pw = -H % 32, -W % 32
        return F.pad(images, (0, pw, 0, ph)), (H + ph, W + pw)

    def image_features(self, x, keep):
        """Normalized, padded images (M, 3, H, W) -> per level (M, fpn_dim, h, w) features and depth probs."""
        maps = [self.input_proj(m) for m in self.fpn(self.backbone(x, keep))]
        return maps, [self.depth_net(m).softmax(1) for m in maps]

    # -- 2. per-frame volumes
    def encode_frames(self, images, K, cam2ego, lidar2ego, keep=None):
        """images (B, T, N, 3, H, W) in [0, 1] -> per-frame volumes (B, T, vox_dim, Z, Y, X) in the LiDAR frame.
        ``keep`` (B*T*N, 1, H/p, W/p) patch masks in the images' order (None = no masking)."""
        B, T, N = images.shape[:3]
        x, hw = self._pad((images.flatten(0, 2) - self.mean) / self.std)
        if keep is None:
            keep = torch.ones(x.shape[0], 1, hw[0] // 32, hw[1] // 32, device=x.device, dtype=x.dtype)
        maps, probs = self.image_features(x, keep.to(x.dtype))
        K_ = K[:, None].expand(B, T, N, 3, 3).reshape(B * T, N, 3, 3)
        c_ = cam2ego[:, None].expand(B, T, N, 4, 4).reshape(B * T, N, 4, 4)
        l_ = lidar2ego[:, None].expand(B, T, 4, 4).reshape(B * T, 4, 4)
        lifted = lift_to_voxels(self.cfg, maps, probs, K_, c_, l_, hw)
        if lifted.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # oneDNN's bf16 3x3x3 Conv3d returns a NaN weight gradient for depth-2 volumes (torch 2.13, CPU):
            # this conv runs in fp32 under CPU autocast
            with torch.autocast("cpu", enabled=False):
                vol = self.to_vox(lifted.float())
        else:
            vol = self.to_vox(lifted)
        return vol.reshape(B, T, *vol.shape[1:])

    # -- 3. dropped-frame prediction (model frame order: 0 = newest)
    @staticmethod
    def frame_motion(ego2world, lidar2ego, src: int, tgt: int):
        """(B, 4, 4) map from frame ``src``'s LiDAR frame to frame ``tgt``'s. ego2world (B, T, 4, 4)."""
        with _no_autocast(ego2world.device):
            l2e = lidar2ego.float()
            return (torch.linalg.inv(l2e) @ torch.linalg.inv(ego2world[:, tgt].float()) @ ego2world[:, src].float()
                    @ l2e)

    def predict_frame(self, vols, ego2world, lidar2ego, target: int):
        """Warp the other frames into ``target``'s LiDAR frame (``frame_order``) and decode its volume.
        vols (B, T, C, Z, Y, X), ego2world (B, T, 4, 4) in model frame order. Returns (prediction, warp-only
        baseline = the ``nearest_frame`` warped)."""
        T = vols.shape[1]
        warp = lambda j: warp_volume(self.cfg, vols[:, j], self.frame_motion(ego2world, lidar2ego, j, target))  # noqa: E731
        others = frame_order(T, target)
        warped = [warp(j) for j in others]
        base = warped[others.index(nearest_frame(T, target))]
        return self.decoder(torch.stack(warped, 1)), base

    # -- 4. rays and rendering
    def sample_rays(self, depths, K, cam2ego, lidar2ego, num: int | None = None) -> Rays:
        """``sample_rays`` (module function) with this model's config."""
        return sample_rays(self.cfg, depths, K, cam2ego, lidar2ego, num)

    def render(self, vol, rays: Rays, perturb: bool = False, chunk: int = 8192) -> Render:
        """Render a volume (B, vox_dim, Z, Y, X) along ``rays``; outside training in chunks of ``chunk`` rays."""
        R = rays.origins.shape[1]
        if self.training or R <= chunk:
            return self.render_head(vol, rays.origins, rays.dirs, perturb)
        parts = [self.render_head(vol, rays.origins[:, a:a + chunk], rays.dirs[:, a:a + chunk], perturb)
                 for a in range(0, R, chunk)]
        return Render(*(torch.cat(x, 1) for x in zip(*parts)))

    @staticmethod
    def gather_pixels(images_t, pixels):
        """images_t (B, N, 3, H, W), pixels (B, R) flat into (N*H*W) -> colours (B, R, 3)."""
        flat = images_t.permute(0, 1, 3, 4, 2).reshape(images_t.shape[0], -1, 3)
        return flat.gather(1, pixels[..., None].expand(-1, -1, 3))

    def forward_loss(self, ren: Render, rays: Rays, rgb_gt):
        """Per-sample ``rgb_weight`` L1(rgb) and ``depth_weight`` L1(depth, scene-scaled) over rays with ground
        truth that cross the box -> two (B,) tensors."""
        cfg = self.cfg
        m = (rays.valid & ren.hit).float()
        den = m.sum(1).clamp_min(1.0)
        scale = 1.0 / max(abs(v) for v in cfg.pc_range)                         # UniPAD scene scale
        l_rgb = ((ren.rgb - rgb_gt.float()).abs().mean(-1) * m).sum(1) / den
        l_depth = ((ren.depth - rays.depth).abs() * scale * m).sum(1) / den
        return cfg.rgb_weight * l_rgb, cfg.depth_weight * l_depth

    def forward(self, batch: dict):
        """batch: images (B, T, N, 3, H, W) in [0, 1], depths (B, T, N, 1, H, W) z-depth, K (B, N, 3, 3),
        cam2ego (B, N, 4, 4), ego2world (B, T, 4, 4), lidar2ego (B, 4, 4); frames in time order (oldest first).
        Optional: ``targets`` (list of batch frame indices to reconstruct; default: training the newest frame
        and one random other, evaluation every frame), ``keep`` (patch masks, see ``encode_frames``; default:
        random while training, none in evaluation), ``rays`` (a Rays per target; default ``sample_rays``).
        Returns (loss, out): out["terms"] the four mean loss terms; out["per_sample"] (B,); out["targets"] the
        batch frame indices rendered; out["rays"], out["rgb_gt"] per target; out["renders"][name] per target a
        Render for name in pred (decoded from the other frames), direct (the frame's own volume) and, outside
        training, warp (the warp-only baseline)."""
        missing = [k for k in ("images", "depths", "K", "cam2ego", "ego2world", "lidar2ego") if k not in batch]
        if missing:
            raise ValueError(f"batch: missing keys {missing}")
        images, depths, K, cam2ego = batch["images"], batch["depths"], batch["K"], batch["cam2ego"]
        lidar2ego = batch["lidar2ego"]
        B, T, N = images.shape[:3]
        keep = batch.get("keep")
        if keep is None and self.training:
            keep = self.random_masking(B * T * N, images.shape[-2:], images.device)
        vols = self.encode_frames(images, K, cam2ego, lidar2ego, keep).flip(1)   # model order: newest first
        e2w = batch["ego2world"].flip(1)
        targets = batch.get("targets")
        if targets is None:
            targets = ([T - 1, T - 1 - int(torch.randint(1, T, (1,)).item())] if self.training and T > 1
                       else list(range(T - 1, -1, -1)))
        names = ("pred", "direct") if self.training else ("pred", "direct", "warp")
        terms = {f"{q}_{n}": 0.0 for n in ("pred", "direct") for q in ("rgb", "depth")}
        out = {"targets": list(targets), "rays": [], "rgb_gt": [], "renders": {n: [] for n in names}}
        for i, tb in enumerate(targets):
            tgt = T - 1 - tb                                                    # model frame index
            r = batch["rays"][i] if batch.get("rays") is not None else \
                self.sample_rays(depths[:, tb], K, cam2ego, lidar2ego, self.cfg.rays_per_cam)
            rgb_gt = self.gather_pixels(images[:, tb], r.pixels)
            pred, base = self.predict_frame(vols, e2w, lidar2ego, tgt) if T > 1 else (vols[:, tgt], vols[:, tgt])
            for name, vol in zip(names, (pred, vols[:, tgt], base)):
                ren = self.render(vol, r, perturb=self.training)
                out["renders"][name].append(ren)
                if name != "warp":
                    l_rgb, l_depth = self.forward_loss(ren, r, rgb_gt)
                    terms[f"rgb_{name}"] = terms[f"rgb_{name}"] + l_rgb / len(targets)
                    terms[f"depth_{name}"] = terms[f"depth_{name}"] + l_depth / len(targets)
            out["rays"].append(r)
            out["rgb_gt"].append(rgb_gt)
        per_sample = sum(terms.values())
        out["per_sample"] = per_sample
        out["terms"] = {n: v.mean().detach() for n, v in terms.items()}
        return per_sample.mean(), out

    @torch.no_grad()
    def extract_features(self, images, K, cam2ego, lidar2ego):
        """Unmasked per-frame voxel features (B, T, vox_dim, Z, Y, X) and BEV maps (B, T, vox_dim*Z, Y, X),
        frames in the batch's (time) order."""
        vols = self.encode_frames(images, K, cam2ego, lidar2ego, keep=None)
        return vols, vols.flatten(2, 3)

    # -- optimizer, checkpoints, weights
    def configure_optimizer(self, lr: float, weight_decay: float = 0.01, betas=(0.9, 0.999),
                            backbone_lr_mult: float = 0.1, fused: bool | None = None, **kw):
        """AdamW with the image backbone at ``backbone_lr_mult`` x lr (each group carries ``lr_mult``) and no
        weight decay on 1-D parameters, BEV queries and frame embeddings (all decayed with
        ``official_decay_all``). Frozen parameters are left out. ``fused`` defaults to True where supported."""
        groups = {}
        for n, p in self.named_parameters():
            if not p.requires_grad:
                continue
            mult = backbone_lr_mult if n.startswith("backbone.") else 1.0
            decay = self.cfg.official_decay_all or not (p.ndim < 2 or "queries" in n or "frame_embeds" in n)
            g = groups.setdefault((mult, decay), {"params": [], "lr": lr * mult, "lr_mult": mult,
                                                  "weight_decay": weight_decay if decay else 0.0})
            g["params"].append(p)
        if fused is None:
            devs = {p.device.type for g in groups.values() for p in g["params"]}
            fused = devs <= {"cpu", "cuda"} and all(p.dtype.is_floating_point for g in groups.values() for p in g["params"])
        return torch.optim.AdamW(list(groups.values()), lr=lr, betas=betas, fused=fused, **kw)

    @classmethod
    def from_checkpoint(cls, path: str, map_location="cpu", ema: bool = False) -> "MIM4D":
        """Rebuild a model from ``RUN_DIR`` or ``RUN_DIR/model.safetensors`` (weights + the ``config`` metadata,
        tuple fields restored as tuples). ``ema``: a run directory's EMA weights (``RUN_DIR/ema.safetensors``,
        written by the training script in the same format)."""
        if os.path.isdir(path):
            path = os.path.join(path, "ema.safetensors" if ema else "model.safetensors")
        tensors, meta = read_safetensors(path)
        try:
            model_cfg = json.loads(meta["config"])["model"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: no model config in the safetensors metadata ({e!r})") from None
        model = cls(config_from_dict(model_cfg))
        model.load_state_dict(tensors)
        return model.to(map_location)

    def load_imagenet_convnext(self, state_dict: dict) -> "MIM4D":
        """Load ImageNet ConvNeXt weights into the backbone, from the facebookresearch/ConvNeXt layout
        (``downsample_layers.*``, ``stages.i.j.dwconv``, ...; the official config's ``convnext*_official_style``
        file) or the timm layout (``stem.*``, ``stages.i.downsample.*``, ``stages.i.blocks.j.conv_dw``, ...).
        The classifier (``norm``, ``head``) is ignored and the output norms ``norm{i}`` keep their init.
        Raises ValueError naming the first missing, unexpected or mis-shaped key."""
        sd = _unwrap_state_dict(state_dict)
        timm = any(k.startswith("stem.") for k in sd)
        if not timm and not any(k.startswith("downsample_layers.") for k in sd):
            raise ValueError("state_dict: neither the facebookresearch ConvNeXt layout (downsample_layers.*) nor "
                             "the timm layout (stem.*)")

        def src(name):                                 # our backbone key -> the checkpoint's key
            if not timm:
                return name
            parts = name.split(".")
            if parts[0] == "downsample_layers":
                i, k = int(parts[1]), parts[2]
                base = f"stem.{k}" if i == 0 else f"stages.{i}.downsample.{k}"
                return ".".join([base] + parts[3:])
            i, j, rest = parts[1], parts[2], parts[3:]
            sub = {"dwconv": "conv_dw", "norm": "norm", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2"}
            rest = [sub[rest[0]]] + rest[1:] if rest[0] in sub else rest
            return ".".join([f"stages.{i}.blocks.{j}"] + rest)
        pairs = [(f"backbone.{n}", src(n)) for n in self.backbone.state_dict() if not n.startswith("norm")]
        _copy_weights(self, sd, pairs, ignore=("norm.", "head.", "norm_pre."))
        return self

    def load_official_backbone(self, state_dict: dict, ema: bool = False) -> "MIM4D":
        """Load the image backbone, FPN, ``input_proj`` and depth head from a released MIM4D pretrain checkpoint
        (mmdet3d key names ``img_backbone.*``, ``img_neck.lateral_convs.i.conv.*``, ``img_neck.fpn_convs.i.conv.*``,
        ``input_proj.*``, ``depth_net.*``; a ``{"state_dict": ...}`` wrapper is accepted). ``ema``: read mmcv
        EMAHook's averaged copies (``ema_<name with . -> _>``) instead. Other parts of the checkpoint (and the
        unused stage-0 output norm ``img_backbone.norm0``) are ignored.
        Raises ValueError naming the first missing, unexpected or mis-shaped key."""
        sd = _unwrap_state_dict(state_dict)

        def src(name):
            if name.startswith("backbone."):
                s = "img_backbone." + name[len("backbone."):]
            elif name.startswith("fpn."):
                _, kind, i, leaf = name.split(".")
                s = f"img_neck.{kind}.{i}.conv.{leaf}"
            else:
                s = name
            return "ema_" + s.replace(".", "_") if ema else s
        names = [n for n in self.state_dict() if n.split(".")[0] in ("backbone", "fpn", "input_proj", "depth_net")]
        pairs = [(n, src(n)) for n in names]
        prefixes = ("ema_img_backbone_", "ema_img_neck_", "ema_input_proj_", "ema_depth_net_") if ema else \
            ("img_backbone.", "img_neck.", "input_proj.", "depth_net.")
        norm0 = ("ema_img_backbone_norm0_", "img_backbone.norm0.")   # stage 0's output norm: unused (start level 1)
        unused = tuple(k for k in sd if not k.startswith(prefixes) or k.startswith(norm0))
        _copy_weights(self, sd, pairs, ignore=unused)
        return self


def _unwrap_state_dict(state_dict):
    for key in ("state_dict", "model"):
        if isinstance(state_dict, dict) and key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    if not isinstance(state_dict, dict):
        raise ValueError(f"state_dict: expected a dict of tensors, got {type(state_dict).__name__}")
    return {k[7:] if k.startswith("module.") else k: v for k, v in state_dict.items()}


@torch.no_grad()
def _copy_weights(model: nn.Module, sd: dict, pairs, ignore=()):
    """Copy sd[src] into the model's tensor ``dst`` for (dst, src) in pairs, after checking every key: missing,
    mis-shaped, and keys of sd neither consumed nor starting with a prefix in ``ignore`` raise ValueError."""
    own = model.state_dict()
    for dst, s in pairs:
        if s not in sd:
            raise ValueError(f"state_dict: missing key {s!r} (for {dst})")
        if tuple(sd[s].shape) != tuple(own[dst].shape):
            raise ValueError(f"state_dict: {s!r} has shape {tuple(sd[s].shape)}, expected {tuple(own[dst].shape)} "
                             f"(for {dst})")
    used = {s for _, s in pairs}
    for k in sd:
        if k not in used and not k.startswith(tuple(ignore)):
            raise ValueError(f"state_dict: unexpected key {k!r}")
    for dst, s in pairs:
        own[dst].copy_(sd[s].to(own[dst].dtype))


def config_from_dict(d: dict) -> MIM4DConfig:
    """MIM4DConfig from a JSON dict: lists become tuples where the field is a tuple; unknown keys raise."""
    known = {f.name: f for f in dc_fields(MIM4DConfig)}
    bad = sorted(set(d) - set(known))
    if bad:
        raise ValueError(f"config: unknown MIM4DConfig fields {bad}")
    kw = {k: tuple(v) if isinstance(known[k].default, tuple) and isinstance(v, list) else v for k, v in d.items()}
    return MIM4DConfig(**kw)


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path: str):
    """Minimal safetensors reader -> (dict of CPU tensors, metadata dict): 8-byte little-endian header length,
    a JSON header of {name: {dtype, shape, data_offsets}} (+ ``__metadata__``), then the raw data."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read the weights file ({e.strerror})") from None
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        meta = header.pop("__metadata__", {}) or {}
        data = memoryview(raw)[8 + n:]
        out = {}
        for name, info in header.items():
            a, b = info["data_offsets"]
            if not 0 <= a <= b <= len(data):
                raise ValueError(f"tensor {name!r} lies outside the file")
            dt = _ST_DTYPES[info["dtype"]]
            t = torch.frombuffer(bytearray(data[a:b]), dtype=dt) if b > a else torch.empty(0, dtype=dt)
            out[name] = t.reshape(info["shape"])
    except (struct.error, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e}); re-save the checkpoint") from None
    return out, meta


# ----------------------------------------------------------------------------- EMA of the weights

class EMA:
    """Exponential moving average of a model's floating-point state (parameters and persistent buffers), as
    BEVDepth's ``ModelEMA``: after update t, ema = d ema + (1 - d) w with d = decay * (1 - exp(-t / ramp))
    (``ramp=0``: d = decay). ``state_dict``/``load_state_dict`` round-trip it; ``shadow`` holds the averaged
    tensors under the model's state-dict names (what a script saves beside the weights)."""

    def __init__(self, model: nn.Module, decay: float = 0.999, ramp: float = 2000.0):
        self.decay, self.ramp, self.updates = float(decay), float(ramp), 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()
                       if v.dtype.is_floating_point}

    def rate(self) -> float:
        return self.decay * (1 - math.exp(-self.updates / self.ramp)) if self.ramp > 0 else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.updates += 1
        d = self.rate()
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)

    @torch.no_grad()
    def copy_to(self, model: nn.Module):
        """Write the averaged weights into ``model`` (e.g. a copy used for evaluation)."""
        own = model.state_dict()
        for k, v in self.shadow.items():
            own[k].copy_(v.to(own[k].dtype))

    def averaged(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` holding the averaged weights."""
        m = copy.deepcopy(model)
        self.copy_to(m)
        return m

    def state_dict(self) -> dict:
        return {"decay": self.decay, "ramp": self.ramp, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict):
        missing = sorted(set(self.shadow) - set(state["shadow"]))
        if missing:
            raise ValueError(f"EMA state: missing tensors {missing[:3]}")
        self.decay, self.ramp, self.updates = float(state["decay"]), float(state["ramp"]), int(state["updates"])
        for k in self.shadow:
            self.shadow[k].copy_(state["shadow"][k])
