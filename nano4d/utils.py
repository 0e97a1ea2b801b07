"""Run plumbing for the training scripts: config flags (help text, recipes), distributed setup (DDP, gradient
accumulation, finite-step guard), LR schedule, progress logging (log.jsonl, optional TensorBoard) and PNG
image grids. Checkpoints and atomic writes live in ``nano4d.checkpoint``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import io
import json
import math
import os
import random
import sys
import textwrap
import time
import tokenize

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

from nano4d.files import atomic_write, image_grid

# ============================================================================ config flags


def flag(default, help: str, *, choices=None, resume_may_change: bool = False):
    """A config field with its ``--help`` text. ``choices``: allowed values. ``resume_may_change``: the field
    does not influence the trained result (I/O cadence, paths), so a resumed run may change it."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices,
                                                        "resume_may_change": resume_may_change})


@dataclasses.dataclass
class RunFlags:
    """The run flags every training script shares (its ``TrainConfig`` derives from this)."""
    amp: str = flag("auto", "autocast: auto = bf16 on CUDA, off on CPU", choices=("auto", "bf16", "off"))
    resume: str = flag("auto", "auto: continue from run_dir's checkpoint if there is one (exactly; the config must "
                       "match); weights: load its weights only, start at step 0; fresh: start over",
                       choices=("auto", "fresh", "weights"), resume_may_change=True)
    tensorboard: bool = flag(False, "also log to run_dir/tb (needs the tensorboard package)", resume_may_change=True)
    recipe: str = flag("default", "named bundle of flag values from RECIPES", resume_may_change=True)


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def _flag_type(default):
    if isinstance(default, bool):
        return dict(type=_parse_bool, metavar="{true,false}")
    if isinstance(default, tuple):
        elem = type(default[0]) if default else str
        elem = _parse_bool if elem is bool else elem
        return dict(type=lambda s: tuple(elem(x) for x in s.replace(",", " ").split()), metavar="A,B,..")
    if default is None:
        return dict(type=str)
    return dict(type=type(default))


