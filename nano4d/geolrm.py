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

Differences from the official code (alibaba-yuanjing-aigclab/GeoLRM), each fixed by default; the original
behaviour is one config flag away so that official weights can be ported exactly:
- ``official_keep_padding``: padding tokens sit at xyz = 0, take part in attention and become Gaussians.
  Here they get segment id -1 (no attention in or out) and opacity 0.
- ``official_residual_on_normed_query``: the official cross-attention adds its output to its own *normalized*
  query (stream = RMSNorm(h) + attn); here it is added to the residual stream (h + attn).
- ``official_rope_inference_scale``: official inference computes RoPE voxel indices with xyz_scale 1.0
  instead of training's 0.5 (index spacing halves). Here positions are the same integer cell index always.
- ``official_cell_positions``: official anchors sit at linspace(-0.5, 0.5, R) while the occupancy ground truth
  is binned as round((p + 0.5) R) - half a cell apart. Here cell i is centred at -0.5 + (i + 0.5) / R,
  matching a ground truth binned as floor((p + 0.5) R) (what ``nano4d.data`` produces).
- ``official_positive_offsets``: official offsets are sigmoid * offset_max (positive only); here tanh.
- ``official_color_clamp``: official colour is clamp(x, -0.5, 0.5) + 0.5 (zero gradient outside); here sigmoid.
- Invisible views (anchor behind the camera or outside the image) get zero weight in the view fusion; the
  official code has no visibility mask. Attention dropout (0.1 in the official proposal net) is not used.
  Sampling runs in fp32 under autocast (as the official mmcv op). Plucker rays use unit directions in OpenCV
  axes (official: OpenGL axes, un-normalized d), so a ported low-level conv sees different ray channels.

Conventions: c2w (B, V, 4, 4) OpenCV axes, K (B, V, 3, 3) in pixels of the image it belongs to, pixel centres at
+0.5, quaternions (w, x, y, z), voxel grids (B, Z, Y, X) over [-0.5, 0.5]^3.
Shape legend: B batch, V views, N tokens, C channels, H heads, D head dim, S feature tokens per view,
L levels (2), P sampling points, R occupancy resolution, G proposal grid, u = R / G.
This file imports only torch, ``kernels`` and the standard library.
"""
from __future__ import annotations

import dataclasses
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels


@dataclasses.dataclass
class GeoLRMConfig:
    # image encoder (DINOv2 layout; paper: dinov2-base at 448 px)
    img_size: int = 448
    patch_size: int = 14
    enc_dim: int = 768
    enc_depth: int = 12
    enc_heads: int = 12
    enc_mlp_ratio: float = 4.0
    enc_pos_grid: int = 37              # learned position-embedding grid (DINOv2: 518 / 14)
    enc_layerscale: float = 1.0
    feat_dim: int = 384                 # channels of both feature levels
    # occupancy / proposal network
    occ_res: int = 128                  # R: occupancy cells per axis over [-0.5, 0.5]^3
    prop_grid: int = 16                 # G: proposal tokens per axis (each unfolds to (R/G)^3 cells)
    prop_dim: int = 384
    prop_depth: int = 6
    prop_heads: int = 16
    # reconstruction network
    dim: int = 768
    depth: int = 16
    heads: int = 16
    max_tokens: int = 4096              # anchors per object in training
    max_tokens_infer: int = 8192        # ... and at inference
    gaussians_per_token: int = 32
    offset_max: float = 0.2
    scale_max: float = 0.02
    # geometry-aware blocks
    n_points: int = 8                   # deformable sampling points per head and level
    offset_init: float = 1.0            # initial spacing of the sampling points, in feature-map pixels
    ffn_multiple_of: int = 256
    rope_base: float = 10000.0
    grad_checkpoint: bool = False
    # loss weights (reconstruction stage; proposal: BCE + affinity)
    w_rgb: float = 1.0
    w_lpips: float = 2.0
    w_alpha: float = 1.0
    w_depth: float = 0.2
    w_tv: float = 0.05
    # the official code's behaviour (see module docstring)
    official_keep_padding: bool = False
    official_residual_on_normed_query: bool = False
    official_rope_inference_scale: bool = False
    official_cell_positions: bool = False
    official_positive_offsets: bool = False
    official_color_clamp: bool = False


PRESETS = {
    # CPU preset: 32 px inputs in 8 px patches, 16^3 occupancy from 4^3 tokens, 192 anchors x 4 Gaussians
    "tiny": GeoLRMConfig(img_size=32, patch_size=8, enc_dim=96, enc_depth=2, enc_heads=2, enc_pos_grid=4,
                         feat_dim=48, occ_res=16, prop_grid=4, prop_dim=48, prop_depth=2, prop_heads=2,
                         dim=96, depth=3, heads=4, max_tokens=192, max_tokens_infer=384,
                         gaussians_per_token=4, offset_max=0.08, scale_max=0.06, n_points=4, ffn_multiple_of=32,
                         offset_init=0.25),  # 8x8 maps: keep the initial sampling spread local, as on 64-112 px maps
    "paper": GeoLRMConfig(),
}

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ============================================================================ cameras and positions


def invert_rigid(T: torch.Tensor) -> torch.Tensor:
    """(..., 4, 4) c2w <-> w2c for rotation + translation."""
    R, t = T[..., :3, :3], T[..., :3, 3:]
    out = torch.zeros_like(T)
    out[..., :3, :3] = R.transpose(-1, -2)
    out[..., :3, 3:] = -R.transpose(-1, -2) @ t
    out[..., 3, 3] = 1.0
    return out


def plucker_rays(c2w: torch.Tensor, K: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Per-pixel (d, o x d), unit d: c2w, K (B, V, ...) -> (B, V, 6, H, W)."""
    v, u = torch.meshgrid(torch.arange(H, device=K.device, dtype=K.dtype) + 0.5,
                          torch.arange(W, device=K.device, dtype=K.dtype) + 0.5, indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], -1)                                  # (H, W, 3)
    d_cam = pix @ torch.linalg.inv(K).transpose(-1, -2)[..., None, :, :]              # (B, V, H, W, 3)
    d = F.normalize(d_cam @ c2w[..., None, :3, :3].transpose(-1, -2), dim=-1)
    o = c2w[..., None, None, :3, 3].expand_as(d)
    return torch.cat([d, torch.linalg.cross(o, d, dim=-1)], -1).movedim(-1, -3)


