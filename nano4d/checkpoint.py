"""Checkpoints and atomic file writes.

Both files of a checkpoint are written with ``nano4d.files.atomic_write`` (temp file, fsync, ``os.replace``):
a crash leaves either the old or the new file, never a torn one.

A run directory holds one checkpoint, written in this order:

    resume.pt          THE checkpoint, self-contained: model state, optimizer state, step, every rank's RNG
                       streams (torch, CUDA, numpy, python, named ``torch.Generator``s), the data position and
                       script extras, the config. ``torch.load(weights_only=True)`` reads it.
    model.safetensors  the unwrapped model's weights for users and ``Model.from_checkpoint``; safetensors
                       metadata ``"config"`` = JSON ``{"model": {...}, "train": {...}, "step": k}``.

``model.safetensors`` is an export of ``resume.pt``. A kill between the two writes leaves ``resume.pt`` one
checkpoint ahead of (or without) ``model.safetensors``; ``load_checkpoint`` restores everything from
``resume.pt`` alone and rewrites the stale export, so no update is ever applied twice. ``model.safetensors``
without ``resume.pt`` cannot be resumed exactly and is refused unless weights-only loading is asked for.
Unreadable files raise ``CheckpointError`` (a ``ValueError``) naming the file and what to do.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from nano4d.files import atomic_write

RESUME = "resume.pt"
WEIGHTS = "model.safetensors"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint or resume file that cannot be used: corrupt, truncated, missing its partner, or written by
    a run with a different config. The message names the file and what to do."""


# ============================================================================ atomic writes


# ============================================================================ weights


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous().clone() for k, v in unwrap(model).state_dict().items()}


def _check_finite(sd: dict, what: str) -> None:
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"refusing to write {what}: {len(bad)} tensor(s) hold NaN/Inf (first: {bad[0]})")


def save_weights(path: str, model, config: dict, step: int | None = None) -> str:
    """Weights of the unwrapped ``model`` (or a state dict) -> ``.safetensors`` with ``config`` (plus ``step``)
    as JSON under the metadata key ``"config"``. Refuses non-finite weights (``FloatingPointError``)."""
    from safetensors.torch import save
    sd = _cpu_state(model) if isinstance(model, torch.nn.Module) else {k: v.detach().cpu().contiguous()
                                                                        for k, v in model.items()}
    _check_finite(sd, path)
    meta = dict(config) if step is None else {**config, "step": int(step)}
    return atomic_write(path, save(sd, metadata={"config": json.dumps(meta, default=str)}))


