"""Files nano4d writes: atomic writes (used for every output file) and PNG image grids for previews.

The bottom layer beside ``nano4d.cameras``: checkpoints, data modules, scripts and tools all write through
``atomic_write`` — a temp file ``.tmp_*`` in the target's directory, fsync, ``os.replace`` — so a crash leaves
either the old or the new file, never a torn one. Files get the mode a plain ``open()`` would give (0644 under
the usual umask 022). Previews are ``save_image_grid`` rows (optionally labelled), scalar maps coloured by
``colorize``.
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

# ============================================================================ atomic writes


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _default_mode()


def atomic_write(path: str, data) -> str:
    """Write ``data`` (bytes, or a function ``f -> None`` writing to a binary file) to ``path`` through a temp
    file in the same directory, fsync, then ``os.replace`` (atomic on POSIX). Returns ``path``."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix="_" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fchmod(f.fileno(), _FILE_MODE)          # mkstemp creates 0600
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:                                               # make the rename itself durable
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def save_json(path: str, obj) -> str:
    """Write JSON atomically (indent 2; non-JSON values via ``str``)."""
    return atomic_write(path, json.dumps(obj, indent=2, default=str).encode() + b"\n")


def clean_stale_tmp(run_dir: str) -> list[str]:
    """Remove ``.tmp_*`` files left in ``run_dir`` by writes that were killed. Call once at start, on one rank."""
    if not os.path.isdir(run_dir):
        return []
    gone = []
    for n in sorted(os.listdir(run_dir)):
        p = os.path.join(run_dir, n)
        if n.startswith(".tmp_") and os.path.isfile(p):
            os.remove(p)
            gone.append(p)
    return gone


# ============================================================================ image grids


def image_grid(images, nrow: int | None = None, pad: int = 2, min_size: int = 0) -> torch.Tensor:
    """Images -> one (3, H, W) canvas in [0, 1] on white. ``images``: (N, C, H, W) tensor in [0, 1] (C = 1 or 3),
    ``nrow`` per row, or a list of rows, each a (n, C, H, W) tensor (rows may differ in image size; cells are
    padded). Rows narrower than ``min_size`` pixels are enlarged by an integer factor (nearest neighbour)."""
    rows = [images[i:i + (nrow or len(images))] for i in range(0, len(images), nrow or len(images))] \
        if torch.is_tensor(images) else list(images)
    rows = [r.detach().float().cpu().clamp(0, 1) for r in rows]
    rows = [F.interpolate(r, scale_factor=-(-min_size // r.shape[-1]), mode="nearest") if r.shape[-1] < min_size
            else r for r in rows]
    rows = [r.expand(-1, 3, -1, -1) if r.shape[1] == 1 else r[:, :3] for r in rows]
    cw = max(r.shape[-1] for r in rows) + pad
    ch = max(r.shape[-2] for r in rows) + pad
    ncol = max(len(r) for r in rows)
    canvas = torch.ones(3, ch * len(rows) + pad, cw * ncol + pad)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            y, x = pad + i * ch, pad + j * cw
            canvas[:, y:y + im.shape[-2], x:x + im.shape[-1]] = im
    return canvas


def colorize(x, lo: float | None = None, hi: float | None = None) -> torch.Tensor:
    """Scalar maps (depth, alpha, error) -> RGB with the turbo colour map (polynomial fit), for previews.
    ``x``: (N, H, W) or (N, 1, H, W). Values are scaled from ``lo`` to ``hi`` (default: the 2nd and 98th
    percentile of the finite values); non-finite pixels are black. Returns (N, 3, H, W) in [0, 1]."""
    x = x.detach().float().cpu()
    x = x[:, 0] if x.ndim == 4 else x
    ok = torch.isfinite(x)
    v = x[ok]
    if lo is None:
        lo = float(torch.quantile(v[:1_000_000], 0.02)) if v.numel() else 0.0
    if hi is None:
        hi = float(torch.quantile(v[:1_000_000], 0.98)) if v.numel() else 1.0
    t = ((torch.where(ok, x, lo) - lo) / max(hi - lo, 1e-12)).clamp(0, 1)
    coef = {  # turbo, 5th-order polynomial per channel (c0 .. c5)
        0: (0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943),
        1: (0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604),
        2: (0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973)}
    rgb = []
    for c in range(3):
        acc = torch.zeros_like(t)
        for a in reversed(coef[c]):
            acc = acc * t + a
        rgb.append(acc.clamp(0, 1) * ok)
    return torch.stack(rgb, 1)


def save_image_grid(path: str, images, nrow: int | None = None, pad: int = 2, labels=None, min_size: int = 0) -> str:
    """Save ``image_grid(images, nrow, pad, min_size)`` as a PNG (written atomically). ``labels``: one text per row,
    drawn in a left margin (e.g. ``["inputs", "renders", "targets", "alpha", "depth"]``). Returns ``path``."""
    arr = (image_grid(images, nrow, pad, min_size).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    img = Image.fromarray(arr)
    if labels:
        nrows = len(labels)
        ch = (img.height - pad) / nrows
        margin = 7 * max(len(str(t)) for t in labels) + 2 * pad + 4
        out = Image.new("RGB", (img.width + margin, img.height), (255, 255, 255))
        out.paste(img, (margin, 0))
        draw = ImageDraw.Draw(out)
        for i, t in enumerate(labels):
            draw.text((pad + 2, int(pad + i * ch + ch / 2 - 6)), str(t), fill=(0, 0, 0))
        img = out
    return atomic_write(path, lambda f: img.save(f, format="PNG"))
