"""Image sequences for MuM (unposed multi-view frames): folders ``<root>/<sequence>/*.{png,jpg,jpeg}``, or an
index file in MuM's annotation format (gzip'd or plain JSON ``{scene: [[{"filepath": ...}, ...], ...]}``, one
sequence per inner list, file paths relative to ``root``).

``ImageSequenceFolder`` keeps only an index (sequence names and frame counts; with an index file, all paths
as one byte array) and reads the V frames of an item in ``__getitem__``; in folder mode the frame names are
listed when the item is read. Unreadable or too-short sequences raise ``DataError`` naming the file or folder.
"""
from __future__ import annotations

import gzip
import json
import logging
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from nano4d.data.common import DataError, rng, split_seed

log = logging.getLogger("nano4d.data")

IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def _load_rgb(path: str, res) -> torch.Tensor:
    """Image file -> (3, H, W) float in [0, 1], resized so it covers res (H, W) and centre-cropped."""
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


def _read_index(path: str) -> dict:
    try:
        opener = gzip.open if path.endswith((".gz", ".jgz")) else open
        with opener(path, "rt") as f:
            data = json.load(f)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the sequence index ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: the sequence index must be a JSON object {{scene: [[{{\"filepath\": ...}}, ...], ...]}}")
    return data


class ImageSequenceFolder(Dataset):
    """Unposed multi-view data for MuM. Item i: dict(images (V, 3, H, W) in [0, 1], sequence (str)), V drawn
    uniformly in ``views`` = (min, max) (capped by the sequence length), frames drawn uniformly without
    replacement (MuM's per-scene sampling), returned in file order (``frame_order="random"``: in draw order, as
    MuM's loader does). Index with ``(i, V)`` to force V (``nano4d.data.sampling.DynamicBatchSampler`` yields
    such pairs: one V per batch, MuM's dynamic batches). Images are resized to cover ``res`` (int = square,
    None = keep; then all images of a sequence must share one size) and centre-cropped. Deterministic in
    (seed, index, epoch); ``set_epoch`` varies it.

    Sources: ``root`` folders (``<root>/<sequence>/*.png|jpg``, sorted by file name) or ``index`` (MuM's
    annotation file, see the module docstring; sequence i of scene s is named "s_i"). ``min_frames``: skip
    shorter sequences (MuM uses 24; they are counted in ``skipped`` and logged); without it every sequence must
    hold >= views[0] images."""

    def __init__(self, root: str, views=(2, 12), res=224, seed: int = 0, exts=IMAGE_EXTS, index: str | None = None,
                 min_frames: int | None = None, frame_order: str = "file"):
        if not os.path.isdir(root):
            raise DataError(f"{root}: image-sequence root folder not found")
        lo, hi = views
        if not 1 <= lo <= hi:
            raise ValueError(f"views must be (min, max) with 1 <= min <= max, got {views}")
        if frame_order not in ("file", "random"):
            raise ValueError(f"frame_order must be 'file' or 'random', got {frame_order!r}")
        self.root, self.views, self.seed, self.epoch = root, (int(lo), int(hi)), seed, 0
        self.res = None if res is None else ((res, res) if isinstance(res, int) else tuple(res))
        self.exts, self.frame_order, self.index = tuple(exts), frame_order, index
        names, counts, paths, self.skipped = [], [], [], []
        need = lo if min_frames is None else int(min_frames)
        if index is not None:
            for scene, seqs in _read_index(index).items():
                if not isinstance(seqs, list):
                    raise DataError(f"{index}: scene {scene!r} must map to a list of sequences")
                for j, seq in enumerate(seqs):
                    try:
                        files = [str(a["filepath"]) for a in seq]
                    except (TypeError, KeyError):
                        raise DataError(f"{index}: scene {scene!r} sequence {j}: every frame needs a 'filepath' "
                                        "field") from None
                    if len(files) < need:
                        if min_frames is None:
                            raise DataError(f"{index}: scene {scene!r} sequence {j}: {len(files)} frames, fewer "
                                            f"than the minimum of {lo} views")
                        self.skipped.append(f"{scene}_{j}")
                        continue
                    names.append(f"{scene}_{j}")
                    counts.append(len(files))
                    paths += files
        else:
            for name in sorted(os.listdir(root)):
                d = os.path.join(root, name)
                if name.startswith(".") or not os.path.isdir(d):
                    continue
                n = len(self._list(d))
                if n < need:
                    if min_frames is None:
                        raise DataError(f"{d}: {n} images, fewer than the minimum of {lo} views per sequence")
                    self.skipped.append(name)
                    continue
                names.append(name)
                counts.append(n)
        if self.skipped:
            log.info("%s: %d sequences with fewer than %d frames skipped", index or root, len(self.skipped), need)
        if not names:
            raise DataError(f"{index or root}: no sequences with images ({', '.join(exts)})")
        self.names = np.array(names, dtype=np.bytes_)
        self.counts = np.array(counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]) if index is not None else None
        self.paths = np.array(paths, dtype=np.bytes_) if index is not None else None

    @property
    def sequences(self) -> list[str]:
        return [n.decode() for n in self.names]

    def _list(self, d: str) -> list[str]:
        return sorted(f for f in os.listdir(d) if f.lower().endswith(self.exts))

    def frames(self, i: int) -> list[str]:
        """The frame paths of sequence i (listed now in folder mode)."""
        if self.paths is not None:
            s = self.starts[i]
            return [os.path.join(self.root, p.decode()) for p in self.paths[s:s + self.counts[i]]]
        d = os.path.join(self.root, self.names[i].decode())
        files = [os.path.join(d, f) for f in self._list(d)]
        if len(files) < self.views[0]:
            raise DataError(f"{d}: {len(files)} images now, fewer than the minimum of {self.views[0]} views")
        return files

    def __len__(self) -> int:
        return len(self.names)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index) -> dict:
        i, V = index if isinstance(index, tuple) else (index, None)
        files = self.frames(i)
        g = rng(split_seed(self.seed + 7919 * self.epoch, "train", i))
        if V is None:
            V = int(g.integers(self.views[0], self.views[1] + 1))
        V = min(V, len(files))
        pick = g.choice(len(files), size=V, replace=False).tolist()
        if self.frame_order == "file":
            pick = sorted(pick)
        imgs = [_load_rgb(files[j], self.res) for j in pick]
        for j, im in zip(pick, imgs):
            if im.shape != imgs[0].shape:
                raise DataError(f"{files[j]}: size {im.shape[2]}x{im.shape[1]} differs from {files[pick[0]]} "
                                f"({imgs[0].shape[2]}x{imgs[0].shape[1]}); pass res= to resize")
        return dict(images=torch.stack(imgs), sequence=self.names[i].decode())
