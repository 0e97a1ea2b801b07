"""MuM: multi-view masked image modeling (Nordström et al., "MuM: Multi-View Masked Image Modeling for 3D Vision").

MAE extended to any number of views of one scene. Every view is masked independently at the same ratio
(0.75); a ViT encoder sees only each view's visible patches (views are processed independently); a light
decoder restores the full token grid of every view, alternates *frame-wise* attention (tokens of one view)
with *global* attention (tokens of all views of the sample), and predicts the pixels of the masked patches.
After pretraining only the encoder is kept: `encode(images)` gives per-view patch features.

What is implemented (following the official code, davnords/MuM branch train-dev, see
shared/papers/official-code-notes.md §2):
  - 16x16 conv patch embed, one CLS token, NO absolute position embedding: positions enter only through
    2-D RoPE on q/k (DINOv3 axial layout, base 100, patch-centre coordinates normalised per axis to
    [-1, 1]; the head dim is split in rotate-half pairs (i, i + D/2); the first D/4 frequencies rotate by
    y, the next D/4 by x). CLS is never rotated. Masked views keep the true positions of their visible
    patches (the sin/cos tables are gathered with the same indices as the tokens).
  - MAE masking (uniform noise -> argsort -> ids_restore) on the (B*V) images: same ratio, different
    positions in every view.
  - Pre-norm ViT blocks (LayerNorm, qkv bias, GELU MLP ratio 4), final norm; decoder: Linear(enc -> dec),
    mask token, full-order restore, blocks alternating frame-wise / global (frame first), decoder norm,
    Linear(dec -> p*p*3). Every attention call is `kernels.patch_attention`; the decoder lays the V views of
    a sample side by side, (B, V*(1+L), Cd), and frame-wise blocks pass segment id = view index per token
    (the block-sparse kernel then skips cross-view tiles) while global blocks pass none (one segment).
  - Loss: per-patch normalised pixel targets ((x - mean) / sqrt(var + 1e-6), var unbiased as in MAE),
    MSE averaged over the p*p*3 values, then over the masked patches of all views.
  - Inputs are images in [0, 1]; ImageNet mean/std normalisation happens inside the model.

Differences from the official code:
  - QUIRK fixed: in global decoder blocks the official code gives the CLS tokens sin = cos = 0, which
    zeroes their q and k (CLS then attends uniformly and is attended with logit 0). Here CLS is left
    unrotated in every block, like in the encoder and in frame-wise blocks. `official_global_cls=True`
    restores the official behaviour (needed to run released weights exactly).
  - LayerNorm eps is a config field (official mum.yaml uses 1e-5, the default here too).
  - Any image size divisible by the patch size and any number of views per batch (V = 1 is plain MAE
    with a RoPE ViT).
  - ImageNet mean/std normalisation is done by the model (official: in the data transform), so `encode`
    and `forward` take plain [0, 1] images.

Shape legend: B samples, V views per sample, H x W image, p patch size, h = H/p, w = W/p, L = h*w patches
per view, Lk = kept patches per view, C encoder dim, Cd decoder dim, nh heads, D head dim, N tokens.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from kernels import patch_attention

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class MuMConfig:
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 1024           # encoder width C
    depth: int = 24                 # encoder blocks
    num_heads: int = 16             # encoder heads
    decoder_dim: int = 768          # decoder width Cd
    decoder_depth: int = 12         # decoder blocks (alternating frame-wise / global, frame first)
    decoder_heads: int = 16
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True      # per-patch normalised targets (the official setting)
    rope_base: float = 100.0
    ln_eps: float = 1e-5
    official_global_cls: bool = False  # True: zero CLS q/k in global blocks, as the official code does


PRESETS = {
    # CPU-sized: seconds per step at 64-128 px on a laptop core
    "tiny": MuMConfig(embed_dim=192, depth=6, num_heads=3, decoder_dim=128, decoder_depth=4, decoder_heads=4),
    # ViT-B/16 encoder, 512-d x 8-block decoder (official `vit_base`)
    "base": MuMConfig(embed_dim=768, depth=12, num_heads=12, decoder_dim=512, decoder_depth=8, decoder_heads=16),
    # the paper / released model: ViT-L/16 encoder, 768-d x 12-block decoder (6 frame + 6 global), 16 heads
    "large": MuMConfig(embed_dim=1024, depth=24, num_heads=16, decoder_dim=768, decoder_depth=12, decoder_heads=16),
}


# ----------------------------------------------------------------------------------------------------------
# 2-D RoPE, DINOv3 axial layout


def patch_coords(h: int, w: int, device=None) -> torch.Tensor:
    """Patch-centre coordinates (y, x), each axis normalised separately to [-1, 1]: (h*w, 2), row-major."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 - 1
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(h * w, 2)


