"""Folders of image sequences (MuM's unposed multi-view data): ``<root>/<sequence>/*.{png,jpg,jpeg}``.

``ImageSequenceFolder`` serves V frames of one sequence per item (resized to cover ``res`` and
centre-cropped); unreadable or too-short sequences raise ``DataError`` naming the file or folder.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from nano4d.data.common import DataError, rng, split_seed

IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def _load_rgb(path: str, res) -> torch.Tensor:
    """Image file -> (3, H, W) float in [0, 1], resized so it covers res (H, W) and centre-cropped."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if res is not None:
                H, W = res
                s = max(H / im.height, W / im.width)
                w, h = max(W, round(im.width * s)), max(H, round(im.height * s))
                im = im.resize((w, h), Image.BICUBIC)
                left, top = (w - W) // 2, (h - H) // 2
                im = im.crop((left, top, left + W, top + H))
            a = np.asarray(im, dtype=np.uint8)
    except Exception as e:
        raise DataError(f"{path}: unreadable image ({e})") from None
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255


class ImageSequenceFolder(Dataset):
    """Unposed multi-view data for MuM: ``<root>/<sequence>/*.{png,jpg,jpeg}`` (video frames or photos of
    one scene; sorted by file name). Item i: dict(images (V, 3, H, W) in [0, 1], sequence (str)), V drawn
    uniformly in ``views`` = (min, max) (capped by the sequence length), frames drawn without replacement
    and returned in file order. Index with ``(i, V)`` to force V (e.g. one V per batch, as MuM's dynamic
    batches do). Images are resized to cover ``res`` (int = square, None = keep; then all images of a
    sequence must share one size) and centre-cropped. Deterministic in (seed, index, epoch); ``set_epoch``
    varies it. Every sequence must hold >= views[0] images; anything unreadable raises DataError."""

    def __init__(self, root: str, views=(2, 12), res=224, seed: int = 0, exts=IMAGE_EXTS):
        if not os.path.isdir(root):
            raise DataError(f"{root}: image-sequence root folder not found")
        lo, hi = views
        if not 1 <= lo <= hi:
            raise ValueError(f"views must be (min, max) with 1 <= min <= max, got {views}")
        self.root, self.views, self.seed, self.epoch = root, (int(lo), int(hi)), seed, 0
        self.res = None if res is None else ((res, res) if isinstance(res, int) else tuple(res))
        self.sequences, self.frames = [], []
        for name in sorted(os.listdir(root)):
            d = os.path.join(root, name)
            if name.startswith(".") or not os.path.isdir(d):
                continue
            files = sorted(f for f in os.listdir(d) if f.lower().endswith(tuple(exts)))
            if len(files) < lo:
                raise DataError(f"{d}: {len(files)} images, fewer than the minimum of {lo} views per sequence")
            self.sequences.append(name)
            self.frames.append([os.path.join(d, f) for f in files])
        if not self.sequences:
            raise DataError(f"{root}: no sequence folders with images ({', '.join(exts)})")

    def __len__(self) -> int:
        return len(self.sequences)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index) -> dict:
        i, V = index if isinstance(index, tuple) else (index, None)
        files = self.frames[i]
        g = rng(split_seed(self.seed + 7919 * self.epoch, "train", i))
        if V is None:
            V = int(g.integers(self.views[0], self.views[1] + 1))
        V = min(V, len(files))
        pick = sorted(g.choice(len(files), size=V, replace=False).tolist())
        imgs = [_load_rgb(files[j], self.res) for j in pick]
        for j, im in zip(pick, imgs):
            if im.shape != imgs[0].shape:
                raise DataError(f"{files[j]}: size {im.shape[2]}x{im.shape[1]} differs from {files[pick[0]]} "
                                f"({imgs[0].shape[2]}x{imgs[0].shape[1]}); pass res= to resize")
        return dict(images=torch.stack(imgs), sequence=self.sequences[i])