def project_anchors(xyz: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, H: int, W: int, near: float = 1e-3):
    """Anchors (B, N, 3) into every view -> ref (B, V, N, 2) in [0, 1] image fractions (x, y) and
    visible (B, V, N): in front of the camera and inside the image."""
    w2c = invert_rigid(c2w)
    cam = xyz[:, None] @ w2c[..., :3, :3].transpose(-1, -2) + w2c[..., None, :3, 3]    # (B, V, N, 3)
    z = cam[..., 2]
    uv = (cam @ K.transpose(-1, -2))[..., :2] / z.clamp_min(near)[..., None]          # pixels
    ref = uv / torch.tensor([W, H], dtype=uv.dtype, device=uv.device)
    visible = (z > near) & (ref >= 0).all(-1) & (ref <= 1).all(-1)
    return ref, visible


def cell_centers(n: int, official: bool = False, device=None) -> torch.Tensor:
    """Centres of n cells along one axis of [-0.5, 0.5] (official: linspace(-0.5, 0.5, n))."""
    if official:
        return torch.linspace(-0.5, 0.5, n, device=device)
    return -0.5 + (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n


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
    feats (B*V, S, feat_dim), shapes (2, 2) [(h/4, w/4) low-level, (2h/p, 2w/p) high-level], starts (2,)."""

    def __init__(self, cfg: GeoLRMConfig):
        super().__init__()
        E, p = cfg.enc_dim, cfg.patch_size
        self.patch = p
        self.patch_embed = nn.Conv2d(3, E, p, p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, E))
        self.register_buffer("mask_token", torch.zeros(1, E))                        # HF layout; unused
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + cfg.enc_pos_grid ** 2, E) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(E, cfg.enc_heads, cfg.enc_mlp_ratio, cfg.enc_layerscale)
                                    for _ in range(cfg.enc_depth))
        self.norm = nn.LayerNorm(E, eps=1e-6)
        self.up = nn.ConvTranspose2d(E, cfg.feat_dim, 4, 2, 1)                        # high level: x2
        self.up_bn = nn.BatchNorm2d(cfg.feat_dim)
        self.low = nn.Conv2d(9, cfg.feat_dim, 4, 4)                                   # low level: RGB + Plucker
        self.low_bn = nn.BatchNorm2d(cfg.feat_dim)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """Learned position embedding, bicubically interpolated from its grid to h x w patches (HF's
        Dinov2 nudges the scale factor by 0.1/grid, so values differ slightly at non-native sizes)."""
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        g = int(math.isqrt(grid.shape[1]))
        if (g, g) != (h, w):
            grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False)
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
        rays = plucker_rays(c2w, K, Hi, Wi).flatten(0, 1).to(x.dtype)                # (BV, 6, Hi, Wi)
        low = self.low_bn(self.low(torch.cat([x, rays], 1)))                          # (BV, F, Hi/4, Wi/4)
        shapes = torch.tensor([low.shape[-2:], high.shape[-2:]], dtype=torch.int64, device=x.device)
        starts = torch.tensor([0, low.shape[-2] * low.shape[-1]], dtype=torch.int64, device=x.device)
        feats = torch.cat([low.flatten(2), high.flatten(2)], 2).transpose(1, 2)       # (BV, S, F)
        return feats, shapes, starts


_HF_RULES = [  # Hugging Face Dinov2Model key -> ImageEncoder key
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.mask_token", "mask_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.\1"),
    (r"encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.query\.(weight|bias)", r"blocks.\1.q.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.key\.(weight|bias)", r"blocks.\1.k.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.value\.(weight|bias)", r"blocks.\1.v.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2"),
    (r"encoder\.layer\.(\d+)\.mlp\.fc([12])\.(weight|bias)", r"blocks.\1.fc\2.\3"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]


def load_dinov2_hf(encoder: ImageEncoder, state_dict: dict) -> list:
    """Copy a Hugging Face ``facebook/dinov2-{small,base,large}`` state dict (``model.safetensors`` of
    ``Dinov2Model``; an optional ``dinov2.`` prefix is stripped) into ``encoder``'s ViT. The ConvT/conv
    heads stay as they are. Raises ValueError on unknown keys, missing ViT keys or shape mismatches;
    returns the list of encoder keys that were loaded. (dinov2-giant's SwiGLU MLP is not supported.)"""
    own = encoder.state_dict()
    mapped = {}
    for key, val in state_dict.items():
        key = key.removeprefix("dinov2.")
        for pat, rep in _HF_RULES:
            if re.fullmatch(pat, key):
                mapped[re.sub(pat, rep, key)] = val
                break
        else:
            raise ValueError(f"load_dinov2_hf: unexpected key {key!r}")
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
    are fused by a learned softmax weight, zero for views where the anchor is invisible."""

    def __init__(self, dim: int, feat_dim: int, heads: int, points: int, levels: int = 2, spacing: float = 1.0):
        super().__init__()
        self.h, self.l, self.p = heads, levels, points
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
        wh = shapes.flip(-1).float()                                                  # (L, 2) level (W, H)
        off = self.offsets(x).float().view(B, 1, N, self.h, self.l, self.p, 2) / wh[:, None]
        loc = ref[:, :, :, None, None, None, :].float() + off                         # (B, V, N, H, L, P, 2)
        attn = self.weights(x).float().view(B, N, self.h, -1).softmax(-1).view(B, 1, N, self.h, self.l, self.p)
        out = kernels.deform_attn(value, shapes, starts, loc.flatten(0, 1),
                                  attn.expand(B, V, -1, -1, -1, -1).flatten(0, 1).contiguous())
        out = out.view(B, V, N, C).to(x.dtype)
        logit = self.view_logit(out).squeeze(-1).float().masked_fill(~visible, -1e4)  # (B, V, N)
        w = (logit.softmax(1) * visible).to(out.dtype)
        return self.out_proj((w[..., None] * out).sum(1))                            # (B, N, C)


class GeoBlock(nn.Module):
    def __init__(self, dim: int, heads: int, feat_dim: int, cfg: GeoLRMConfig):
        super().__init__()
        self.heads, self.rope_base = heads, cfg.rope_base
        self.residual_on_normed = cfg.official_residual_on_normed_query
        self.norm1, self.norm2, self.norm3 = (nn.RMSNorm(dim, eps=1e-5) for _ in range(3))
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.cross = DeformCrossAttention(dim, feat_dim, heads, cfg.n_points, spacing=cfg.offset_init)
        m = cfg.ffn_multiple_of
        hidden = m * math.ceil(8 * dim / 3 / m)                                       # paper: 768 -> 2048
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x, pos, seg, ref, visible, feats, shapes, starts):
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, N, D)
        q, k = rope_3d(q, pos, self.rope_base), rope_3d(k, pos, self.rope_base)
        x = x + self.proj(kernels.patch_attention(q, k, v, segment_ids=seg).transpose(1, 2).reshape(B, N, C))
        h = self.norm2(x)
        x = (h if self.residual_on_normed else x) + self.cross(h, ref, visible, feats, shapes, starts)
        h = self.norm3(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))                          # SwiGLU


class GeoTransformer(nn.Module):
    """Anchor tokens (B, N, 3) -> features (B, N, dim). Image features are lifted by cross-attention."""

    def __init__(self, dim: int, depth: int, heads: int, cfg: GeoLRMConfig):
        super().__init__()
        self.grad_checkpoint = cfg.grad_checkpoint
        self.blocks = nn.ModuleList(GeoBlock(dim, heads, cfg.feat_dim, cfg) for _ in range(depth))
        self.norm = nn.RMSNorm(dim, eps=1e-5)

    def forward(self, x, xyz, pos, seg, c2w, K, img_hw, feats, shapes, starts):
        ref, visible = project_anchors(xyz, c2w, K, *img_hw)
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
        self.G, self.u = G, R // G
        self.encoder = ImageEncoder(cfg)
        self.transformer = GeoTransformer(cfg.prop_dim, cfg.prop_depth, cfg.prop_heads, cfg)
        c = cell_centers(G, cfg.official_cell_positions)
        z, y, x = torch.meshgrid(c, c, c, indexing="ij")                              # token t = (z*G + y)*G + x
        self.register_buffer("anchors", torch.stack([x, y, z], -1).reshape(-1, 3), persistent=False)
        i = torch.arange(G)
        iz, iy, ix = torch.meshgrid(i, i, i, indexing="ij")
        self.register_buffer("pos", torch.stack([ix, iy, iz], -1).reshape(-1, 3), persistent=False)
        self.embed = nn.Parameter(torch.randn(G ** 3, cfg.prop_dim - 3) * 0.02)
        self.head = nn.Linear(cfg.prop_dim, self.u ** 3)

    def forward(self, images, c2w, K):
        B = images.shape[0]
        feats, shapes, starts = self.encoder(images, c2w, K)
        xyz = self.anchors.expand(B, -1, -1)                                          # (B, G^3, 3)
        x = torch.cat([xyz, self.embed.expand(B, -1, -1).to(xyz.dtype)], -1)
        x = self.transformer(x, xyz, self.pos.expand(B, -1, -1), None, c2w, K, images.shape[-2:],
                             feats, shapes, starts)
        return unfold_cells(self.head(x).float(), self.G, self.u)


def unfold_cells(x: torch.Tensor, G: int, u: int) -> torch.Tensor:
    """Per-token cell values (B, G^3, u^3) -> grid (B, R, R, R), R = G u: token (gz, gy, gx) fills cells
    (gz u + dz, gy u + dy, gx u + dx), its values ordered (dz, dy, dx)."""
    B = x.shape[0]
    x = x.view(B, G, G, G, u, u, u)                                                   # (B, Gz, Gy, Gx, uz, uy, ux)
    return x.permute(0, 1, 4, 2, 5, 3, 6).reshape(B, G * u, G * u, G * u)


def occupancy_loss(logits: torch.Tensor, occ: torch.Tensor) -> dict:
    """BCE over all cells + scene-class affinity (MonoScene): BCE of precision, recall and specificity
    of the soft occupied class against 1, per object. logits, occ (B, R, R, R)."""
    occ = occ.float()
    bce = F.binary_cross_entropy_with_logits(logits, occ)
    p, t = torch.sigmoid(logits).flatten(1), occ.flatten(1)
    eps = 1e-6
    inter = (p * t).sum(1)
    precision = inter / (p.sum(1) + eps)
    recall = inter / (t.sum(1) + eps)
    specificity = ((1 - p) * (1 - t)).sum(1) / ((1 - t).sum(1) + eps)
    one = lambda s: F.binary_cross_entropy(s.clamp(eps, 1 - eps), torch.ones_like(s))  # noqa: E731
    affinity = one(precision) + one(recall) + one(specificity)
    return {"bce": bce, "affinity": affinity, "loss": bce + affinity}


def occupancy_iou(logits: torch.Tensor, occ: torch.Tensor) -> torch.Tensor:
    """Per-object IoU of (logit > 0) vs the ground truth, (B,)."""
    pred, gt = (logits > 0).flatten(1), occ.bool().flatten(1)
    return (pred & gt).sum(1).float() / (pred | gt).sum(1).clamp_min(1).float()


# ============================================================================ stage 2: reconstruction network


def select_anchors(occ_logits: torch.Tensor, max_tokens: int, official_cells: bool = False, generator=None):
    """Occupied cells (logit > 0) -> anchors: xyz (B, N, 3) cell positions, pos (B, N, 3) integer (x, y, z)
    cell indices, seg (B, N) 0 for real tokens and -1 for padding. Objects with more than ``max_tokens``
    occupied cells are randomly subsampled; N = the largest count in the batch (at least 1)."""
    B, R = occ_logits.shape[0], occ_logits.shape[-1]
    c = cell_centers(R, official_cells, occ_logits.device)
    idx = []
    for b in range(B):
        zyx = torch.nonzero(occ_logits[b] > 0)                                        # (k, 3)
        if len(zyx) > max_tokens:
            keep = torch.randperm(len(zyx), generator=generator, device="cpu")[:max_tokens]
            zyx = zyx[keep.sort().values.to(zyx.device)]
        idx.append(zyx.flip(-1))                                                      # (k, 3) as (x, y, z)
    N = max(1, max(len(i) for i in idx))
    pos = torch.zeros(B, N, 3, dtype=torch.long, device=occ_logits.device)
    seg = torch.full((B, N), -1, dtype=torch.int32, device=occ_logits.device)
    for b, i in enumerate(idx):
        pos[b, :len(i)], seg[b, :len(i)] = i, 0
    xyz = c[pos] * (seg >= 0)[..., None]                                              # padding at xyz = 0
    return xyz, pos, seg


class ReconNet(nn.Module):
    """Anchors + images -> Gaussians: means, quats (w, x, y, z), scales, opacities, rgb, each (B, N*n, .)."""

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
        if self.cfg.official_rope_inference_scale and not self.training:             # xyz_scale 1.0 at inference
            return ((xyz + 1) * (self.cfg.occ_res - 1) / 2).long()
        return pos

    def forward(self, xyz, pos, seg, images, c2w, K) -> dict:
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
        g = {"means": xyz[:, :, None] + off, "quats": F.normalize(rot, dim=-1),
             "scales": cfg.scale_max * torch.sigmoid(scale), "opacities": opacity, "rgb": rgb}
        return {k: v.flatten(1, 2) for k, v in g.items()}                             # (B, N*n, .)


def render(g: dict, c2w, K, H: int, W: int, background=None) -> dict:
    """Gaussians (B, M, .) into every view (c2w, K (B, V, ...)) -> rgb (B, V, 3, H, W), alpha and
    depth (B, V, 1, H, W) (depth is alpha-weighted, not normalized)."""
    rgb, alpha, depth = kernels.rasterize_gaussians(
        g["means"], g["quats"], g["scales"], g["opacities"], g["rgb"], invert_rigid(c2w).float(), K.float(),
        W, H, background=background)
    return {"rgb": rgb.permute(0, 1, 4, 2, 3), "alpha": alpha.permute(0, 1, 4, 2, 3),
            "depth": depth.permute(0, 1, 4, 2, 3)}


# ============================================================================ the model


class GeoLRM(nn.Module):
    def __init__(self, cfg: GeoLRMConfig):
        super().__init__()
        self.cfg = cfg
        self.proposal = ProposalNet(cfg)
        self.recon = ReconNet(cfg)

    @torch.no_grad()
    def propose_anchors(self, images, c2w, K, max_tokens: int | None = None, generator=None):
        """Frozen stage 1 -> anchors (xyz, pos, seg) for stage 2."""
        was = self.proposal.training
        self.proposal.eval()
        logits = self.proposal(images, c2w, K)
        self.proposal.train(was)
        limit = max_tokens or (self.cfg.max_tokens if self.training else self.cfg.max_tokens_infer)
        return select_anchors(logits, limit, self.cfg.official_cell_positions, generator)

    def gt_anchors(self, occ: torch.Tensor, max_tokens: int | None = None):
        """Anchors from a ground-truth occupancy (B, R, R, R) instead of the proposal network."""
        limit = max_tokens or (self.cfg.max_tokens if self.training else self.cfg.max_tokens_infer)
        return select_anchors(occ * 2 - 1, limit, self.cfg.official_cell_positions)

    def forward(self, images, c2w, K, target_c2w, target_K, target_hw, background=None, anchors=None) -> dict:
        """images (B, V, 3, h, w) in [0, 1]; c2w, K (B, V, ...) for them; targets (B, T, ...) rendered at
        target_hw with ``background`` (B, T, 3). Returns the Gaussians and rgb/alpha/depth renders."""
        if anchors is None:
            anchors = self.propose_anchors(images, c2w, K)
        g = self.recon(*anchors, images, c2w, K)
        out = render(g, target_c2w, target_K, *target_hw, background=background)
        return {**out, "gaussians": g, "seg": anchors[2]}


# ============================================================================ losses


def edge_aware_log_l1(pred, gt, image, mask):
    """log(1 + |d - d_gt|) on horizontal and vertical neighbour pairs weighted by exp(-mean_c |grad I|) of
    the ground-truth image, over pairs whose both pixels are in ``mask``. pred, gt, mask (N, 1, H, W)."""
    err = torch.log1p((pred - gt).abs())
    total = pred.new_zeros(())
    for dim in (-1, -2):
        n = err.shape[dim] - 1
        w = torch.exp(-(image.narrow(dim, 1, n) - image.narrow(dim, 0, n)).abs().mean(1, keepdim=True))
        m = (mask.narrow(dim, 1, n) * mask.narrow(dim, 0, n)).float()
        total = total + (err.narrow(dim, 0, n) * w * m).sum() / m.sum().clamp_min(1)
    return total


def tv_loss(d):
    """Total variation of (N, 1, H, W): mean |horizontal| + mean |vertical| differences."""
    return (d[..., :, 1:] - d[..., :, :-1]).abs().mean() + (d[..., 1:, :] - d[..., :-1, :]).abs().mean()


def recon_loss(out: dict, target: dict, cfg: GeoLRMConfig, lpips=None) -> dict:
    """Weighted reconstruction loss on the target views. ``out`` from ``GeoLRM.forward``; ``target`` has
    rgb (B, T, 3, H, W) composited on the render background, alpha and z-depth (B, T, 1, H, W).
    MSE is on images mapped to [-1, 1] (as the official code). ``lpips``: callable (N,3,H,W)x2 in [0,1]
    -> (N,), or None to drop that term."""
    pr, pa, pd = (out[k].flatten(0, 1).float() for k in ("rgb", "alpha", "depth"))
    tr, ta, td = (target[k].flatten(0, 1).float() for k in ("rgb", "alpha", "depth"))
    terms = {"rgb": F.mse_loss(pr * 2 - 1, tr * 2 - 1), "alpha": F.mse_loss(pa, ta),
             "depth": edge_aware_log_l1(pd, td, tr, ta > 0), "tv": tv_loss(pd)}
    weights = {"rgb": cfg.w_rgb, "alpha": cfg.w_alpha, "depth": cfg.w_depth, "tv": cfg.w_tv}
    if lpips is not None and cfg.w_lpips > 0:
        terms["lpips"], weights["lpips"] = lpips(pr.clamp(0, 1), tr).mean(), cfg.w_lpips
    terms["loss"] = sum(weights[k] * terms[k] for k in weights)
    return terms