def rope_sincos(coords: torch.Tensor, head_dim: int, base: float = 100.0):
    """coords (..., 2) as (y, x) -> sin, cos (..., D). Periods base^(2i/(D/2)) for i < D/4; angle 2*pi*coord/period;
    angles laid out [y: D/4 | x: D/4] and tiled twice, so the rotate-half pair (i, i + D/2) turns by angle i."""
    assert head_dim % 4 == 0, f"2-D RoPE needs head_dim divisible by 4, got {head_dim}"
    q = head_dim // 4
    periods = base ** (2 * torch.arange(q, device=coords.device, dtype=torch.float32) / (head_dim // 2))
    ang = 2 * math.pi * coords.float()[..., None] / periods     # (..., 2, D/4)
    ang = ang.flatten(-2)                                         # (..., D/2): [y freqs | x freqs]
    ang = torch.cat([ang, ang], dim=-1)                           # (..., D)
    return ang.sin(), ang.cos()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """x (B, nh, N, D), sin/cos (B, N, D) -> rotated x. Rows with sin = 0, cos = 1 are left unchanged (CLS)."""
    sin, cos = sin[:, None].to(x.dtype), cos[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


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
    def __init__(self, cfg: MuMConfig):
        super().__init__()
        self.cfg = cfg
        p, C, Cd = cfg.patch_size, cfg.embed_dim, cfg.decoder_dim
        # encoder
        self.patch_embed = nn.Conv2d(cfg.in_chans, C, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.blocks = nn.ModuleList(Block(C, cfg.num_heads, cfg.mlp_ratio, cfg.ln_eps) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(C, eps=cfg.ln_eps)
        # decoder
        self.decoder_embed = nn.Linear(C, Cd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Cd))
        self.decoder_blocks = nn.ModuleList(Block(Cd, cfg.decoder_heads, cfg.mlp_ratio, cfg.ln_eps)
                                            for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(Cd, eps=cfg.ln_eps)
        self.decoder_pred = nn.Linear(Cd, p * p * cfg.in_chans)
        self.register_buffer("img_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("img_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.initialize_weights()

    def initialize_weights(self):
        """As MAE: xavier-uniform linears (and the patch embed seen as a linear), zero biases, LN (1, 0),
        N(0, 0.02) tokens."""
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
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

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) in [0, 1] -> patch tokens (M, L, C)."""
        x = (images - self.img_mean) / self.img_std
        return self.patch_embed(x).flatten(2).transpose(1, 2)

    # -------------------------------------------------------------------------------------- masking

    def random_masking(self, x: torch.Tensor, mask_ratio: float):
        """Per image, keep a random subset of round((1 - r) L) patches (MAE's noise / argsort scheme).
        x (M, L, C) -> x_kept (M, Lk, C), mask (M, L) with 1 = removed, ids_restore (M, L), ids_keep (M, Lk)."""
        M, L, C = x.shape
        len_keep = int(round(L * (1 - mask_ratio)))
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
        return x_kept, mask, ids_restore, ids_keep

    # -------------------------------------------------------------------------------------- encoder

    def _encoder_blocks(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        """x (M, N, C) patch tokens, sin/cos (M, N, D) -> normed (M, 1+N, C) with CLS first."""
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        sin, cos = with_prefix(sin, cos)
        for blk in self.blocks:
            x = blk(x, sin, cos)
        return self.norm(x)

    def forward_encoder(self, images: torch.Tensor, mask_ratio: float):
        """images (B, V, 3, H, W) -> latent (B*V, 1+Lk, C), mask (B*V, L), ids_restore (B*V, L)."""
        self._check(images)
        B, V, _, H, W = images.shape
        p = self.cfg.patch_size
        x = self.embed(images.flatten(0, 1))                                        # (BV, L, C)
        sin, cos = rope_sincos(patch_coords(H // p, W // p, x.device), self.cfg.embed_dim // self.cfg.num_heads,
                               self.cfg.rope_base)                                   # (L, D)
        x, mask, ids_restore, ids_keep = self.random_masking(x, mask_ratio)          # (BV, Lk, C)
        sin, cos = (t[ids_keep] for t in (sin, cos))                                 # (BV, Lk, D): true positions
        return self._encoder_blocks(x, sin, cos), mask, ids_restore

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Unmasked encoder features for downstream use: images (B, V, 3, H, W) in [0, 1] -> (B, V, h, w, C)
        (final-norm patch tokens, CLS dropped)."""
        self._check(images)
        B, V, _, H, W = images.shape
        p = self.cfg.patch_size
        x = self.embed(images.flatten(0, 1))                                        # (BV, L, C)
        sin, cos = rope_sincos(patch_coords(H // p, W // p, x.device), self.cfg.embed_dim // self.cfg.num_heads,
                               self.cfg.rope_base)
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
        sin, cos = rope_sincos(patch_coords(h, w, x.device), Cd // self.cfg.decoder_heads, self.cfg.rope_base)
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

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """images (B, V, 3, H, W) in [0, 1], pred (B*V, L, p*p*3), mask (B*V, L) 1 = removed -> scalar:
        per-patch MSE on (normalised) pixels, averaged over the masked patches of all views."""
        target = self.patchify(images.flatten(0, 1).float())
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = (pred.float() - target).pow(2).mean(dim=-1)                           # (BV, L)
        return (loss * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor, mask_ratio: float | None = None):
        """images (B, V, 3, H, W) in [0, 1] -> loss, pred (B*V, L, p*p*3), mask (B*V, L)."""
        self._check(images)
        B, V, _, H, W = images.shape
        p = self.cfg.patch_size
        latent, mask, ids_restore = self.forward_encoder(images, self.cfg.mask_ratio if mask_ratio is None
                                                         else mask_ratio)
        pred = self.forward_decoder(latent, ids_restore, B, V, H // p, W // p)
        return self.forward_loss(images, pred, mask), pred, mask

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor):
        """For previews: (masked input, reconstruction, target), each (B*V, 3, H, W) in [0, 1]. With the
        normalised-pixel loss the prediction is de-normalised with each patch's true mean and std (as the
        paper's figures do); visible patches are pasted from the input."""
        H, W = images.shape[-2:]
        p = self.cfg.patch_size
        target = self.patchify(images.flatten(0, 1).float())                        # (BV, L, ppc)
        pred = pred.float()
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        m = mask[..., None]
        masked_in = target * (1 - m) + 0.5 * m
        recon = target * (1 - m) + pred * m
        un = lambda t: self.unpatchify(t, H // p, W // p).clamp(0, 1)  # noqa: E731
        return un(masked_in), un(recon), un(target)


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05, betas=(0.9, 0.95), **kw):
    """AdamW with no weight decay on biases, norms (the 1-D parameters) and the CLS / mask tokens."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_wd = lambda n, p: p.ndim < 2 or n.endswith("_token")  # noqa: E731
    decay = [p for n, p in named if not no_wd(n, p)]
    no_decay = [p for n, p in named if no_wd(n, p)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **kw)
