"""MuM: multi-view masked image modeling (Nordström et al., "MuM: Multi-View Masked Image Modeling for 3D Vision").

MAE extended to any number of views of one scene. Every view is masked independently at the same ratio
(0.75); a ViT encoder sees only each view's visible patches (views are processed independently); a light
decoder restores the full token grid of every view, alternates *frame-wise* attention (tokens of one view)
with *global* attention (tokens of all views of the sample), and predicts the pixels of the masked patches.
After pretraining only the encoder is kept: `encode(images)` gives per-view patch features.

What is implemented (following the official code, davnords/MuM: branch train-dev for the autoencoder and
its training, branch main for the released factories):
  - 16x16 conv patch embed, one CLS token, NO absolute position embedding: positions enter only through
    2-D RoPE on q/k (DINOv3 axial layout, base 100, patch-centre coordinates normalised per axis to
    [-1, 1]; the head dim is split in rotate-half pairs (i, i + D/2); the first D/4 frequencies rotate by
    y, the next D/4 by x). CLS is never rotated. Masked views keep the true positions of their visible
    patches (the sin/cos tables are gathered with the same indices as the tokens). The rotation is
    computed in ``rope_dtype`` (q and k are cast to it and back), float32 by default as in the official
    autoencoder, also under bf16 autocast.
  - MAE masking (uniform noise -> argsort -> ids_restore) on the (B*V) images: same ratio, different
    positions in every view; floor((1 - ratio) * L) patches kept per view.
  - Pre-norm ViT blocks (LayerNorm, qkv bias, GELU MLP ratio 4), final norm; decoder: Linear(enc -> dec),
    mask token, full-order restore, blocks alternating frame-wise / global (frame first), decoder norm,
    Linear(dec -> p*p*3). Every attention call is `kernels.patch_attention`; the decoder lays the V views of
    a sample side by side, (B, V*(1+L), Cd), and frame-wise blocks pass segment id = view index per token
    (the block-sparse kernel then skips cross-view tiles) while global blocks pass none (one segment).
  - Loss target: the ImageNet-normalised image ((x - mean) / std per channel, what the official data
    transform feeds the model) patchified, each patch normalised by its own mean and (unbiased) variance
    ((t - mean) / sqrt(var + 1e-6), ``norm_pix_loss``); MSE averaged over the p*p*3 values, then over the
    masked patches of all views.
  - Inputs are images in [0, 1]; the ImageNet normalisation happens inside the model.

Config flags that reproduce official behaviours (all False / defaults here = the paper's intent):
  - ``official_global_cls``: in global decoder blocks the official code gives the CLS tokens sin = cos = 0,
    which zeroes their q and k (CLS then attends uniformly and is attended with logit 0). Default: CLS is
    unrotated in every block, like in the encoder and in frame-wise blocks.
  - ``ln_eps``: LayerNorm eps. Official training (mum.yaml, ``layernormbf16``) and the encoder-only factory
    ``mum_vitl16`` use 1e-5 (the default here); the autoencoder factory ``mum_vitl16_decoderb`` builds 1e-6.
  - ``rope_dtype``: "float32" (official autoencoder); the encoder-only factory computes the RoPE tables and
    the rotation in "bfloat16".
  - ``official_init``: trunc-normal(0.02) linears, PyTorch-default-uniform patch embed (official) instead of
    MAE's xavier-uniform; both use N(0, 0.02) tokens, zero biases, LayerNorm (1, 0).
  - ``decay_tokens``: apply weight decay to the CLS and mask tokens, as the official optimizer groups do
    (they only exempt 1-D parameters and biases).
Other differences from the official code: any image size divisible by the patch size and any number of
views per batch (V = 1 is plain MAE with a RoPE ViT); ImageNet normalisation inside the model (official: in
the data transform); no register tokens, LayerScale or drop-path (the released models use none).
`MuM.from_official` loads both released state-dict layouts (autoencoder and encoder-only) with these flags
set to the official values.

Shape legend: B samples, V views per sample, H x W image, p patch size, h = H/p, w = W/p, L = h*w patches
per view, Lk = kept patches per view, C encoder dim, Cd decoder dim, nh heads, D head dim, N tokens.
"""
import dataclasses
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn

from kernels import patch_attention

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class MuMConfig:
    patch_size: int = 16            # ViT patch size p (pixels)
    in_chans: int = 3               # input channels
    embed_dim: int = 1024           # encoder width C
    depth: int = 24                 # encoder blocks
    num_heads: int = 16             # encoder heads
    decoder_dim: int = 768          # decoder width Cd
    decoder_depth: int = 12         # decoder blocks (alternating frame-wise / global, frame first)
    decoder_heads: int = 16         # decoder heads
    mlp_ratio: float = 4.0          # MLP hidden / width (encoder and decoder)
    mask_ratio: float = 0.75        # fraction of patches removed, per view
    norm_pix_loss: bool = True      # per-patch normalised targets (the official setting)
    rope_base: float = 100.0        # 2-D RoPE frequency base (DINOv3 axial layout)
    ln_eps: float = 1e-5            # LayerNorm eps (the autoencoder release: 1e-6; see the docstring)
    rope_dtype: str = "float32"     # dtype of the RoPE tables and rotation ("bfloat16": encoder-only release)
    official_global_cls: bool = False  # True: zero CLS q/k in global blocks, as the official code does
    official_init: bool = False     # True: trunc-normal(0.02) linears + default-uniform patch embed
    decay_tokens: bool = False      # True: weight decay on cls_token / mask_token, as the official optimizer
    encoder_only: bool = False      # no decoder (the encoder-only release); forward() then raises


