"""Shared helpers for the training scripts: config flags, distributed setup, LR schedule, checkpoints,
progress logging, image metrics and PNG grids; the camera helpers of ``nano4d.cameras`` are re-exported
here (one camera convention everywhere: OpenCV c2w, K in pixels, pixel centres at +0.5).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch

# ============================================================================ config flags


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def _flag_type(default):
    if isinstance(default, bool):
        return dict(type=_parse_bool)
    if isinstance(default, tuple):
        elem = type(default[0]) if default else str
        elem = _parse_bool if elem is bool else elem
        return dict(type=lambda s: tuple(elem(x) for x in s.replace(",", " ").split()))
    if default is None:
        return dict(type=str)
    return dict(type=type(default))


def parse_config(train_cls, model_cls=None, presets: dict | None = None, argv=None, default_preset="tiny"):
    """Dataclass fields -> argparse flags.

    ``train_cls`` fields become ``--field value``; ``model_cls`` fields (if given) become
    ``--model.field value`` on top of ``--preset NAME`` (a key of ``presets``, each a ``model_cls``
    instance). Tuples are given as ``--res 64,64``; bools as ``--flag true/false``.
    Returns the train config, or ``(train_cfg, model_cfg)`` when ``model_cls`` is given.
    """
    p = argparse.ArgumentParser(description=(sys.modules["__main__"].__doc__ or "").strip().split("\n")[0])
    tdefaults = train_cls()
    for f in dataclasses.fields(train_cls):
        p.add_argument(f"--{f.name}", dest=f"train__{f.name}", default=getattr(tdefaults, f.name),
                       **_flag_type(getattr(tdefaults, f.name)))
    if model_cls is not None:
        presets = presets or {}
        p.add_argument("--preset", default=default_preset if default_preset in presets else None,
                       choices=sorted(presets) or None, help="model preset")
        for f in dataclasses.fields(model_cls):
            ref = getattr(presets.get(default_preset, model_cls()) if presets else model_cls(), f.name)
            p.add_argument(f"--model.{f.name}", dest=f"model__{f.name}", default=None, **_flag_type(ref))
    args = vars(p.parse_args(argv))
    train = train_cls(**{k[7:]: v for k, v in args.items() if k.startswith("train__")})
    if model_cls is None:
        return train
    base = presets[args["preset"]] if args.get("preset") else model_cls()
    over = {k[7:]: v for k, v in args.items() if k.startswith("model__") and v is not None}
    return train, dataclasses.replace(base, **over)


def config_to_dict(*cfgs, **named) -> dict:
    """Dataclass configs -> a JSON-able dict (tuples become lists)."""
    out = {}
    for c in cfgs:
        out.update(dataclasses.asdict(c))
    for k, c in named.items():
        out[k] = dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c
    return out


def save_json(path: str, obj) -> None:
    """Write JSON atomically."""
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


# ============================================================================ distributed


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    ddp: bool = False


_DIST = DistInfo()


def setup_dist(seed: int | None = 0) -> DistInfo:
    """Start the process group when run under torchrun (``RANK`` in env), else a single process.
    nccl on CUDA (``set_device`` first), gloo on CPU. Seeds torch/numpy/random with ``seed + rank``."""
    global _DIST
    import torch.distributed as dist
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) >= 1:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
        world = int(os.environ["WORLD_SIZE"])
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            device = torch.device("cpu")
            dist.init_process_group("gloo")
        _DIST = DistInfo(rank, local_rank, world, device, True)
    else:
        _DIST = DistInfo(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if seed is not None:
        seed_everything(seed + _DIST.rank)
    return _DIST


def cleanup_dist() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def dist_info() -> DistInfo:
    return _DIST


def is_main() -> bool:
    return _DIST.rank == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (identity without a process group)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


# ============================================================================ LR schedule


def lr_at(step: int, total_steps: int, base_lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup from ~0 to ``base_lr`` over ``warmup`` steps, then cosine down to ``min_ratio·base_lr``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total_steps - warmup)
    frac = min(1.0, (step - warmup) / span)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


# ============================================================================ checkpoints


def _atomic_write(path: str, write_fn) -> None:
    """Write through a temp file in the same directory, fsync, then ``os.replace`` (atomic on POSIX):
    a crash mid-write leaves the previous file intact."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_weights(path: str, model: torch.nn.Module, config: dict) -> None:
    """Unwrapped model weights -> ``.safetensors`` with ``config`` as JSON in the metadata."""
    from safetensors.torch import save
    sd = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    data = save(sd, metadata={"config": json.dumps(config, default=str)})
    _atomic_write(path, lambda f: f.write(data))