def read_weights_config(path: str) -> dict:
    """The ``"config"`` metadata of a ``.safetensors`` file, without reading the tensors."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta.get("config", "{}"))
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); "
                              "it is corrupt or truncated: restore it, or delete it and rerun") from e


def config_diff(stored: dict, want: dict, prefix: str = "") -> list[str]:
    """Lines ``key: checkpoint=... vs run=...`` for every key of ``want`` (nested dicts walked) that differs."""
    want = json.loads(json.dumps(want, default=str))
    out = []
    for k, v in sorted(want.items()):
        s = stored.get(k, "<missing>") if isinstance(stored, dict) else "<missing>"
        if isinstance(v, dict) and isinstance(s, dict):
            out += config_diff(s, v, f"{prefix}{k}.")
        elif s != v:
            out.append(f"{prefix}{k}: checkpoint={s!r} vs run={v!r}")
    return out


def load_weights(path: str, model: torch.nn.Module | None = None, expect_config: dict | None = None,
                 strict: bool = True):
    """Load ``.safetensors`` weights and their config; with ``model``, into its unwrapped module. With
    ``expect_config``, every key it names must match the stored config, else ``CheckpointError`` listing the
    differences. Returns ``(state_dict, config)``."""
    from safetensors.torch import load_file
    config = read_weights_config(path)
    if expect_config is not None:
        diff = config_diff(config, expect_config)
        if diff:
            raise CheckpointError(f"{path}: config mismatch: " + ", ".join(diff))
    try:
        sd = load_file(path)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the weights ({type(e).__name__}: {e}); the file is corrupt or "
                              "truncated: restore it, or delete it and rerun") from e
    if model is not None:
        unwrap(model).load_state_dict(sd, strict=strict)
    return sd, config


# ============================================================================ RNG streams


def rng_state(generators: dict | None = None) -> dict:
    """This process's RNG streams: torch CPU (+ current CUDA device), numpy, python, and named generators."""
    np_s = np.random.get_state()
    s = {"torch": torch.get_rng_state(),
         "numpy": json.dumps([np_s[0], np_s[1].tolist(), int(np_s[2]), int(np_s[3]), float(np_s[4])]),
         "python": json.dumps(random.getstate()),
         "generators": {k: g.get_state() for k, g in (generators or {}).items()}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x


def set_rng_state(s: dict, generators: dict | None = None) -> None:
    """Restore what ``rng_state`` returned (a named generator missing from the state raises ``KeyError``)."""
    torch.set_rng_state(s["torch"])
    n = json.loads(s["numpy"])
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    random.setstate(_to_tuple(json.loads(s["python"])))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    for k, g in (generators or {}).items():
        g.set_state(s["generators"][k])


# ============================================================================ checkpoints


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def save_checkpoint(run_dir: str, model: torch.nn.Module, config: dict, optimizer=None, step: int = 0,
                    extra: dict | None = None, generators: dict | None = None, rank_extra: dict | None = None) -> None:
    """Write ``run_dir/resume.pt`` (the self-contained checkpoint), then ``run_dir/model.safetensors``.

    Call on EVERY rank: each rank's RNG streams (and ``generators``, e.g. a mask generator) are gathered into
    ``resume.pt``; rank 0 writes. ``extra``: JSON-able script state (data position, stage, metrics);
    ``rank_extra``: JSON-able state that differs per rank (e.g. a sharded sampler's position), gathered like the
    RNG streams. Model and optimizer state must be identical on all ranks (DDP; sync buffers first). Refuses
    non-finite weights."""
    sd = _cpu_state(model)
    _check_finite(sd, os.path.join(run_dir, RESUME))   # every rank holds the same weights: all refuse together
    mine = {**rng_state(generators), "extra": json.dumps(rank_extra or {}, default=str)}
    ranks = [mine]
    if _dist_on():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
        if dist.get_rank() != 0:
            return
    state = {"format": FORMAT, "step": int(step), "world_size": len(ranks), "model": sd,
             "optimizer": optimizer.state_dict() if optimizer is not None else {},
             "ranks": ranks, "config": json.dumps(config, default=str), "extra": json.dumps(extra or {}, default=str)}
    atomic_write(os.path.join(run_dir, RESUME), lambda f: torch.save(state, f))   # streamed: no in-memory copy
    save_weights(os.path.join(run_dir, WEIGHTS), sd, config, step=step)


def read_resume(path: str) -> dict:
    """``resume.pt`` as a dict (weights-only unpickling); ``CheckpointError`` naming the file if unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the resume state ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); the file is corrupt or truncated: restore "
                              "it, or rerun with --resume weights (weights only, from model.safetensors) or "
                              "--resume fresh (start over)") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise CheckpointError(f"{path}: not a nano4d resume file of format {FORMAT} (keys: "
                              f"{sorted(state) if isinstance(state, dict) else type(state).__name__}); rerun with "
                              "--resume weights or --resume fresh")
    return state


@dataclasses.dataclass
class Resumed:
    """What ``load_checkpoint`` restored: the next step to run, the script's ``extra`` dict, this rank's
    ``rank_extra``, the stored config, and the stored optimizer state (for scripts that build their optimizer
    later, e.g. per stage)."""
    step: int
    extra: dict
    config: dict
    weights_only: bool = False
    optimizer: dict = dataclasses.field(default_factory=dict)
    rank_extra: dict = dataclasses.field(default_factory=dict)


def load_checkpoint(run_dir: str, model: torch.nn.Module, optimizer=None, mode: str = "auto",
                    expect_config: dict | None = None, generators: dict | None = None) -> Resumed | None:
    """Restore a run from ``run_dir``. Call on every rank, after building model and optimizer.

    ``mode``: ``"auto"`` resumes from ``resume.pt`` (model, optimizer, this rank's RNG streams and
    ``generators``; ``None`` when the run dir holds no checkpoint); ``"weights"`` loads only the model weights
    (from ``model.safetensors``, else ``resume.pt``) and starts at step 0; ``"fresh"`` ignores what is there
    (returns ``None``). ``expect_config``: nested dict that must match the stored config, else
    ``CheckpointError`` listing the differences (``"weights"`` mode checks only its ``"model"`` part)."""
    if mode not in ("auto", "fresh", "weights"):
        raise ValueError(f"resume mode must be auto, fresh or weights, got {mode!r}")
    rpath, wpath = os.path.join(run_dir, RESUME), os.path.join(run_dir, WEIGHTS)
    has_r, has_w = os.path.exists(rpath), os.path.exists(wpath)
    if mode == "fresh" or not (has_r or has_w):
        return None
    if mode == "weights":
        want = {"model": expect_config["model"]} if expect_config and "model" in expect_config else None
        if has_w:
            _, cfg = load_weights(wpath, model, expect_config=want)
        else:
            state = read_resume(rpath)
            cfg = json.loads(state["config"])
            _raise_diff(rpath, cfg, want)
            unwrap(model).load_state_dict(state["model"])
        return Resumed(0, {}, cfg, weights_only=True)
    if not has_r:
        step = read_weights_config(wpath).get("step", "?")
        raise CheckpointError(
            f"{rpath} is missing next to {wpath} (step {step}): the run cannot be resumed exactly. Rerun with "
            "--resume weights to start from these weights at step 0 (fresh optimizer and schedule), "
            "--resume fresh to start over (overwrites them), or restore resume.pt")
    state = read_resume(rpath)
    cfg = json.loads(state["config"])
    _raise_diff(rpath, cfg, expect_config)
    try:
        unwrap(model).load_state_dict(state["model"])
        if optimizer is not None and state["optimizer"]:
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{rpath}: does not fit this model/optimizer ({e}); rerun with --resume fresh") from e
    rank, world = (dist.get_rank(), dist.get_world_size()) if _dist_on() else (0, 1)
    rank_extra = {}
    if state["world_size"] == world:
        set_rng_state(state["ranks"][rank], generators)
        rank_extra = json.loads(state["ranks"][rank].get("extra", "{}"))
    elif rank == 0:
        print(f"WARNING: {rpath} was written by {state['world_size']} process(es), this run has {world}: "
              "RNG streams are not restored (the run continues, but not bit-identically)", flush=True)
    step = int(state["step"])
    if rank == 0:
        stale = None
        if not has_w:
            stale = "missing"
        else:
            wstep = read_weights_config(wpath).get("step")
            if wstep != step:
                stale = f"at step {wstep}"
        if stale:   # a kill between the two writes: resume.pt is the checkpoint, re-export its weights
            print(f"note: {wpath} was {stale} (interrupted checkpoint write); rewritten from {rpath} "
                  f"(step {step})", flush=True)
            save_weights(wpath, state["model"], cfg, step=step)
    return Resumed(step, json.loads(state["extra"]), cfg, optimizer=state["optimizer"], rank_extra=rank_extra)


def _raise_diff(path: str, stored: dict, want: dict | None) -> None:
    diff = config_diff(stored, want) if want else []
    if diff:
        raise CheckpointError(f"{path}: the run's config differs from the checkpoint's: " + "; ".join(diff) +
                              ". Rerun with the checkpoint's values, or --resume fresh to start over "
                              "(--resume weights keeps only the weights)")
