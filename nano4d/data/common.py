"""What every data module shares: the error type, splits and seeds, thread limits, background compositing,
value noise, and JSON reading whose errors name the file and the field.

Every reader raises ``DataError`` (a ``ValueError``) whose message starts with the offending file (and, for
structured files, names the field); nothing is skipped silently.
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch

SPLITS = {"train": 0, "val": 1, "test": 2}


class DataError(ValueError):
    """Malformed or missing data; the message names the file (and the field, for structured files)."""


# ============================================================================ seeds and splits


def rng(seed) -> np.random.Generator:
    """numpy Generator for an int seed or a ``np.random.SeedSequence``."""
    return np.random.default_rng(seed)


def split_seed(seed: int, split: str, index: int) -> int:
    """A 63-bit seed for item ``index`` of ``split``; different splits give disjoint random streams."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    ss = np.random.SeedSequence(entropy=int(seed), spawn_key=(SPLITS[split], int(index)))
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class limit_threads:
    """Context manager: run torch with ``n`` intra-op threads (None = unchanged), restoring the old count.
    Rendering is many small ops; one thread is as fast on an idle machine and far faster on a busy one."""

    def __init__(self, n: int | None = 1):
        self.n, self.old = n, None

    def __enter__(self):
        if self.n is not None and torch.get_num_threads() != self.n:
            self.old = torch.get_num_threads()
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            torch.set_num_threads(self.old)
        return False


# ============================================================================ compositing


def background_rgb(background, dtype=torch.float32) -> torch.Tensor:
    """"white" / "black" / (r, g, b) -> a (3,) colour; ValueError for anything else."""
    if isinstance(background, str):
        if background == "white":
            return torch.ones(3, dtype=dtype)
        if background == "black":
            return torch.zeros(3, dtype=dtype)
        raise ValueError(f"background must be 'white', 'black', 'random' (datasets) or an (r, g, b) triple, got {background!r}")
    bg = torch.as_tensor(background, dtype=dtype).flatten()
    if bg.numel() != 3:
        raise ValueError(f"background colour must have 3 values, got {bg.numel()}")
    return bg


def composite(rgb: torch.Tensor, alpha: torch.Tensor, background="white") -> torch.Tensor:
    """Straight-alpha compositing rgb (..., 3, H, W) * alpha (..., 1, H, W) over a background colour."""
    bg = background_rgb(background, rgb.dtype).to(rgb.device).view(3, 1, 1)
    return rgb * alpha + bg * (1 - alpha)


def dataset_background(background, seed: int) -> torch.Tensor:
    """A dataset's per-item background: "random" draws one uniform colour from ``seed``, anything else is
    passed to ``background_rgb``."""
    if isinstance(background, str) and background == "random":
        return torch.tensor(rng(seed).uniform(0, 1, 3), dtype=torch.float32)
    return background_rgb(background)


def check_background(background) -> None:
    """Validate a dataset ``background`` argument early ("random" or anything ``background_rgb`` takes)."""
    if not (isinstance(background, str) and background == "random"):
        background_rgb(background)


# ============================================================================ noise


def _hash01(ix, iy, iz, seed: int) -> torch.Tensor:
    h = ix * 73856093 ^ iy * 19349663 ^ iz * 83492791 ^ (seed * 2654435761)
    h = (h ^ (h >> 13)) * 1274126177
    h = h ^ (h >> 16)
    return (h & 0xFFFFFF).float() / float(0xFFFFFF)


def value_noise(x: torch.Tensor, seed: int, octaves: int = 3) -> torch.Tensor:
    """Fractal value noise in [0, 1] at points x (N, 3) (lattice spacing 1 at the first octave)."""
    out, amp, tot = torch.zeros(x.shape[0]), 1.0, 0.0
    for o in range(octaves):
        y = x * (2 ** o)
        i0 = torch.floor(y)
        f = y - i0
        f = f * f * (3 - 2 * f)
        i0 = i0.long()
        acc = torch.zeros(x.shape[0])
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    w = (f[:, 0] if dx else 1 - f[:, 0]) * (f[:, 1] if dy else 1 - f[:, 1]) * (f[:, 2] if dz else 1 - f[:, 2])
                    acc = acc + w * _hash01(i0[:, 0] + dx, i0[:, 1] + dy, i0[:, 2] + dz, seed + 977 * o)
        out, tot, amp = out + amp * acc, tot + amp, amp * 0.5
    return out / tot


# ============================================================================ JSON reading


def read_json(path: str, what: str = "JSON file"):
    """Parse a JSON file; DataError naming the file when it cannot be opened or parsed."""
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise DataError(f"{path}: cannot open {what} ({e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: bad JSON ({e})") from None


def field(d, key: str, where: str):
    """``d[key]``; DataError "<where>: missing field 'key'" when ``d`` is not a dict or lacks the key.
    ``where`` is the file, optionally followed by the path inside it (e.g. "rig.json: cameras[0]")."""
    if not isinstance(d, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(d).__name__}")
    if key not in d:
        raise DataError(f"{where}: missing field {key!r}")
    return d[key]


def as_int(value, where: str, key: str) -> int:
    """An integral JSON number (``3`` or ``3.0``); DataError naming the field for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or int(value) != value:
        raise DataError(f"{where}: field {key!r} must be an integer, got {value!r}")
    return int(value)


def as_float(value, where: str, key: str) -> float:
    """A finite JSON number; DataError naming the field for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: field {key!r} must be a finite number, got {value!r}")
    return float(value)


def as_array(value, shape: tuple, where: str, key: str) -> torch.Tensor:
    """A nested list of finite numbers of the given shape -> float64 tensor; DataError naming the field."""
    try:
        t = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is None or tuple(t.shape) != tuple(shape) or not torch.isfinite(t).all():
        want = "x".join(str(s) for s in shape)
        raise DataError(f"{where}: field {key!r} must be {want} finite numbers, got {value!r}")
    return t