def load_weights(path: str, model: torch.nn.Module | None = None, expect_config: dict | None = None,
                 strict: bool = True):
    """Load ``.safetensors`` weights (and their config). With ``expect_config``, every key it names must
    match the stored config, else ``ValueError`` listing the differences. Returns (state_dict, config)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    config = json.loads(meta.get("config", "{}"))
    if expect_config is not None:
        want = json.loads(json.dumps(expect_config, default=str))
        diff = {k: (config.get(k, "<missing>"), v) for k, v in want.items() if config.get(k, "<missing>") != v}
        if diff:
            lines = ", ".join(f"{k}: checkpoint={a!r} vs run={b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"{path}: config mismatch: {lines}")
    sd = load_file(path)
    if model is not None:
        unwrap(model).load_state_dict(sd, strict=strict)
    return sd, config


def save_checkpoint(run_dir: str, model: torch.nn.Module, config: dict, optimizer=None, step: int = 0,
                    extra: dict | None = None) -> None:
    """``run_dir/model.safetensors`` (weights + config) and ``run_dir/resume.pt`` (optimizer, step, RNG
    states, ``extra`` e.g. the data position), both written atomically. Call on rank 0 only."""
    save_weights(os.path.join(run_dir, "model.safetensors"), model, config)
    state = {
        "step": int(step),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "rng_torch": torch.get_rng_state(),
        "rng_numpy": json.dumps(_np_state()),
        "rng_python": json.dumps(random.getstate()),
        "config": json.dumps(config, default=str),
        "extra": json.dumps(extra or {}, default=str),
    }
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state()
    import io
    buf = io.BytesIO()
    torch.save(state, buf)
    _atomic_write(os.path.join(run_dir, "resume.pt"), lambda f: f.write(buf.getvalue()))


def _np_state():
    s = np.random.get_state()
    return [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]


def load_resume(run_dir: str, model: torch.nn.Module, optimizer=None, expect_config: dict | None = None):
    """Restore weights, optimizer and RNG states written by ``save_checkpoint``.
    Returns ``(step, extra)``; ``(0, {})`` when ``run_dir`` holds no checkpoint."""
    wpath, rpath = os.path.join(run_dir, "model.safetensors"), os.path.join(run_dir, "resume.pt")
    if not (os.path.exists(wpath) and os.path.exists(rpath)):
        return 0, {}
    load_weights(wpath, model, expect_config=expect_config)
    state = torch.load(rpath, weights_only=True, map_location="cpu")
    if optimizer is not None and state["optimizer"]:
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_torch"])
    s = json.loads(state["rng_numpy"])
    np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4]))
    random.setstate(_to_tuple(json.loads(state["rng_python"])))
    if "rng_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng_cuda"])
    return int(state["step"]), json.loads(state["extra"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x


# ============================================================================ progress


class ProgressLogger:
    """One line per ``interval`` steps on rank 0 (step/total, named losses, lr, grad norm, step time,
    throughput, ETA), also appended as JSON to ``run_dir/log.jsonl``."""

    def __init__(self, run_dir: str | None, total_steps: int, interval: int = 10, unit: str = "img"):
        self.run_dir, self.total, self.interval, self.unit = run_dir, total_steps, max(1, interval), unit
        self.t_last, self.step_last, self.items = time.time(), None, 0
        self.sums: dict = {}
        self.n = 0

    def log(self, step: int, losses: dict, lr: float = 0.0, grad_norm: float = float("nan"), items: int = 0,
            force: bool = False) -> dict | None:
        """Accumulate one step's numbers; print and write a line every ``interval`` steps (and at the end)."""
        if self.step_last is None:
            self.step_last = step - 1
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1
        self.items += items
        if not (force or (step + 1) % self.interval == 0 or step + 1 == self.total):
            return None
        now = time.time()
        steps = max(1, step - self.step_last)
        dt = (now - self.t_last) / steps
        rec = {"step": step + 1, "total": self.total, **{k: v / self.n for k, v in self.sums.items()},
               "lr": lr, "grad_norm": float(grad_norm), "step_time": dt,
               f"{self.unit}_per_s": self.items / max(now - self.t_last, 1e-9),
               "eta_s": dt * max(0, self.total - step - 1), "time": now}
        if is_main():
            terms = " ".join(f"{k} {v / self.n:.4f}" for k, v in self.sums.items())
            print(f"step {step + 1:6d}/{self.total} | {terms} | lr {lr:.2e} | gnorm {float(grad_norm):.3f} | "
                  f"{dt * 1000:.0f} ms/step | {rec[f'{self.unit}_per_s']:.3g} {self.unit}/s | "
                  f"eta {_fmt_time(rec['eta_s'])}", flush=True)
            self.write(rec)
        self.t_last, self.step_last, self.items, self.sums, self.n = now, step, 0, {}, 0
        return rec

    def write(self, rec: dict) -> None:
        if self.run_dir and is_main():
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def save_image_grid(path: str, images, nrow: int | None = None, pad: int = 2) -> str:
    """Save images as one PNG grid. ``images``: (N, C, H, W) tensor in [0, 1] (C = 1 or 3), or a list of
    rows, each a (n, C, H, W) tensor (rows may differ in image size; cells are padded). Returns ``path``."""
    from PIL import Image
    rows = [images[i:i + (nrow or len(images))] for i in range(0, len(images), nrow or len(images))] \
        if torch.is_tensor(images) else list(images)
    rows = [r.detach().float().cpu().clamp(0, 1) for r in rows]
    rows = [r.expand(-1, 3, -1, -1) if r.shape[1] == 1 else r[:, :3] for r in rows]
    cw = max(r.shape[-1] for r in rows) + pad
    ch = max(r.shape[-2] for r in rows) + pad
    ncol = max(len(r) for r in rows)
    canvas = torch.ones(3, ch * len(rows) + pad, cw * ncol + pad)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            y, x = pad + i * ch, pad + j * cw
            canvas[:, y:y + im.shape[-2], x:x + im.shape[-1]] = im
    arr = (canvas.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _atomic_write(path, lambda f: Image.fromarray(arr).save(f, format="PNG"))
    return path