PRESETS = {
    # CPU-sized: seconds per step at 64-128 px on a laptop core
    "tiny": MuMConfig(embed_dim=192, depth=6, num_heads=3, decoder_dim=128, decoder_depth=4, decoder_heads=4),
    # ViT-B/16 encoder, 512-d x 8-block decoder (official `vit_base`)
    "base": MuMConfig(embed_dim=768, depth=12, num_heads=12, decoder_dim=512, decoder_depth=8, decoder_heads=16),
    # the paper / released model: ViT-L/16 encoder, 768-d x 12-block decoder (6 frame + 6 global), 16 heads
    "large": MuMConfig(embed_dim=1024, depth=24, num_heads=16, decoder_dim=768, decoder_depth=12, decoder_heads=16),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Masking(NamedTuple):
    x: torch.Tensor            # (M, Lk, C) kept tokens
    mask: torch.Tensor         # (M, L) 1 = removed, in patch order
    ids_restore: torch.Tensor  # (M, L) inverse of the shuffle
    ids_keep: torch.Tensor     # (M, Lk) patch index of every kept token


class Encoded(NamedTuple):
    latent: torch.Tensor       # (B*V, 1+Lk, C) final-norm tokens, CLS first
    mask: torch.Tensor         # (B*V, L)
    ids_restore: torch.Tensor  # (B*V, L)


class Reconstruction(NamedTuple):
    masked: torch.Tensor       # (B*V, 3, H, W) input with removed patches grey
    recon: torch.Tensor        # (B*V, 3, H, W) visible patches pasted, masked ones predicted
    target: torch.Tensor       # (B*V, 3, H, W) input


# ----------------------------------------------------------------------------------------------------------
# 2-D RoPE, DINOv3 axial layout


def patch_coords(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Patch-centre coordinates (y, x), each axis normalised separately to [-1, 1]: (h*w, 2), row-major.
    Computed in ``dtype`` in the official order of operations (so bfloat16 tables round identically)."""
    ys = torch.arange(0.5, h, device=device, dtype=dtype) / h
    xs = torch.arange(0.5, w, device=device, dtype=dtype) / w
    c = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(h * w, 2)
    return 2.0 * c - 1.0


def rope_periods(head_dim: int, base: float = 100.0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Periods base^(2i/(D/2)) for i < D/4, in ``dtype``."""
    if head_dim % 4:
        raise ValueError(f"head_dim: 2-D RoPE needs a multiple of 4, got {head_dim}")
    return base ** (2 * torch.arange(head_dim // 4, device=device, dtype=dtype) / (head_dim // 2))


def rope_sincos(coords: torch.Tensor, head_dim: int, base: float = 100.0):
    """coords (..., 2) as (y, x) -> sin, cos (..., D) in coords' dtype. Angle 2*pi*coord/period; angles laid
    out [y: D/4 | x: D/4] and tiled twice, so the rotate-half pair (i, i + D/2) turns by angle i."""
    periods = rope_periods(head_dim, base, coords.device, coords.dtype)
    ang = 2 * math.pi * coords[..., None] / periods               # (..., 2, D/4)
    ang = ang.flatten(-2)                                         # (..., D/2): [y freqs | x freqs]
    ang = torch.cat([ang, ang], dim=-1)                           # (..., D)
    return ang.sin(), ang.cos()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """x (B, nh, N, D), sin/cos (B, N, D) -> rotated x, computed in the tables' dtype and cast back to x's.
    Rows with sin = 0, cos = 1 are left unchanged (CLS)."""
    xr = x.to(sin.dtype)
    sin, cos = sin[:, None], cos[:, None]
    return (xr * cos + rotate_half(xr) * sin).to(x.dtype)


def with_prefix(sin: torch.Tensor, cos: torch.Tensor, zero: bool = False):
    """Prepend one CLS row to (M, N, D) tables: identity rotation (sin 0, cos 1), or q = k = 0 if ``zero``."""
    s0 = sin.new_zeros(sin.shape[0], 1, sin.shape[-1])
    c0 = s0 if zero else torch.ones_like(s0)
    return torch.cat([s0, sin], dim=1), torch.cat([c0, cos], dim=1)


# ----------------------------------------------------------------------------------------------------------
# transformer block


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} not divisible by num_heads {num_heads}"
        self.nh = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, sin, cos, segment_ids=None):
        """x (B, N, C), sin/cos (B, N, D), segment_ids (B, N) int32 or None (all tokens see each other)."""
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.nh, C // self.nh).permute(2, 0, 3, 1, 4)  # (3, B, nh, N, D)
        q, k, v = qkv.unbind(0)
        q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        o = patch_attention(q, k, v, segment_ids=segment_ids)                          # (B, nh, N, D)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm ViT block: x + attn(LN(x)), x + MLP(LN(x)); GELU MLP, ratio 4."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-5):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x, sin, cos, segment_ids=None):
        x = x + self.attn(self.norm1(x), sin, cos, segment_ids)
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------------------------------------
# the model


class MuM(nn.Module):
    """Front door: ``loss, out = model({"images": (B, V, 3, H, W) in [0, 1]})`` with ``out["terms"]`` (named
    scalar losses), ``out["pred"]`` (B*V, L, p*p*3) and ``out["mask"]`` (B*V, L). Stages as in MAE:
    `random_masking`, `forward_encoder`, `forward_decoder`, `forward_loss`."""

    def __init__(self, cfg: MuMConfig):
        super().__init__()
        if cfg.rope_dtype not in _DTYPES:
            raise ValueError(f"rope_dtype: expected one of {sorted(_DTYPES)}, got {cfg.rope_dtype!r}")
        self.cfg = cfg
        p, C, Cd = cfg.patch_size, cfg.embed_dim, cfg.decoder_dim
        # encoder
        self.patch_embed = nn.Conv2d(cfg.in_chans, C, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.blocks = nn.ModuleList(Block(C, cfg.num_heads, cfg.mlp_ratio, cfg.ln_eps) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(C, eps=cfg.ln_eps)
        # decoder
        if not cfg.encoder_only:
            self.decoder_embed = nn.Linear(C, Cd)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, Cd))
            self.decoder_blocks = nn.ModuleList(Block(Cd, cfg.decoder_heads, cfg.mlp_ratio, cfg.ln_eps)
                                                for _ in range(cfg.decoder_depth))
            self.decoder_norm = nn.LayerNorm(Cd, eps=cfg.ln_eps)
            self.decoder_pred = nn.Linear(Cd, p * p * cfg.in_chans)
        self.initialize_weights()

    def initialize_weights(self):
        """MAE: xavier-uniform linears (the patch embed seen as a linear too). ``official_init``: trunc-normal
        std 0.02 linears, patch embed U(+-1/sqrt(fan_in)) weight and bias. Both: zero linear biases,
        LayerNorm (1, 0), N(0, 0.02) tokens."""
        w, b = self.patch_embed.weight, self.patch_embed.bias
        if self.cfg.official_init:
            bound = 1 / math.sqrt(w[0].numel())
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)
        else:
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(b)
        nn.init.normal_(self.cls_token, std=0.02)
        if not self.cfg.encoder_only:
            nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if self.cfg.official_init:
                    nn.init.trunc_normal_(m.weight, std=0.02)
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -------------------------------------------------------------------------------------- patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) -> (M, L, p*p*3), patches row-major, values ordered (py, px, c)."""
        p = self.cfg.patch_size
        M, c, H, W = imgs.shape
        h, w = H // p, W // p
        x = imgs.reshape(M, c, h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(M, h * w, p * p * c)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(M, L, p*p*3) -> (M, 3, h*p, w*p)."""
        p, c = self.cfg.patch_size, self.cfg.in_chans
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def _check(self, images: torch.Tensor):
        if images.ndim != 5 or images.shape[2] != self.cfg.in_chans:
            raise ValueError(f"images: expected (B, V, {self.cfg.in_chans}, H, W), got {tuple(images.shape)}")
        p = self.cfg.patch_size
        if images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(f"images: H, W must be divisible by the patch size {p}, got {tuple(images.shape[-2:])}")

    @staticmethod
    def normalize(images: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) in [0, 1] -> ImageNet-normalised, what the official data transform feeds its model."""
        shape = (3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(shape)
        std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(shape)
        return (images - mean) / std

    @staticmethod
    def denormalize(x: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize`."""
        shape = (3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(shape)
        std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(shape)
        return x * std + mean

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) in [0, 1] -> patch tokens (M, L, C)."""
        return self.patch_embed(self.normalize(images)).flatten(2).transpose(1, 2)

    def _rope(self, h: int, w: int, head_dim: int, device):
        return rope_sincos(patch_coords(h, w, device, _DTYPES[self.cfg.rope_dtype]), head_dim, self.cfg.rope_base)

    # -------------------------------------------------------------------------------------- masking

    def random_masking(self, x: torch.Tensor, mask_ratio: float) -> Masking:
        """Per image, keep a random subset of floor((1 - r) L) patches (MAE's noise / argsort scheme)."""
        M, L, C = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if not 1 <= len_keep <= L:
            raise ValueError(f"mask_ratio {mask_ratio} keeps {len_keep} of {L} patches (need at least 1)")
        noise = torch.rand(M, L, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)           # ascending: the first len_keep are kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)     # inverse permutation
        ids_keep = ids_shuffle[:, :len_keep]
        x_kept = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, C))
        mask = torch.ones(M, L, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)           # back to patch order
        return Masking(x_kept, mask, ids_restore, ids_keep)

    # -------------------------------------------------------------------------------------- encoder

    def _encoder_blocks(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        """x (M, N, C) patch tokens, sin/cos (M, N, D) -> normed (M, 1+N, C) with CLS first."""
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        sin, cos = with_prefix(sin, cos)
        for blk in self.blocks:
            x = blk(x, sin, cos)
        return self.norm(x)

    def forward_encoder(self, images: torch.Tensor, mask_ratio: float) -> Encoded:
        """images (B, V, 3, H, W) in [0, 1] -> latent (B*V, 1+Lk, C), mask (B*V, L), ids_restore (B*V, L)."""
        self._check(images)
        H, W = images.shape[-2:]
        p = self.cfg.patch_size
        x = self.embed(images.flatten(0, 1))                                        # (BV, L, C)
        sin, cos = self._rope(H // p, W // p, self.cfg.embed_dim // self.cfg.num_heads, x.device)  # (L, D)
        x, mask, ids_restore, ids_keep = self.random_masking(x, mask_ratio)          # (BV, Lk, C)
        sin, cos = (t[ids_keep] for t in (sin, cos))                                 # (BV, Lk, D): true positions
        return Encoded(self._encoder_blocks(x, sin, cos), mask, ids_restore)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Unmasked encoder features for downstream use: images (B, V, 3, H, W) in [0, 1] -> (B, V, h, w, C)
        (final-norm patch tokens, CLS dropped)."""
        self._check(images)
        B, V, _, H, W = images.shape
        p = self.cfg.patch_size
        x = self.embed(images.flatten(0, 1))                                        # (BV, L, C)
        sin, cos = self._rope(H // p, W // p, self.cfg.embed_dim // self.cfg.num_heads, x.device)
        x = self._encoder_blocks(x, sin.expand(x.shape[0], -1, -1), cos.expand(x.shape[0], -1, -1))
        return x[:, 1:].reshape(B, V, H // p, W // p, -1)

    # -------------------------------------------------------------------------------------- decoder

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor, B: int, V: int, h: int, w: int):
        """latent (B*V, 1+Lk, C), ids_restore (B*V, L) -> pixel predictions (B*V, L, p*p*3)."""
        L, Cd = h * w, self.cfg.decoder_dim
        x = self.decoder_embed(latent)                                               # (BV, 1+Lk, Cd)
        n_mask = L + 1 - x.shape[1]
        patches = torch.cat([x[:, 1:], self.mask_token.to(x.dtype).expand(x.shape[0], n_mask, -1)], dim=1)
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, Cd))  # (BV, L, Cd) in order
        x = torch.cat([x[:, :1], patches], dim=1).reshape(B, V * (1 + L), Cd)        # views side by side

        # RoPE: every view uses its own 2-D patch positions; CLS rows unrotated (or zeroed: official quirk)
        sin, cos = self._rope(h, w, Cd // self.cfg.decoder_heads, x.device)
        sin, cos = sin[None], cos[None]                                              # (1, L, D)
        tables = {}
        for kind in ("frame", "global"):
            s, c = with_prefix(sin, cos, zero=(kind == "global" and self.cfg.official_global_cls))
            tables[kind] = (s.repeat(1, V, 1).expand(B, -1, -1), c.repeat(1, V, 1).expand(B, -1, -1))
        # segment ids: frame-wise blocks see only their own view; global blocks see the whole sample (None)
        view_id = torch.arange(V, device=x.device, dtype=torch.int32).repeat_interleave(1 + L)
        seg = {"frame": view_id[None].expand(B, -1).contiguous(), "global": None}

        for i, blk in enumerate(self.decoder_blocks):
            kind = "frame" if i % 2 == 0 else "global"
            x = blk(x, *tables[kind], seg[kind])
        x = self.decoder_pred(self.decoder_norm(x))                                  # (B, V(1+L), p*p*3)
        return x.reshape(B * V, 1 + L, -1)[:, 1:]                                    # drop CLS

    # -------------------------------------------------------------------------------------- loss

    def loss_target(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, V, 3, H, W) in [0, 1] -> (B*V, L, p*p*3) float32: patches of the ImageNet-normalised
        images, each normalised by its own mean and unbiased variance when ``norm_pix_loss``."""
        target = self.patchify(self.normalize(images.flatten(0, 1).float()))
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """images (B, V, 3, H, W) in [0, 1], pred (B*V, L, p*p*3), mask (B*V, L) 1 = removed -> scalar:
        per-patch MSE to `loss_target`, averaged over the masked patches of all views."""
        loss = (pred.float() - self.loss_target(images)).pow(2).mean(dim=-1)        # (BV, L)
        return (loss * mask).sum() / mask.sum()

    def forward(self, batch: dict):
        """batch {"images": (B, V, 3, H, W) in [0, 1], optional "mask_ratio": float} ->
        loss, {"terms": {"mse": loss}, "pred": (B*V, L, p*p*3), "mask": (B*V, L)}."""
        if self.cfg.encoder_only:
            raise ValueError("this MuM has no decoder (encoder_only=True): use encode(), not forward()")
        images = batch["images"]
        mask_ratio = batch.get("mask_ratio", self.cfg.mask_ratio)
        self._check(images)
        B, V, _, H, W = images.shape
        p = self.cfg.patch_size
        latent, mask, ids_restore = self.forward_encoder(images, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore, B, V, H // p, W // p)
        loss = self.forward_loss(images, pred, mask)
        return loss, {"terms": {"mse": loss.detach()}, "pred": pred, "mask": mask}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> Reconstruction:
        """For previews: (masked input, reconstruction, target), each (B*V, 3, H, W) in [0, 1]. The prediction
        is de-normalised with each patch's true mean and std in the ImageNet-normalised space (as the
        official visualisation does), visible patches are pasted from the input, then the ImageNet
        normalisation is undone."""
        H, W = images.shape[-2:]
        p = self.cfg.patch_size
        target = self.patchify(self.normalize(images.flatten(0, 1).float()))        # (BV, L, ppc)
        pred = pred.float()
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        m = mask[..., None].float()
        un = lambda t: self.denormalize(self.unpatchify(t, H // p, W // p)).clamp(0, 1)  # noqa: E731
        grey = self.patchify(self.normalize(torch.full_like(images.flatten(0, 1).float(), 0.5)))
        return Reconstruction(un(target * (1 - m) + grey * m), un(target * (1 - m) + pred * m), un(target))

    # -------------------------------------------------------------------------------------- optimizer

    def configure_optimizer(self, lr: float, weight_decay: float = 0.05, betas=(0.9, 0.95), fused: bool | None = None,
                            **kw) -> torch.optim.AdamW:
        """AdamW; no weight decay on biases and the other 1-D parameters (norms), nor on the CLS / mask tokens
        unless ``decay_tokens``. ``fused=None``: fused kernels when every parameter is on CPU or CUDA."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        tokens = () if self.cfg.decay_tokens else ("cls_token", "mask_token")
        no_wd = lambda n, p: p.ndim < 2 or n.endswith(".bias") or n in tokens  # noqa: E731
        groups = [{"params": [p for n, p in named if not no_wd(n, p)], "weight_decay": weight_decay},
                  {"params": [p for n, p in named if no_wd(n, p)], "weight_decay": 0.0}]
        if fused is None:
            fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for _, p in named)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused, **kw)

    # -------------------------------------------------------------------------------------- loading

    @classmethod
    def from_checkpoint(cls, path: str, map_location="cpu") -> "MuM":
        """Rebuild from ``RUN_DIR/model.safetensors`` (or that file's path): weights + the "model" config
        stored in its metadata."""
        if os.path.isdir(path):
            path = os.path.join(path, "model.safetensors")
        sd, meta = read_safetensors(path, map_location)
        config = json.loads(meta.get("config", "{}"))
        if "model" not in config:
            raise ValueError(f"{path}: no model config in the safetensors metadata")
        model = cls(config_from_dict(MuMConfig, config["model"]))
        model.load_state_dict(sd)
        return model.to(map_location)

    @classmethod
    def from_official(cls, state_dict: dict, preset: str | None = None, **overrides) -> "MuM":
        """Load an official davnords/MuM state dict: the autoencoder (``MuMAutoEncoder``, e.g. the released
        ``MuM_ViTLarge_BaseDecoder.pth``) or the encoder-only ``MuMVisionTransformer`` (``MuM_ViTLarge.pth``,
        built with ``encoder_only=True``). Sizes come from the tensor shapes (heads from the RoPE ``periods``
        buffers), or from ``preset`` (then checked against the shapes). The official flags are set as the
        official factories build the model: ``official_global_cls``, ``official_init``, ``decay_tokens``,
        ``rope_dtype`` = the dtype of the stored ``periods`` (bfloat16 in the encoder-only release) and
        ``ln_eps`` 1e-6 for the autoencoder factory / 1e-5 for the encoder-only one (training used 1e-5);
        ``overrides`` replace any config field. Raises ValueError naming the first unexpected, missing or
        mis-shaped key; nothing is loaded partially."""
        sd = dict(state_dict)
        encoder_only = not any(k.startswith(("decoder_", "mask_token", "rope_embed_decoder")) for k in sd)

        def need(key):
            if key not in sd:
                raise ValueError(f"official state dict: missing key {key!r}")
            return sd[key]

        pw = need("patch_embed.proj.weight")
        if pw.ndim != 4 or pw.shape[2] != pw.shape[3]:
            raise ValueError(f"official state dict: 'patch_embed.proj.weight' has shape {tuple(pw.shape)}, "
                             "expected (C, in_chans, p, p)")
        periods = need("rope_embed.periods")
        C = pw.shape[0]
        dtype_name = {v: k for k, v in _DTYPES.items()}.get(periods.dtype)
        if dtype_name is None:
            raise ValueError(f"official state dict: 'rope_embed.periods' has dtype {periods.dtype}")
        if periods.ndim != 1 or periods.numel() == 0 or C % (4 * periods.numel()):
            raise ValueError(f"official state dict: 'rope_embed.periods' has shape {tuple(periods.shape)}, "
                             f"expected (head_dim / 4,) for width {C}")
        fc1 = need("blocks.0.mlp.fc1.weight")
        inferred = dict(patch_size=pw.shape[2], in_chans=pw.shape[1], embed_dim=C,
                        depth=_count_blocks(sd, "blocks"), num_heads=C // (4 * periods.numel()),
                        mlp_ratio=fc1.shape[0] / C)
        official = dict(rope_dtype=dtype_name, official_global_cls=True, official_init=True, decay_tokens=True,
                        ln_eps=1e-5 if encoder_only else 1e-6, encoder_only=encoder_only)
        if not encoder_only:
            Cd = need("decoder_embed.weight").shape[0]
            dperiods = need("rope_embed_decoder.periods")
            if dperiods.ndim != 1 or dperiods.numel() == 0 or Cd % (4 * dperiods.numel()):
                raise ValueError(f"official state dict: 'rope_embed_decoder.periods' has shape "
                                 f"{tuple(dperiods.shape)}, expected (head_dim / 4,) for width {Cd}")
            n_frame, n_global = _count_blocks(sd, "decoder_frame_blocks"), _count_blocks(sd, "decoder_global_blocks")
            if n_frame != n_global:
                raise ValueError(f"official state dict: {n_frame} decoder_frame_blocks but {n_global} "
                                 "decoder_global_blocks (they come in pairs)")
            inferred.update(decoder_dim=Cd, decoder_depth=2 * n_frame, decoder_heads=Cd // (4 * dperiods.numel()))
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"preset: unknown {preset!r}, expected one of {sorted(PRESETS)}")
            cfg = dataclasses.replace(PRESETS[preset], **official)
        else:
            cfg = MuMConfig(**{**dataclasses.asdict(MuMConfig()), **inferred, **official})
        cfg = dataclasses.replace(cfg, **overrides)

        with torch.device("meta"):
            model = cls(cfg)
        expected = model.state_dict()
        rope = {"rope_embed.periods": (cfg.embed_dim, cfg.num_heads),
                "rope_embed_decoder.periods": (cfg.decoder_dim, cfg.decoder_heads)}
        ours = {}
        for key, t in sd.items():
            if key in rope and not (cfg.encoder_only and key == "rope_embed_decoder.periods"):
                # a RoPE buffer holds no weights: check it is the one this config computes, then drop it
                dim, heads = rope[key]
                want = rope_periods(dim // heads, cfg.rope_base, dtype=t.dtype)
                if t.shape != want.shape or not torch.allclose(t.float().cpu(), want.float(), rtol=1e-2):
                    raise ValueError(f"official state dict: {key!r} (shape {tuple(t.shape)}) does not match "
                                     f"RoPE base {cfg.rope_base} with {heads} heads of width {dim}")
                continue
            new = _official_to_ours(key)
            if new is None or new not in expected:
                raise ValueError(f"official state dict: unexpected key {key!r} with shape {tuple(t.shape)}")
            if t.shape != expected[new].shape:
                raise ValueError(f"official state dict: {key!r} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(expected[new].shape)} for this configuration")
            ours[new] = t
        for new, t in expected.items():
            if new not in ours:
                raise ValueError(f"official state dict: missing key {_ours_to_official(new)!r} "
                                 f"(shape {tuple(t.shape)})")
        model.load_state_dict(ours, strict=True, assign=True)
        return model


# ----------------------------------------------------------------------------------------------------------
# official key layout and checkpoints

_MLP = {"fc1": "0", "fc2": "2"}


def _count_blocks(sd: dict, prefix: str) -> int:
    """Number of consecutive ``prefix.{i}.`` blocks from 0."""
    n = 0
    while any(k.startswith(f"{prefix}.{n}.") for k in sd):
        n += 1
    return n


def _official_to_ours(key: str) -> str | None:
    """Official key -> this module's key (None: no counterpart)."""
    if key == "patch_embed.proj.weight" or key == "patch_embed.proj.bias":
        return "patch_embed." + key.rsplit(".", 1)[1]
    m = re.fullmatch(r"(blocks|decoder_frame_blocks|decoder_global_blocks)\.(\d+)\.(.+)", key)
    if m:
        group, i, rest = m.group(1), int(m.group(2)), m.group(3)
        mm = re.fullmatch(r"mlp\.(fc1|fc2)\.(weight|bias)", rest)
        if mm:
            rest = f"mlp.{_MLP[mm.group(1)]}.{mm.group(2)}"
        elif not re.fullmatch(r"(norm1|norm2|attn\.qkv|attn\.proj)\.(weight|bias)", rest):
            return None
        if group == "blocks":
            return f"blocks.{i}.{rest}"
        return f"decoder_blocks.{2 * i + (group == 'decoder_global_blocks')}.{rest}"
    if re.fullmatch(r"(cls_token|mask_token|(norm|decoder_embed|decoder_norm|decoder_pred)\.(weight|bias))", key):
        return key
    return None


def _ours_to_official(key: str) -> str:
    if key.startswith("patch_embed."):
        return "patch_embed.proj." + key.split(".", 1)[1]
    m = re.fullmatch(r"(blocks|decoder_blocks)\.(\d+)\.(.+)", key)
    if not m:
        return key
    group, i, rest = m.group(1), int(m.group(2)), m.group(3)
    rest = re.sub(r"^mlp\.([02])\.", lambda mm: "mlp." + {"0": "fc1", "2": "fc2"}[mm.group(1)] + ".", rest)
    if group == "blocks":
        return f"blocks.{i}.{rest}"
    return f"decoder_{'global' if i % 2 else 'frame'}_blocks.{i // 2}.{rest}"


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path: str, map_location="cpu"):
    """Minimal .safetensors reader: 8-byte little-endian header size, JSON header {name: {dtype, shape,
    data_offsets}, "__metadata__": {...}}, then the raw little-endian data. -> (state_dict, metadata)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", None) or {}
    sd = {}
    for name, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        dtype, (a, b) = _ST_DTYPES[info["dtype"]], info["data_offsets"]
        t = (torch.frombuffer(bytearray(data[a:b]), dtype=dtype) if b > a else torch.empty(0, dtype=dtype))
        sd[name] = t.reshape(info["shape"]).to(map_location)
    return sd, meta


def config_from_dict(cls, d: dict):
    """Dataclass from a JSON dict: unknown keys raise ValueError, missing keys take the defaults, and lists
    become tuples where the field's default is a tuple."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config field(s) {unknown}")
    defaults = cls()
    return cls(**{k: tuple(v) if isinstance(getattr(defaults, k), tuple) and isinstance(v, list) else v
                  for k, v in d.items()})


def mark_views_dynamic(images: torch.Tensor) -> torch.Tensor:
    """For ``torch.compile``d training: mark the batch and view dimensions of (B, V, 3, H, W) images as
    dynamic, so a new view count (and the batch size that goes with it) does not recompile."""
    torch._dynamo.maybe_mark_dynamic(images, 0)
    torch._dynamo.maybe_mark_dynamic(images, 1)
    return images