def _source_comments(cls) -> dict:
    """``{field: comment}`` from trailing ``# comments`` on a dataclass's field lines (comment-only lines right
    below, starting in the same column, continue the comment)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    first, comments = {}, {}
    for t in tokenize.generate_tokens(io.StringIO(src).readline):
        if t.type == tokenize.COMMENT:
            comments[t.start[0]] = (t.start[1], t.string.lstrip("#").strip())
        if t.type not in (tokenize.INDENT, tokenize.DEDENT, tokenize.NL, tokenize.NEWLINE):
            first.setdefault(t.start[0], t)
    out, last, col = {}, None, -1
    for ln in sorted(first):
        t = first[ln]
        if t.type == tokenize.NAME and t.string in names and ln in comments:
            last, (col, out[last]) = t.string, comments[ln]
        elif t.type == tokenize.COMMENT and last is not None and t.start[1] == col:   # aligned continuation
            out[last] += " " + comments[ln][1]
        else:
            last = None
    return out


def _doc_mention(cls, name: str, limit: int = 220) -> str:
    """The sentence of the class's module docstring that first names ``name`` in double backticks (e.g. the list
    of official-behaviour flags in a model file), shortened to ``limit`` characters; '' if none."""
    doc = (sys.modules.get(cls.__module__).__doc__ or "") if cls.__module__ in sys.modules else ""
    text = " ".join(doc.split())
    i = min((j for j in (text.find(f"``{name}``"), text.find(f"``{name}=")) if j >= 0), default=-1)
    if i < 0:
        return ""
    start = max(text.rfind(". ", 0, i) + 2, text.rfind(" - ", 0, i) + 3, 0)
    end = text.find(". ", i)
    sent = text[start:len(text) if end < 0 else end + 1].replace("``", "")
    return sent if len(sent) <= limit else sent[:limit - 3].rstrip() + "..."


def _help(f: dataclasses.Field, comments: dict, cls) -> str:
    h = f.metadata.get("help") or comments.get(f.name) or _doc_mention(cls, f.name)
    return h or f"{cls.__name__}.{f.name} (described in the docstring of {cls.__module__})"


def parse_config(train_cls, model_cls=None, presets: dict | None = None, argv=None, default_preset="tiny",
                 recipes: dict | None = None, description: str | None = None):
    """Dataclass fields -> argparse flags (``allow_abbrev=False``; every flag has help text).

    ``train_cls`` fields become ``--field value``; ``model_cls`` fields (if given) become ``--model.field value``
    on top of ``--preset NAME`` (a key of ``presets``, each a ``model_cls`` instance). Help text comes from
    ``flag(..., help)`` / ``field(metadata={"help": ...})`` or a trailing ``# comment`` on the field's line.
    Tuples are given as ``--res 64,64``; bools as ``--flag true/false``.

    ``recipes``: ``{name: {train_field | "preset" | "model.<field>": value}}``; ``--recipe NAME`` applies one
    bundle (``default``, the empty bundle, is implicit), explicit flags override it. If ``train_cls`` has a
    ``recipe`` field, the chosen name is stored there.
    Returns the train config, or ``(train_cfg, model_cfg)`` when ``model_cls`` is given.
    """
    recipes = {"default": {}, **(recipes or {})}
    tfields = {f.name: f for f in dataclasses.fields(train_cls)}
    mfields = {f.name: f for f in dataclasses.fields(model_cls)} if model_cls is not None else {}
    for name, r in recipes.items():
        bad = [k for k in r if not (k in tfields or (model_cls is not None and (
            k == "preset" or (k.startswith("model.") and k[6:] in mfields))))]
        if bad:
            raise ValueError(f"recipe {name!r}: unknown key(s) {bad} (train fields, 'preset' or 'model.<field>')")
    if description is None:
        description = (sys.modules["__main__"].__doc__ or "").strip().split("\n")[0]
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    S = argparse.SUPPRESS
    tdefaults, tcom = train_cls(), _source_comments(train_cls)
    for f in tfields.values():
        if f.name == "recipe":
            p.add_argument("--recipe", dest="train__recipe", default=S, choices=sorted(recipes),
                           help=_help(f, tcom, train_cls) + " (explicit flags override the recipe's values)")
            continue
        d = getattr(tdefaults, f.name)
        kw = {"metavar": f.name.upper(), **_flag_type(d)}
        if f.metadata.get("choices"):
            kw["choices"] = list(f.metadata["choices"])
            kw.pop("metavar", None)
        p.add_argument(f"--{f.name}", dest=f"train__{f.name}", default=S,
                       help=f"{_help(f, tcom, train_cls)} (default: {d!r})".replace("%", "%%"), **kw)
    if model_cls is not None:
        presets = presets or {}
        p.add_argument("--preset", default=S, choices=sorted(presets) or None,
                       help=f"model preset: named {model_cls.__name__} (default: {default_preset!r}); "
                            "--model.<field> flags override its fields")
        base = presets.get(default_preset, model_cls())
        mcom = _source_comments(model_cls)
        for f in mfields.values():
            ref = getattr(base, f.name)
            p.add_argument(f"--model.{f.name}", dest=f"model__{f.name}", default=S,
                           help=f"{_help(f, mcom, model_cls)} (default: the preset's value)".replace("%", "%%"),
                           **{"metavar": f.name.upper(), **_flag_type(ref)})
    args = vars(p.parse_args(argv))
    rname = args.get("train__recipe", "default")
    recipe = recipes[rname]
    tvals = {k: v for k, v in recipe.items() if k in tfields}
    tvals.update({k[7:]: v for k, v in args.items() if k.startswith("train__")})
    if "recipe" in tfields:
        tvals["recipe"] = rname
    train = dataclasses.replace(tdefaults, **tvals)
    if model_cls is None:
        return train
    preset = args.get("preset", recipe.get("preset", default_preset if default_preset in (presets or {}) else None))
    if preset is not None and preset not in presets:
        raise ValueError(f"recipe {rname!r}: unknown preset {preset!r} (presets: {sorted(presets)})")
    over = {k[6:]: v for k, v in recipe.items() if k.startswith("model.")}
    over.update({k[7:]: v for k, v in args.items() if k.startswith("model__")})
    return train, dataclasses.replace(presets[preset] if preset is not None else model_cls(), **over)


def config_to_dict(*cfgs, **named) -> dict:
    """Dataclass configs -> a JSON-able dict (tuples become lists)."""
    out = {}
    for c in cfgs:
        out.update(dataclasses.asdict(c))
    for k, c in named.items():
        out[k] = json.loads(json.dumps(dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c, default=str))
    return out


def format_config(**named) -> str:
    """The resolved configs as ``name: field=value ...`` lines, for printing at the start of a run."""
    lines = []
    for k, c in named.items():
        d = dataclasses.asdict(c) if dataclasses.is_dataclass(c) else dict(c)
        lines.append(f"{k}: " + " ".join(f"{n}={v!r}" for n, v in d.items()))
    return "\n".join(lines)


def resume_config(train) -> dict:
    """The train-config fields a resumed run must share with its checkpoint (all but ``resume_may_change``)."""
    keep = {f.name for f in dataclasses.fields(train) if not f.metadata.get("resume_may_change")}
    return {k: v for k, v in config_to_dict(t=train)["t"].items() if k in keep}


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
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main() -> bool:
    return _DIST.rank == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (identity without a process group)."""
    if _dist_on():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def sync_buffers(model: torch.nn.Module) -> None:
    """Broadcast every buffer (BatchNorm statistics, ...) from rank 0, so all ranks hold identical state before
    evaluation and checkpoints (DDP syncs buffers only at the start of a forward, each rank keeps its last update)."""
    if _dist_on():
        for b in model.buffers():
            dist.broadcast(b.data, 0)


