"""Train MIM4D (masked multi-view video pretraining with SDF volume rendering).

    python train_mim4d.py                                     # tiny preset, procedural driving scenes
    torchrun --standalone --nproc_per_node=2 train_mim4d.py   # the same on 2 processes (gloo on CPU)
    python train_mim4d.py --data path/to/rigs --recipe paper  # nuScenes-style rig JSON files, the vs0.1 recipe
    python train_mim4d.py --data nuscenes:/data/nuscenes --recipe paper --num_workers 8   # nuScenes itself

``--recipe paper`` is the official vs0.1 pretraining recipe: the paper preset (ConvNeXt-B, 128x128x5 volume),
AdamW lr 4e-4 (backbone x0.1), weight decay 0.01, gradient clip 35, 500 warmup steps from lr/3 then cosine to
1e-3 lr, 12 epochs, bf16 autocast, EMA of the weights (decay 0.999 ramped by 1 - exp(-t/2000)) saved as
``ema.safetensors`` (``MIM4D.from_checkpoint(run_dir, ema=True)``). ``--backbone_init`` loads ImageNet ConvNeXt
weights (facebookresearch or timm layout) or the image backbone of a released MIM4D checkpoint at step 0.

Every step: T frames x 6 cameras per sample, 30 % of each image's 32-px patches masked, per-frame voxel
volumes, a dropped frame's volume predicted from the others, and both the predicted and the directly
encoded volume rendered (NeuS) into the target frame's cameras and supervised with RGB + depth.
Held-out eval: RGB PSNR and depth AbsRel / L1 of the *predicted* volume vs a baseline that copies the
nearest other frame's volume warped by ego-motion only.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Dataset

from nano4d import utils as U
from nano4d.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nano4d.data.driving import ProceduralDriving
from nano4d.data.nuscenes import NuScenesDataset
from nano4d.data.rig import RigDataset, lidar_to_depths
from nano4d.data.sampling import ResumableSampler, Stream
from nano4d.files import atomic_write, clean_stale_tmp, colorize, save_image_grid, save_json
from nano4d.metrics import psnr
from nano4d.mim4d import EMA, MIM4D, PRESETS, MIM4DConfig, read_safetensors, sample_rays
from nano4d.utils import flag

# Named bundles of flag values (train fields, "preset", "model.<field>"): --recipe NAME; explicit flags win.
RECIPES: dict = {
    # hustvl/MIM4D projects/configs/MIM4D/uvtr_convnext_s_vs0.1_pretrain.py (8 GPUs x 1 sample: --batch_size 1
    # under an 8-process torchrun reproduces its batch of 8)
    "paper": {"preset": "paper", "lr": 4e-4, "backbone_lr_mult": 0.1, "weight_decay": 0.01, "grad_clip": 35.0,
              "warmup": 500, "warmup_from": 1 / 3, "min_lr_ratio": 1e-3, "epochs": 12.0, "amp": "bf16",
              "ema_decay": 0.999, "ema_ramp": 2000.0},
}


@dataclass
class TrainConfig(U.RunFlags):
    run_dir: str = flag("runs/mim4d", "output folder: weights, resume state, log.jsonl, previews, metrics.json; a run "
                        "resumes from it", resume_may_change=True)
    data: str = flag("", "'' = procedural scenes; nuscenes:ROOT = nuScenes (v1.0-trainval if ROOT has it, else "
                     "v1.0-mini; official train/val split); else a rig JSON file or folder (nuScenes-style)")
    num_train: int = flag(48, "procedural training scenes (split 'train', rendered on demand)")
    num_val: int = flag(4, "held-out samples (procedural split 'val', nuScenes' val split, or the first windows of "
                        "a rig folder), kept in memory")
    num_workers: int = flag(0, "DataLoader worker processes per rank (0 = read/render in the training process)")
    batch_size: int = flag(1, "samples per rank per micro-step")
    grad_accum: int = flag(1, "micro-steps per optimizer step (gradients all-reduced once, at the last)")
    steps: int = flag(400, "optimizer steps (ignored when --epochs > 0)")
    epochs: float = flag(0.0, "if > 0: train this many passes over the training samples (sets the step count)")
    lr: float = flag(4e-4, "peak lr")
    backbone_lr_mult: float = flag(0.1, "lr multiplier of the image backbone")
    min_lr_ratio: float = flag(1e-3, "cosine decays to min_lr_ratio * lr")
    weight_decay: float = flag(0.01, "AdamW weight decay")
    warmup: int = flag(40, "linear lr warmup steps")
    warmup_from: float = flag(0.0, "the warmup starts at warmup_from * lr (the official recipe: 1/3)")
    ema_decay: float = flag(0.0, "EMA of the weights with this decay (0 = off), saved as run_dir/ema.safetensors")
    ema_ramp: float = flag(2000.0, "EMA decay ramp: decay * (1 - exp(-t / ema_ramp)) after t updates (0 = none)")
    backbone_init: str = flag("", "at step 0, load ImageNet ConvNeXt weights (facebookresearch or timm layout) "
                              "or a released MIM4D checkpoint's image backbone + FPN (.pth / .safetensors)")
    grad_clip: float = flag(35.0, "gradient-norm clip")
    log_every: int = flag(10, "steps per progress line", resume_may_change=True)
    eval_every: int = flag(100, "steps per held-out eval + preview; 0 = only at the start and the end",
                           resume_may_change=True)
    ckpt_every: int = flag(100, "steps per checkpoint; 0 = only at the end", resume_may_change=True)
    seed: int = flag(0, "seed (data order: seed + epoch; rank r: seed + 100 r for masks, targets and rays)")


KEYS = ("images", "depths", "K", "cam2ego", "ego2world", "lidar2ego")


class Samples(Dataset):
    """Items of a driving dataset as the model takes them (``KEYS``), read or rendered when asked for: depth
    from LiDAR when the source has no rendered depth; without a LiDAR calibration the volume is taken in the
    ego frame."""

    def __init__(self, ds, ids, img_size):
        self.ds, self.ids, self.img_size = ds, list(ids), tuple(img_size)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        s = self.ds[self.ids[i]]
        if "depths" not in s:
            s["depths"] = lidar_to_depths(s["lidar"], s["lidar_mask"], s["K"], s["cam2ego"], *self.img_size)
        if "lidar2ego" not in s:
            s["lidar2ego"] = torch.eye(4)
        return {k: s[k] for k in KEYS}


def make_data(tc: TrainConfig, mc: MIM4DConfig, split: str) -> Samples:
    """The split as a map-style dataset (an index; every item is read or rendered when asked for)."""
    if tc.data.startswith("nuscenes:"):
        root = tc.data[len("nuscenes:"):]
        version = "v1.0-trainval" if os.path.isdir(os.path.join(root, "v1.0-trainval")) else "v1.0-mini"
        ds = NuScenesDataset(root, version=version, split=split, num_frames=mc.num_frames, res=mc.img_size)
        ids = range(len(ds)) if split == "train" else range(min(tc.num_val, len(ds)))
    elif tc.data:
        ds = RigDataset(tc.data, num_frames=mc.num_frames, res=mc.img_size)
        n = len(ds)
        n_val = min(tc.num_val, max(1, n // 10))                               # the first windows are held out
        ids = range(n_val) if split == "val" else range(n_val, n) if n > n_val else [0]
    else:
        n = tc.num_train if split == "train" else tc.num_val
        ds = ProceduralDriving(num_scenes=n, num_frames=mc.num_frames, res=mc.img_size, split=split, seed=tc.seed)
        ids = range(n)
    return Samples(ds, ids, mc.img_size)


def collate(samples, device):
    return {k: torch.stack([s[k] for s in samples]).to(device) for k in samples[0]}


@torch.no_grad()
def evaluate(model, val, device, run_dir=None, step=0):
    """Held-out, through the model's front door in eval mode: every frame of each sample rendered from (a) the
    predicted volume, (b) the warp-only baseline, (c) the directly encoded volume; RGB PSNR and depth AbsRel /
    L1 (metres) on rays with ground truth. Masks and rays are drawn from a fixed seed."""
    model.eval()
    acc = {}
    preview = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(1234)
        for i, s in enumerate(val):
            b = collate([s], device)
            _, out = model(b)
            for t, rays in enumerate(out["rays"]):
                gt_rgb = out["rgb_gt"][t][0]
                for name, renders in out["renders"].items():
                    ren = renders[t]
                    m = (rays.valid & ren.hit)[0]
                    rgb, dep, gt = ren.rgb[0][m], ren.depth[0][m], rays.depth[0][m]
                    vals = {f"{name}_psnr": psnr(rgb.T[None, :, :, None], gt_rgb[m].T[None, :, :, None]).item(),
                            f"{name}_absrel": ((dep - gt).abs() / gt).mean().item(),
                            f"{name}_l1": (dep - gt).abs().mean().item()}
                    for k, v in vals.items():
                        acc.setdefault(k, []).append(v)
            if run_dir and i < 2:                                               # preview: front camera, newest frame
                preview.extend(render_preview(model, b))
    if run_dir and preview and U.is_main():
        save_image_grid(os.path.join(run_dir, f"preview_{step:06d}.png"), preview,
                        labels=["RGB: GT | pred | warp", "depth: GT | pred | warp"] * (len(preview) // 2))
    model.train()
    return {k: sum(v) / len(v) for k, v in acc.items()}


@torch.no_grad()
def render_preview(model, b, cam=0):
    """Two preview rows for one sample, the newest frame's camera ``cam`` at full rig resolution, one ray per pixel
    through the front door (eval mode): target image | RGB from the predicted volume | RGB from the warp-only
    baseline, and GT z-depth | predicted z-depth | baseline z-depth (turbo over 0 .. the box half-size)."""
    T, N = b["images"].shape[1:3]
    H, W = b["images"].shape[-2:]
    tgt = T - 1
    rays = sample_rays(model.cfg, b["depths"][:, tgt, cam:cam + 1], b["K"][:, cam:cam + 1],
                       b["cam2ego"][:, cam:cam + 1], b["lidar2ego"])
    rays = rays._replace(pixels=rays.pixels + cam * H * W)                     # index into all N cameras
    _, out = model(dict(b, targets=[tgt], rays=[rays]))
    pred, warp = out["renders"]["pred"][0], out["renders"]["warp"][0]
    v, u = torch.meshgrid(torch.arange(H, device=rays.dirs.device) + 0.5,
                          torch.arange(W, device=rays.dirs.device) + 0.5, indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], -1).reshape(-1, 3)
    ray_len = (pix @ torch.linalg.inv(b["K"][0, cam].float()).T).norm(dim=-1)  # ray distance per unit z-depth
    zmax = max(abs(x) for x in model.cfg.pc_range)
    zs = [b["depths"][0, tgt, cam, 0].float()] + [(r.depth[0] / ray_len).reshape(H, W) for r in (pred, warp)]
    rgb = [b["images"][0, tgt, cam].float()] + [r.rgb[0].reshape(H, W, 3).permute(2, 0, 1) for r in (pred, warp)]
    z = torch.stack(zs).cpu()
    return [torch.stack(rgb).cpu(), colorize(torch.where(z > 0, z, float("nan")), 0.0, zmax)]


# ----------------------------------------------------------------------------- EMA beside the checkpoint
# ema.safetensors holds the averaged weights (config metadata like model.safetensors, plus the EMA state).
# Written in step with the checkpoint: ema.next.safetensors first, then the checkpoint, then renamed over
# ema.safetensors, so after a kill at any point one of the two files matches resume.pt's step.

def save_ema(run_dir, ema, config, step):
    from safetensors.torch import save
    meta = {"config": json.dumps({**config, "step": step}, default=str),
            "ema": json.dumps({"decay": ema.decay, "ramp": ema.ramp, "updates": ema.updates, "step": step})}
    nxt = os.path.join(run_dir, "ema.next.safetensors")
    atomic_write(nxt, save({k: v.contiguous() for k, v in ema.shadow.items()}, metadata=meta))
    return nxt


def load_ema(run_dir, ema, step) -> bool:
    """Restore the EMA saved with checkpoint ``step``; False if neither EMA file matches it."""
    for name in ("ema.next.safetensors", "ema.safetensors"):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            shadow, meta = read_safetensors(path)
            state = json.loads(meta.get("ema", "{}"))
            if state.get("step") == step:
                ema.load_state_dict({**state, "shadow": shadow})
                return True
    return False


def init_backbone(model, path):
    """--backbone_init: a MIM4D pretrain checkpoint (img_backbone.* keys) or ImageNet ConvNeXt weights."""
    sd = read_safetensors(path)[0] if path.endswith(".safetensors") else torch.load(path, map_location="cpu",
                                                                                    weights_only=True)
    sd = sd.get("state_dict", sd.get("model", sd)) if isinstance(sd, dict) else sd
    if any(k.startswith("img_backbone.") for k in sd):
        model.load_official_backbone(sd)
    else:
        model.load_imagenet_convnext(sd)


def lr_at(tc, step, steps):
    """Linear warmup from ``warmup_from`` x lr, then cosine to ``min_lr_ratio`` x lr."""
    lr = U.lr_at(step, steps, tc.lr, tc.warmup, tc.min_lr_ratio)
    if tc.warmup_from > 0 and step < tc.warmup:
        lr = tc.lr * (tc.warmup_from + (1 - tc.warmup_from) * (step + 1) / tc.warmup)
    return lr


def run_eval(model, val, device, run_dir, step, log):
    """Rank 0 evaluates the held-out set (every rank holds the same weights and buffers); the others wait."""
    U.sync_buffers(model)
    ev = None
    if U.is_main():
        with U.rng_isolated():
            ev = evaluate(model, val, device, run_dir, step)
        log.eval(step, ev)
        log.image("preview", os.path.join(run_dir, f"preview_{step:06d}.png"), step)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return ev


def main(argv=None):
    tc, mc = U.parse_config(TrainConfig, MIM4DConfig, PRESETS, argv=argv, recipes=RECIPES)
    dist = U.setup_dist(tc.seed)
    device = dist.device
    U.print0(U.format_config(train=tc, model=mc))
    config = U.config_to_dict(train=tc, model=mc)
    if U.is_main():
        clean_stale_tmp(tc.run_dir)

    t0 = time.time()
    held = make_data(tc, mc, "val")
    val = [held[i] for i in range(len(held))]
    train_ds = make_data(tc, mc, "train")
    sampler = ResumableSampler(len(train_ds), dist.world_size, dist.rank, shuffle=True, seed=tc.seed)
    train = Stream(train_ds, sampler, batch_size=tc.batch_size, num_workers=tc.num_workers,
                   pin_memory=device.type == "cuda", seed=tc.seed)
    U.print0(f"data: {len(train_ds)} train samples ({len(sampler)}/rank/epoch, read per step), {len(val)} held-out "
             f"({time.time() - t0:.0f} s to load the held-out ones)")

    steps = tc.steps
    if tc.epochs > 0:
        per_step = tc.batch_size * tc.grad_accum                            # samples of this rank's share per step
        steps = max(1, math.ceil(tc.epochs * len(sampler) / per_step))
        U.print0(f"{tc.epochs:g} epochs of {len(sampler)} samples/rank -> {steps} steps")
    model = MIM4D(mc).to(device)
    opt = model.configure_optimizer(tc.lr, tc.weight_decay, backbone_lr_mult=tc.backbone_lr_mult)
    torch.manual_seed(tc.seed + 100 * dist.rank)                               # masks, targets, rays
    try:
        res = load_checkpoint(tc.run_dir, model, opt, tc.resume,
                              expect_config={"model": config["model"], "train": U.resume_config(tc)})
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    start, extra = (res.step, res.extra) if res else (0, {})
    if start == 0 and tc.backbone_init and (res is None or tc.resume == "fresh"):
        init_backbone(model, tc.backbone_init)
        U.print0(f"backbone initialized from {tc.backbone_init}")
    U.broadcast_state(model)                                                   # all ranks start identical
    ema = EMA(model, tc.ema_decay, tc.ema_ramp) if tc.ema_decay > 0 else None
    if ema is not None and start:
        if load_ema(tc.run_dir, ema, start):
            U.print0(f"EMA restored ({ema.updates} updates)")
        else:
            U.print0(f"warning: no EMA saved with step {start}; the EMA restarts from the current weights")
    if U.is_main():
        save_json(os.path.join(tc.run_dir, "config.json"), config)
    if start:
        U.print0(f"resumed from step {start}")
    ddp = DDP(model) if dist.ddp else model
    n_params = sum(p.numel() for p in model.parameters())
    U.print0(f"MIM4D {n_params / 1e6:.2f}M params | {steps} steps | world {dist.world_size} | device {device}")
    log = U.ProgressLogger(tc.run_dir, steps, tc.log_every, unit="sample", tensorboard=tc.tensorboard)
    log.truncate(start)
    if start == 0:
        run_eval(model, val, device, tc.run_dir, 0, log)
    if "data" in extra:
        train.load_state_dict(extra["data"])                                  # continue mid-epoch
    for step in range(start, steps):
        lr = lr_at(tc, step, steps)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        terms_sum = {}
        for micro in range(tc.grad_accum):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(train).items()}
            with U.grad_sync(ddp, micro, tc.grad_accum):
                with U.autocast(device, tc.amp):
                    loss, out = ddp(batch)
                loss = U.inject_nan(loss, step)
                (loss / tc.grad_accum).backward()
            for k, v in {**out["terms"], "loss": loss.detach()}.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + v.item() / tc.grad_accum
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        terms_mean = U.finite_step(terms_sum, gnorm, step, tc.run_dir)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
        log.log(step, {**terms_mean, "data_wait_s": train.take_wait()}, lr, gnorm.item(),
                items=tc.batch_size * tc.grad_accum * dist.world_size)
        done, last = step + 1, step + 1 == steps
        if last or (tc.eval_every > 0 and done % tc.eval_every == 0):
            ev = run_eval(model, val, device, tc.run_dir, done, log)
            if last and U.is_main():
                save_json(os.path.join(tc.run_dir, "metrics.json"), {"step": done, "val": ev})
        if last or (tc.ckpt_every > 0 and done % tc.ckpt_every == 0):
            U.sync_buffers(model)
            nxt = save_ema(tc.run_dir, ema, config, done) if ema is not None and U.is_main() else None
            save_checkpoint(tc.run_dir, model, config, opt, done, extra={"data": train.state_dict()})
            if nxt:
                os.replace(nxt, os.path.join(tc.run_dir, "ema.safetensors"))
    U.print0(f"done in {time.time() - t0:.0f} s; weights, resume state, log.jsonl and previews in {tc.run_dir}")
    U.cleanup_dist()


if __name__ == "__main__":
    main()
