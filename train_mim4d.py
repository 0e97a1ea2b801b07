"""Train MIM4D (masked multi-view video pretraining with SDF volume rendering).

    python train_mim4d.py                                     # tiny preset, procedural driving scenes
    torchrun --standalone --nproc_per_node=2 train_mim4d.py   # the same on 2 processes (gloo on CPU)
    python train_mim4d.py --data path/to/rigs --preset paper  # nuScenes-style rig JSON files

Every step: T frames x 6 cameras per sample, 30 % of each image's 32-px patches masked, per-frame voxel
volumes, a dropped frame's volume predicted from the others, and both the predicted and the directly
encoded volume rendered (NeuS) into the target frame's cameras and supervised with RGB + depth.
Held-out eval: RGB PSNR and depth AbsRel / L1 of the *predicted* volume vs a baseline that copies the
nearest other frame's volume warped by ego-motion only.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from nano4d import utils as U
from nano4d.checkpoint import CheckpointError, clean_stale_tmp, load_checkpoint, save_checkpoint, save_json
from nano4d.data.driving import ProceduralDriving
from nano4d.data.rig import RigDataset, lidar_to_depths
from nano4d.metrics import psnr
from nano4d.mim4d import MIM4D, PRESETS, MIM4DConfig, sample_rays
from nano4d.utils import flag

# Named bundles of flag values (train fields, "preset", "model.<field>"): --recipe NAME; explicit flags win.
RECIPES: dict = {}


@dataclass
class TrainConfig:
    run_dir: str = flag("runs/mim4d", "output folder: weights, resume state, log.jsonl, previews, metrics.json; a run "
                        "resumes from it", resume_may_change=True)
    data: str = flag("", "rig JSON file or folder (nuScenes-style); '' = procedural scenes")
    num_train: int = flag(48, "procedural training scenes (rendered once and cycled; split 'train')")
    num_val: int = flag(4, "held-out procedural scenes (split 'val')")
    batch_size: int = flag(1, "samples per rank per micro-step")
    grad_accum: int = flag(1, "micro-steps per optimizer step (gradients all-reduced once, at the last)")
    steps: int = flag(400, "optimizer steps")
    lr: float = flag(4e-4, "peak lr")
    backbone_lr_mult: float = flag(0.1, "lr multiplier of the image backbone")
    min_lr_ratio: float = flag(1e-3, "cosine decays to min_lr_ratio * lr")
    weight_decay: float = flag(0.01, "AdamW weight decay")
    warmup: int = flag(40, "linear lr warmup steps")
    grad_clip: float = flag(35.0, "gradient-norm clip")
    log_every: int = flag(10, "steps per progress line", resume_may_change=True)
    eval_every: int = flag(100, "steps per held-out eval + preview; 0 = only at the start and the end",
                           resume_may_change=True)
    ckpt_every: int = flag(100, "steps per checkpoint; 0 = only at the end", resume_may_change=True)
    seed: int = flag(0, "seed (rank r: seed + r for data, seed + 100 r for masks, targets and rays)")
    amp: str = flag("auto", "autocast: auto = bf16 on CUDA, off on CPU", choices=("auto", "bf16", "off"))
    resume: str = flag("auto", "auto: continue from run_dir's checkpoint if there is one (exactly; the config must "
                       "match); weights: load its weights only, start at step 0; fresh: start over",
                       choices=("auto", "fresh", "weights"), resume_may_change=True)
    tensorboard: bool = flag(False, "also log to run_dir/tb (needs the tensorboard package)", resume_may_change=True)
    recipe: str = flag("default", "named bundle of flag values from RECIPES", resume_may_change=True)


def make_data(tc: TrainConfig, mc: MIM4DConfig, split: str, rank: int, world: int):
    """A list of samples for this rank (rendered/loaded once; the tiny CPU run cycles over them)."""
    if tc.data:
        ds = RigDataset(tc.data, num_frames=mc.num_frames, res=mc.img_size)
        n = len(ds)
        ids = list(range(n))[: max(1, n // 10)] if split == "val" else list(range(n))[max(1, n // 10):] or [0]
    else:
        n = tc.num_train if split == "train" else tc.num_val
        ds = ProceduralDriving(num_scenes=n, num_frames=mc.num_frames, res=mc.img_size, split=split, seed=tc.seed)
        ids = list(range(n))
    keys = ("images", "depths", "K", "cam2ego", "ego2world", "lidar2ego")
    samples = []
    for i in ids[rank::world] if split == "train" else ids:
        s = ds[i]
        if "depths" not in s:
            s["depths"] = lidar_to_depths(s["lidar"], s["lidar_mask"], s["K"], s["cam2ego"], *mc.img_size)
        if "lidar2ego" not in s:                     # no LiDAR calibration: the volume is taken in the ego frame
            s["lidar2ego"] = torch.eye(4)
        samples.append({k: s[k] for k in keys})
    return samples


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
                preview.append(render_preview(model, b, tgt=b["images"].shape[1] - 1))
    if run_dir and preview and U.is_main():
        U.save_image_grid(os.path.join(run_dir, f"preview_{step:06d}.png"), preview)
    model.train()
    return {k: sum(v) / len(v) for k, v in acc.items()}


def render_preview(model, b, tgt, cam=0):
    """target image | RGB rendered from the predicted volume | rendered depth | GT depth (one camera, half size)."""
    H, W = b["images"].shape[-2:]
    h, w = H // 2, W // 2
    K = b["K"][:, cam:cam + 1].clone()
    K[:, :, :2] /= 2
    gt = F.interpolate(b["depths"][0, tgt, cam][None], size=(h, w), mode="nearest")   # (1, 1, h, w)
    rays = sample_rays(model.cfg, gt[None], K, b["cam2ego"][:, cam:cam + 1], b["lidar2ego"])
    img = F.interpolate(b["images"][0, tgt, cam][None], size=(h, w), mode="area")[0]
    _, out = model(dict(b, targets=[tgt], rays=[rays]))
    ren = out["renders"]["pred"][0]
    v, u = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    d_cam = torch.stack([u, v, torch.ones_like(u)], -1).reshape(-1, 3).to(K) @ torch.linalg.inv(K[0, 0]).T
    depth = (ren.depth[0] / d_cam.norm(dim=-1)).reshape(1, h, w)               # ray distance -> z-depth
    dmax = max(abs(v) for v in model.cfg.pc_range)                             # depth shown in [0, box half-size]
    return torch.stack([img, ren.rgb[0].reshape(h, w, 3).permute(2, 0, 1), (depth / dmax).clamp(0, 1).expand(3, -1, -1),
                        (gt[0] / dmax).clamp(0, 1).expand(3, -1, -1)]).cpu()


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
    train = make_data(tc, mc, "train", dist.rank, dist.world_size)
    val = make_data(tc, mc, "val", 0, 1)
    U.print0(f"data: {len(train)} train samples/rank, {len(val)} held-out ({time.time() - t0:.0f} s to render)")

    model = MIM4D(mc).to(device)
    opt = model.configure_optimizer(tc.lr, tc.weight_decay, backbone_lr_mult=tc.backbone_lr_mult)
    torch.manual_seed(tc.seed + 100 * dist.rank)                               # masks, targets, rays
    try:
        res = load_checkpoint(tc.run_dir, model, opt, tc.resume,
                              expect_config={"model": config["model"], "train": U.resume_config(tc)})
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    start, extra = (res.step, res.extra) if res else (0, {})
    U.broadcast_state(model)                                                   # all ranks start identical
    if U.is_main():
        save_json(os.path.join(tc.run_dir, "config.json"), config)
    if start:
        U.print0(f"resumed from step {start}")
    ddp = DDP(model) if dist.ddp else model
    n_params = sum(p.numel() for p in model.parameters())
    U.print0(f"MIM4D {n_params / 1e6:.2f}M params | {tc.steps} steps | world {dist.world_size} | device {device}")
    log = U.ProgressLogger(tc.run_dir, tc.steps, tc.log_every, unit="sample", tensorboard=tc.tensorboard)
    log.truncate(start)
    if start == 0:
        run_eval(model, val, device, tc.run_dir, 0, log)
    pos = int(extra.get("pos", 0))
    for step in range(start, tc.steps):
        lr = U.lr_at(step, tc.steps, tc.lr, tc.warmup, tc.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        terms_sum = {}
        for micro in range(tc.grad_accum):
            idx = [(pos + j) % len(train) for j in range(tc.batch_size)]
            pos += tc.batch_size
            batch = collate([train[i] for i in idx], device)
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
        log.log(step, terms_mean, lr, gnorm.item(), items=tc.batch_size * tc.grad_accum * dist.world_size)
        done, last = step + 1, step + 1 == tc.steps
        if last or (tc.eval_every > 0 and done % tc.eval_every == 0):
            ev = run_eval(model, val, device, tc.run_dir, done, log)
            if last and U.is_main():
                save_json(os.path.join(tc.run_dir, "metrics.json"), {"step": done, "val": ev})
        if last or (tc.ckpt_every > 0 and done % tc.ckpt_every == 0):
            U.sync_buffers(model)
            save_checkpoint(tc.run_dir, model, config, opt, done, extra={"pos": pos})
    U.print0(f"done in {time.time() - t0:.0f} s; weights, resume state, log.jsonl and previews in {tc.run_dir}")
    U.cleanup_dist()


if __name__ == "__main__":
    main()