def broadcast_state(model: torch.nn.Module) -> None:
    """Broadcast every parameter and buffer from rank 0 (once, after building/loading the model): parts that DDP
    does not wrap (e.g. a later stage's network) then start identical on all ranks too."""
    if _dist_on():
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, 0)


def grad_sync(dmodel: torch.nn.Module, micro: int, grad_accum: int):
    """The one accumulation idiom: a FRESH ``no_sync()`` context for every micro-step but the last (gradients are
    all-reduced once, in the last backward), entered around forward AND backward::

        for micro in range(grad_accum):
            with grad_sync(dmodel, micro, grad_accum):
                with amp: loss = ...
                (loss / grad_accum).backward()
    """
    if isinstance(dmodel, DDP) and micro < grad_accum - 1:
        return dmodel.no_sync()
    return contextlib.nullcontext()


def autocast(device: torch.device, amp: str = "auto"):
    """``amp``: ``auto`` (bf16 autocast on CUDA, none on CPU), ``bf16`` (on any device) or ``off``."""
    if amp not in ("auto", "bf16", "off"):
        raise ValueError(f"--amp must be auto, bf16 or off, got {amp!r}")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def rng_isolated():
    """Run a block (evaluation, previews) without touching the training RNG streams (torch CPU/CUDA, numpy,
    python): what it draws does not change what training draws next."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def inject_nan(loss: torch.Tensor, step: int) -> torch.Tensor:
    """Test hook: with env ``NANO4D_INJECT_NAN_STEP=s`` (and ``NANO4D_INJECT_NAN_RANK=r``, default 0), the loss of
    step ``s`` on rank ``r`` becomes NaN (and so do the gradients). Identity otherwise."""
    s = os.environ.get("NANO4D_INJECT_NAN_STEP")
    if s is not None and int(s) == step and int(os.environ.get("NANO4D_INJECT_NAN_RANK", "0")) == _DIST.rank:
        return loss * float("nan")
    return loss


def finite_step(terms: dict, grad_norm, step: int, run_dir: str = "") -> dict:
    """Call after backward (and gradient clipping), before ``optimizer.step()``, on every rank.

    One all-reduce gives the mean of the named loss ``terms`` over ranks and whether every rank's terms and
    the gradient norm are finite. If any is not, every rank stops together: ranks print their local terms,
    rank 0 names the step, and the process exits with status 1 (no optimizer step, no checkpoint written).
    Returns the rank-mean terms (floats) for logging."""
    names = list(terms)
    local = [float(terms[k]) for k in names]
    gn = float(grad_norm)
    bad = not (all(math.isfinite(v) for v in local) and math.isfinite(gn))
    v = torch.tensor(local + [1.0 if bad else 0.0], dtype=torch.float64)
    world = 1
    if _dist_on():
        v = v.to(_DIST.device)
        dist.all_reduce(v)
        v = v.cpu()
        world = dist.get_world_size()
    mean = {k: float(v[i]) / world for i, k in enumerate(names)}
    nbad = int(v[-1].item())
    if nbad:
        if bad:
            print(f"rank {_DIST.rank}: non-finite at step {step}: "
                  + " ".join(f"{k} {x:.6g}" for k, x in zip(names, local)) + f" grad_norm {gn:.6g}", flush=True)
        print0(f"stopping: non-finite loss or gradient norm at step {step} on {nbad} rank(s); no update applied, "
               f"no checkpoint written" + (f"; the last good checkpoint in {run_dir} is kept" if run_dir else ""))
        cleanup_dist()
        raise SystemExit(1)
    return mean


# ============================================================================ LR schedule


def lr_at(step: int, total_steps: int, base_lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup from ~0 to ``base_lr`` over ``warmup`` steps, then cosine down to ``min_ratio·base_lr``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total_steps - warmup)
    frac = min(1.0, (step - warmup) / span)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


# ============================================================================ progress


class ProgressLogger:
    """Rank 0's progress: one line per ``interval`` steps (step/total, named losses, lr, grad norm, step time,
    throughput, ETA) and eval lines; every line is also a JSON record in ``run_dir/log.jsonl``:
    ``{"kind": "train", "step": s, ...}`` and ``{"kind": "eval", "step": s, "split": "val", "metrics": {...}}``
    (``step`` = optimizer steps done). ``tensorboard=True`` also writes scalars to ``run_dir/tb``
    (needs the ``tensorboard`` package: ``pip install -e '.[tensorboard]'``)."""

    def __init__(self, run_dir: str | None, total_steps: int, interval: int = 10, unit: str = "img",
                 tensorboard: bool = False):
        self.run_dir, self.total, self.interval, self.unit = run_dir, total_steps, max(1, interval), unit
        self.t_last, self.step_last, self.items = time.time(), None, 0
        self.sums: dict = {}
        self.n = 0
        self.tb = None
        if tensorboard and is_main():
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard "
                                  "(or pip install -e '.[tensorboard]')") from e
            self.tb = SummaryWriter(os.path.join(run_dir or ".", "tb"))

    def log(self, step: int, losses: dict, lr: float = 0.0, grad_norm: float = float("nan"), items: int = 0,
            force: bool = False, **fields) -> dict | None:
        """Accumulate step ``step`` (0-based)'s numbers; print and write a record every ``interval`` steps (and
        at the end). ``fields``: constant extra keys for the record (e.g. ``stage``)."""
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
        rec = {"kind": "train", "step": step + 1, "total": self.total, **fields,
               **{k: v / self.n for k, v in self.sums.items()},
               "lr": lr, "grad_norm": float(grad_norm), "step_time": dt,
               f"{self.unit}_per_s": self.items / max(now - self.t_last, 1e-9),
               "eta_s": dt * max(0, self.total - step - 1), "time": now}
        if is_main():
            terms = " ".join(f"{k} {v / self.n:.4f}" for k, v in self.sums.items())
            print(f"step {step + 1:6d}/{self.total} | {terms} | lr {lr:.2e} | gnorm {float(grad_norm):.3f} | "
                  f"{dt * 1000:.0f} ms/step | {rec[f'{self.unit}_per_s']:.3g} {self.unit}/s | "
                  f"eta {_fmt_time(rec['eta_s'])}", flush=True)
            self.write(rec)
            if self.tb is not None:
                for k, v in self.sums.items():
                    self.tb.add_scalar(f"train/{k}", v / self.n, step + 1)
                self.tb.add_scalar("train/lr", lr, step + 1)
                self.tb.add_scalar("train/grad_norm", float(grad_norm), step + 1)
        self.t_last, self.step_last, self.items, self.sums, self.n = now, step, 0, {}, 0
        return rec

    def eval(self, step: int, metrics: dict, split: str = "val", **fields) -> dict:
        """Print and write one eval record ``{"kind": "eval", "step", "split", "metrics", **fields}``."""
        rec = {"kind": "eval", "step": int(step), "split": split, **fields,
               "metrics": {k: float(v) for k, v in metrics.items()}}
        if is_main():
            tag = " ".join(f"{k} {v}" for k, v in fields.items())
            print(f"eval {split} step {step}{' ' + tag if tag else ''} | "
                  + " | ".join(f"{k} {v:.4f}" for k, v in rec["metrics"].items()), flush=True)
            self.write(rec)
            if self.tb is not None:
                for k, v in rec["metrics"].items():
                    self.tb.add_scalar(f"{split}/{k}", v, step)
        return rec

    def image(self, tag: str, images, step: int) -> None:
        """A preview to TensorBoard, when enabled: a PNG path (e.g. what ``save_image_grid`` wrote) or anything
        ``image_grid`` takes."""
        if self.tb is None:
            return
        if isinstance(images, str):
            if not os.path.exists(images):
                return
            with Image.open(images) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
            grid = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255
        else:
            grid = image_grid(images)
        self.tb.add_image(tag, grid, step)

    def write(self, rec: dict) -> None:
        if self.run_dir and is_main():
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.tb is not None:
                self.tb.flush()

    def truncate(self, step: int) -> None:
        """Drop the records a resumed run redoes: keep those with ``step <= step`` (none when ``step == 0``)."""
        path = os.path.join(self.run_dir or "", "log.jsonl")
        if not (self.run_dir and is_main() and os.path.exists(path)):
            return
        keep = []
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue                                   # a line torn by a kill
                if step > 0 and int(rec.get("step", 0)) <= step:
                    keep.append(json.dumps(rec) + "\n")
        atomic_write(path, "".join(keep).encode())


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
