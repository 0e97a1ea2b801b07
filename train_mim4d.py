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

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from nano4d.data.driving import ProceduralDriving
from nano4d.data.rig import RigDataset, lidar_to_depths
from nano4d.metrics import psnr
from nano4d.mim4d import MIM4D, PRESETS, MIM4DConfig
from nano4d.utils import (ProgressLogger, cleanup_dist, config_to_dict, is_main, load_resume,
                          lr_at, parse_config, print0, save_checkpoint, save_image_grid, save_json,
                          setup_dist)


@dataclass
class TrainConfig:
    run_dir: str = "runs/mim4d"
    data: str = ""                  # rig JSON file or folder (nuScenes-style); empty = procedural scenes
    train_scenes: int = 48          # procedural scenes rendered once and cycled (split "train")
    val_scenes: int = 4             # held-out procedural scenes (split "val")
    batch_size: int = 1             # samples per rank per micro-step
    grad_accum: int = 1
    steps: int = 400
    lr: float = 4e-4
    backbone_lr_mult: float = 0.1
    weight_decay: float = 0.01
    warmup: int = 40
    grad_clip: float = 35.0
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 100
    seed: int = 0
    resume: bool = True


def make_data(tc: TrainConfig, mc: MIM4DConfig, split: str, rank: int, world: int):
    """A list of samples for this rank (rendered/loaded once; the tiny CPU run cycles over them)."""
    if tc.data:
        ds = RigDataset(tc.data, num_frames=mc.num_frames, res=mc.img_size)
        n = len(ds)
        ids = list(range(n))[: max(1, n // 10)] if split == "val" else list(range(n))[max(1, n // 10):] or [0]
    else:
        n = tc.train_scenes if split == "train" else tc.val_scenes
        ds = ProceduralDriving(num_scenes=n, num_frames=mc.num_frames, res=mc.img_size, split=split, seed=tc.seed)
        ids = list(range(n))
    keys = ("images", "depths", "K", "cam2ego", "ego2world")
    samples = []
    for i in ids[rank::world] if split == "train" else ids:
        s = ds[i]
        if "depths" not in s:
            s["depths"] = lidar_to_depths(s["lidar"], s["lidar_mask"], s["K"], s["cam2ego"], *mc.img_size)
        samples.append({k: s[k] for k in keys})
    return samples


def collate(samples, device):
    return {k: torch.stack([s[k] for s in samples]).to(device) for k in samples[0]}


@torch.no_grad()
def evaluate(model, val, device, run_dir=None, step=0):
    """Held-out: render each target frame from (a) the predicted volume, (b) the warp-only baseline, (c) the
    directly encoded volume; RGB PSNR and depth AbsRel / L1 (metres) on rays with ground truth."""
    model.eval()
    g = torch.Generator().manual_seed(1234)
    acc = {}
    preview = []
    for i, s in enumerate(val):
        b = collate([s], device)
        T = b["images"].shape[1]
        vols = model.encode_frames(b["images"], b["K"], b["cam2ego"])          # unmasked inputs at eval
        for tgt in range(T):
            pred, warp = model.predict_frame(vols, b["ego2world"], tgt)
            rays = model.sample_rays(b["depths"][:, tgt], b["K"], b["cam2ego"], g)
            _, _, pix, gt, ok = rays
            target = b["images"][:, tgt].permute(0, 1, 3, 4, 2).reshape(1, -1, 3).gather(1, pix[..., None].expand(-1, -1, 3))
            for name, vol in (("pred", pred), ("warp", warp), ("direct", vols[:, tgt])):
                _, _, out = model.render_loss(vol, rays, b["images"][:, tgt], perturb=False)
                m = out["mask"][0] > 0
                rgb, dep = out["rgb"][0][m], out["depth"][0][m]
                vals = {f"{name}_psnr": psnr(rgb.T[None, :, :, None], target[0][m].T[None, :, :, None]).item(),
                        f"{name}_absrel": ((dep - gt[0][m]).abs() / gt[0][m]).mean().item(),
                        f"{name}_l1": (dep - gt[0][m]).abs().mean().item()}
                for k, v in vals.items():
                    acc.setdefault(k, []).append(v)
        if run_dir and i < 2:                                                   # preview: front camera, frame 1
            preview.append(render_preview(model, b, vols, tgt=1 % T))
    if run_dir and preview and is_main():
        save_image_grid(os.path.join(run_dir, f"preview_{step:06d}.png"), preview)
    model.train()
    return {k: sum(v) / len(v) for k, v in acc.items()}


def render_preview(model, b, vols, tgt, cam=0):
    """target image | RGB rendered from the predicted volume | rendered depth | GT depth (one camera)."""
    H, W = b["images"].shape[-2:]
    h, w = H // 2, W // 2
    K = b["K"].clone()
    K[:, :, :2] /= 2
    v, u = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    d_cam = torch.stack([u, v, torch.ones_like(u)], -1).reshape(-1, 3).to(K) @ torch.linalg.inv(K[0, cam]).T
    c2e = b["cam2ego"][0, cam]
    d = F.normalize(d_cam @ c2e[:3, :3].T, dim=-1)[None]
    o = c2e[:3, 3].expand_as(d)
    pred, _ = model.predict_frame(vols, b["ego2world"], tgt)
    rgb, depth, _, _ = model.render(pred, o, d, perturb=False)
    gt = F.interpolate(b["depths"][0, tgt, cam][None], size=(h, w), mode="nearest")[0]
    depth = (depth * d_cam.norm(dim=-1)[None] ** -1).reshape(1, h, w)         # ray distance -> z-depth
    dmax = max(abs(v) for v in model.cfg.pc_range)                             # depth shown in [0, box half-size]
    img = F.interpolate(b["images"][0, tgt, cam][None], size=(h, w), mode="area")[0]
    return torch.stack([img, rgb.reshape(h, w, 3).permute(2, 0, 1), (depth / dmax).clamp(0, 1).expand(3, -1, -1),
                        (gt / dmax).clamp(0, 1).expand(3, -1, -1)]).cpu()


def run_eval(model, val, device, run_dir, step, log):
    """Rank 0 evaluates the held-out set (every rank holds the same weights); the others wait."""
    if is_main():
        ev = evaluate(model, val, device, run_dir, step)
        print0(f"eval step {step} | " + " | ".join(f"{k} {v:.3f}" for k, v in ev.items()))
        log.write({"step": step, "eval": ev})
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def main(argv=None):
    tc, mc = parse_config(TrainConfig, MIM4DConfig, PRESETS, argv=argv)
    dist = setup_dist(tc.seed)
    device = dist.device
    os.makedirs(tc.run_dir, exist_ok=True)
    config = config_to_dict(train=tc, model=mc)
    if is_main():
        save_json(os.path.join(tc.run_dir, "config.json"), config)

    t0 = time.time()
    train = make_data(tc, mc, "train", dist.rank, dist.world_size)
    val = make_data(tc, mc, "val", 0, 1)
    print0(f"data: {len(train)} train samples/rank, {len(val)} held-out ({time.time() - t0:.0f} s to render)")

    model = MIM4D(mc).to(device)
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    opt = torch.optim.AdamW([{"params": backbone, "lr_mult": tc.backbone_lr_mult},
                             {"params": rest, "lr_mult": 1.0}], lr=tc.lr, weight_decay=tc.weight_decay)
    start, extra = load_resume(tc.run_dir, model, opt, expect_config={"model": config["model"]}) if tc.resume else (0, {})
    if start:
        print0(f"resumed from step {start}")
    ddp = DDP(model) if dist.ddp else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    n_params = sum(p.numel() for p in model.parameters())
    print0(f"MIM4D {n_params / 1e6:.2f}M params | {tc.steps} steps | world {dist.world_size} | device {device}")
    log = ProgressLogger(tc.run_dir, tc.steps, tc.log_every, unit="sample")
    if start == 0:
        run_eval(model, val, device, tc.run_dir, 0, log)
    gen = torch.Generator().manual_seed(tc.seed + 100 * dist.rank + start)
    pos = int(extra.get("pos", 0))
    for step in range(start, tc.steps):
        lr = lr_at(step, tc.steps, tc.lr, tc.warmup, 1e-3)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        terms_sum = {}
        for micro in range(tc.grad_accum):
            idx = [(pos + j) % len(train) for j in range(tc.batch_size)]
            pos += tc.batch_size
            batch = collate([train[i] for i in idx], device)
            sync = nullcontext() if (micro == tc.grad_accum - 1 or not dist.ddp) else ddp.no_sync()
            with sync:
                with amp:
                    loss, _, terms = ddp(batch, generator=gen)
                (loss / tc.grad_accum).backward()
            for k, v in terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + v.item() / tc.grad_accum
        if not math.isfinite(sum(terms_sum.values())):
            print0(f"non-finite loss at step {step}: {terms_sum}; stopping (last checkpoint left intact)")
            break
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.log(step, terms_sum, lr, gnorm.item(), items=tc.batch_size * tc.grad_accum * dist.world_size)
        last = step + 1 == tc.steps
        if (step + 1) % tc.eval_every == 0 or last:
            run_eval(model, val, device, tc.run_dir, step + 1, log)
        if is_main() and ((step + 1) % tc.save_every == 0 or last):
            save_checkpoint(tc.run_dir, model, config, opt, step + 1, extra={"pos": pos})
    if is_main():
        print0(f"done in {time.time() - t0:.0f} s; weights, resume state, log.jsonl and previews in {tc.run_dir}")
    cleanup_dist()


if __name__ == "__main__":
    main()
