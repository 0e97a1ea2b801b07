"""Pretrain MuM (multi-view masked autoencoder) on multi-view images.

    python train_mum.py                                    # tiny preset, procedural objects, CPU ok
    torchrun --standalone --nproc_per_node=2 train_mum.py --steps 600
    python train_mum.py --preset base --data /path/to/frames --res 224 --images_per_batch 128
    python train_mum.py --eval_only true --out_dir runs/mum   # matching eval of a finished run

Each step draws V uniformly in [min_views, max_views] and a batch of floor(images_per_batch / V) sequences
(dynamic batching, as the official code); each view gets its own RandomResizedCrop(scale 0.2-1) + flip.
AdamW (0.9, 0.95), wd 0.05 except norms/biases/tokens, lr = blr * images_per_step / 256, warmup + cosine.
Writes out_dir/{model.safetensors, resume.pt, log.jsonl, preview_*.png, match.json}; resumes from out_dir.
Data: procedural multi-view objects (nano4d.data.objects.ProceduralObjects, rendered on the fly, cached) by default;
--data DIR reads a GObjaverse-layout folder (<obj>/<view:05d>/<view:05d>.png) or image-sequence folders
(<sequence>/*.png|jpg: video frames or photos of one scene, no poses); the last sequences are held out.
"""
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from nano4d.data.gobjaverse import GObjaverseDataset
from nano4d.data.objects import ProceduralObjects
from nano4d.data.sequences import ImageSequenceFolder
from nano4d.mum import PRESETS, MuM, MuMConfig, mark_views_dynamic
from nano4d.utils import (ProgressLogger, all_reduce_mean, cleanup_dist, config_to_dict, is_main, load_resume, lr_at,
                          parse_config, print0, save_checkpoint, save_image_grid, save_json, setup_dist)


@dataclass
class TrainConfig:
    out_dir: str = "runs/mum"
    data: str = ""                  # "" = procedural objects; else a GObjaverse-layout or image-sequence folder
    num_objects: int = 128          # procedural training objects (each rank renders its own share, cached)
    cache_dir: str = "runs/cache"   # procedural renders are stored here (GObjaverse layout); "" = memory only
    eval_objects: int = 8           # held-out sequences (procedural split "val", or the last ones of --data)
    src_res: int = 80               # rendered / loaded resolution before the random crop
    res: int = 64                   # training crop size (multiple of the patch size)
    min_views: int = 2
    max_views: int = 12
    eval_views: int = 4
    images_per_batch: int = 48      # per process per micro-step; sequences = images_per_batch // V
    grad_accum: int = 1
    steps: int = 600
    warmup: int = 40
    blr: float = 1.5e-3             # lr = blr * images per optimizer step (all ranks) / 256 (paper: 1.5e-4)
    min_lr_ratio: float = 0.0       # cosine to 0 as the official schedule
    weight_decay: float = 0.05
    grad_clip: float = 0.0          # 0 = no clipping (official); the norm is still logged
    crop_scale_min: float = 0.2
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 100
    seed: int = 0
    compile: bool = False
    eval_only: bool = False         # only run the stereo matching eval on out_dir/model.safetensors
    match_eval: bool = True         # after training: frozen-feature matching PCK (needs scikit-image)


# ------------------------------------------------------------------------------------------------ data

def make_datasets(tc: TrainConfig, rank: int, world: int):
    """-> (train, held-out) `Views`. Procedural: objects rendered lazily and cached (uint8 in memory, and
    on disk in cache_dir); rank r trains on objects r, r + world, ... (no duplicated rendering)."""
    if not tc.data:
        kw = dict(res=tc.src_res, seed=tc.seed, occ_res=0, num_surface_points=0, background="random",
                  cache_dir=tc.cache_dir or None)
        train = ProceduralObjects(num_objects=tc.num_objects, num_views=tc.max_views, split="train", **kw)
        held = ProceduralObjects(num_objects=tc.eval_objects, num_views=tc.eval_views, split="val", **kw)
        return Views(train, range(rank, len(train), world), cache=True), Views(held, range(len(held)), cache=True)
    sub = [os.path.join(tc.data, d) for d in sorted(os.listdir(tc.data)) if os.path.isdir(os.path.join(tc.data, d))]
    if sub and any(len(n) == 5 and n.isdigit() for n in os.listdir(sub[0])):      # <obj>/<view:05d>/...
        ds, pass_v = GObjaverseDataset(tc.data, num_views=tc.max_views, res=tc.src_res, seed=tc.seed), False
    else:                                                                          # <sequence>/*.png|jpg
        ds, pass_v = ImageSequenceFolder(tc.data, views=(1, tc.max_views), res=tc.src_res, seed=tc.seed), True
    n_held = min(tc.eval_objects, max(1, len(ds) // 10))
    train_ids = list(range(len(ds) - n_held))
    return (Views(ds, train_ids[rank::world], pass_v=pass_v),
            Views(ds, range(len(ds) - n_held, len(ds)), cache=True, pass_v=pass_v))


class Views:
    """A subset of a multi-view dataset: ``get(i, V)`` -> (V_i, 3, H, W) float images in [0, 1], V_i <= V
    for image-sequence folders (asked for V frames), else all views of the item. ``cache``: keep items in
    memory as uint8 after the first access (procedural renders, the held-out set)."""

    def __init__(self, ds, ids, cache=False, pass_v=False):
        self.ds, self.ids, self.cache, self.pass_v, self.mem = ds, list(ids), cache, pass_v, {}

    def __len__(self):
        return len(self.ids)

    def get(self, i, V):
        j = self.ids[i]
        key = (j, V) if self.pass_v else j
        if key in self.mem:
            return self.mem[key].float() / 255
        imgs = self.ds[(j, V) if self.pass_v else j]["images"]
        if self.cache:
            self.mem[key] = (imgs.clamp(0, 1) * 255 + 0.5).to(torch.uint8)
        return imgs


def random_resized_crop(img, out: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip=True):
    """torchvision-style RandomResizedCrop + horizontal flip of one image (3, H, W) -> (3, out, out)."""
    _, H, W = img.shape
    for _ in range(10):
        area = H * W * random.uniform(*scale)
        r = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * r)), round(math.sqrt(area / r))
        if 0 < w <= W and 0 < h <= H:
            i, j = random.randint(0, H - h), random.randint(0, W - w)
            break
    else:  # fallback: the largest centred crop
        h, w = H, W
        i, j = 0, 0
    crop = img[None, :, i:i + h, j:j + w]
    crop = F.interpolate(crop, size=(out, out), mode="bicubic", align_corners=False, antialias=True)[0].clamp(0, 1)
    return crop.flip(-1) if flip and random.random() < 0.5 else crop


def sample_batch(ds, tc: TrainConfig):
    """Dynamic batch: V ~ U[min_views, max_views], floor(images_per_batch / V) sequences -> (B, V, 3, res, res)."""
    V = random.randint(tc.min_views, tc.max_views)
    B = max(1, tc.images_per_batch // V)
    seqs = []
    for _ in range(B):
        views = ds.get(random.randrange(len(ds)), V)
        pick = random.sample(range(len(views)), V) if len(views) >= V else random.choices(range(len(views)), k=V)
        seqs.append(torch.stack([random_resized_crop(views[v], tc.res, (tc.crop_scale_min, 1.0)) for v in pick]))
    return torch.stack(seqs)


def heldout_batch(ds, tc: TrainConfig):
    """Fixed held-out batch: the first eval_views views of every held-out sequence, resized (no crop)."""
    seqs = [ds.get(i, tc.eval_views)[:tc.eval_views] for i in range(len(ds))]
    V = min(len(s) for s in seqs)
    return torch.stack([F.interpolate(s[:V], size=(tc.res, tc.res), mode="bicubic", align_corners=False,
                                      antialias=True).clamp(0, 1) for s in seqs])


@torch.no_grad()
def evaluate(model, images, device, step, tc, preview=True):
    """Held-out reconstruction loss with a fixed mask (same seed every eval) and a preview PNG:
    for 2 samples, rows = masked input / reconstruction / target, one column per view."""
    model.eval()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    with torch.random.fork_rng(devices=[]), amp:
        torch.manual_seed(1234)
        losses, first = [], None
        for i in range(0, len(images), 4):
            x = images[i:i + 4].to(device)
            loss, out = model({"images": x})
            losses.append(float(loss) * len(x))
            first = first or (x, out["pred"], out["mask"])
    model.train()
    if preview and is_main():
        x, pred, mask = first
        n = min(2, len(x)) * x.shape[1]
        rows = [t[:n] for t in model.reconstruct(x, pred, mask)]
        save_image_grid(os.path.join(tc.out_dir, f"preview_{step:06d}.png"), rows)
    return sum(losses) / len(images)


# ------------------------------------------------------------------------------------------------ main

def run_match_eval(tc: TrainConfig):
    try:
        import skimage  # noqa: F401
    except ImportError:
        print0("match eval skipped: scikit-image is not installed (pip install scikit-image, or the 'test' extra)")
        return None
    from nano4d.mum_eval import compare, format_table
    res = compare(os.path.join(tc.out_dir, "model.safetensors"))
    print0(format_table(res))
    save_json(os.path.join(tc.out_dir, "match.json"), res)
    return res


def main(argv=None):
    tc, mc = parse_config(TrainConfig, MuMConfig, PRESETS, argv=argv)
    if tc.eval_only:
        return run_match_eval(tc)
    di = setup_dist(tc.seed)
    random.seed(tc.seed + di.rank)
    device = di.device
    if tc.res % mc.patch_size:
        raise ValueError(f"--res {tc.res} must be a multiple of the patch size {mc.patch_size}")
    if not 1 <= tc.min_views <= tc.max_views:
        raise ValueError(f"need 1 <= min_views <= max_views, got {tc.min_views}, {tc.max_views}")
    config = config_to_dict(model=mc, train=tc)
    if is_main():
        os.makedirs(tc.out_dir, exist_ok=True)
        save_json(os.path.join(tc.out_dir, "config.json"), config)

    train_ds, held_ds = make_datasets(tc, di.rank, di.world_size)
    held = heldout_batch(held_ds, tc)
    print0(f"data: {len(train_ds)} train sequences/rank, {len(held)} held-out x {held.shape[1]} views, "
           f"crop {tc.res}px from {tc.src_res}px")

    model = MuM(mc).to(device)
    images_per_step = tc.images_per_batch * tc.grad_accum * di.world_size
    base_lr = tc.blr * images_per_step / 256
    opt = model.configure_optimizer(base_lr, tc.weight_decay)
    start, _ = load_resume(tc.out_dir, model, opt, expect_config={"model": config["model"]})
    print0(f"MuM {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | {images_per_step} img/step | "
           f"lr {base_lr:.2e} | world {di.world_size} | " + (f"resumed at step {start}" if start else "from scratch"))
    if tc.compile:
        model = torch.compile(model)
    dmodel = DDP(model) if di.ddp else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    raw = model._orig_mod if tc.compile else model
    if start == 0:
        ev = evaluate(raw, held, device, 0, tc)
        print0(f"step {0:6d} | held-out loss {ev:.4f}")
        ProgressLogger(tc.out_dir, tc.steps).write({"step": 0, "eval_loss": ev})
    log = ProgressLogger(tc.out_dir, tc.steps, interval=tc.log_every, unit="img")
    t0 = time.time()
    for step in range(start, tc.steps):
        lr = lr_at(step, tc.steps, base_lr, tc.warmup, tc.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        n_img, loss_sum = 0, 0.0
        for micro in range(tc.grad_accum):
            x = sample_batch(train_ds, tc).to(device)
            if tc.compile:
                mark_views_dynamic(x)
            sync = nullcontext() if not di.ddp or micro == tc.grad_accum - 1 else dmodel.no_sync()
            with sync, amp:
                loss = dmodel({"images": x})[0]
            with sync:
                (loss / tc.grad_accum).backward()
            loss_sum += loss.detach().float() / tc.grad_accum
            n_img += x.shape[0] * x.shape[1]
        loss_all = all_reduce_mean(loss_sum)
        if not torch.isfinite(loss_all):
            print0(f"non-finite loss at step {step}; stopping (last checkpoint in {tc.out_dir} is intact)")
            break
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.log(step, {"loss": float(loss_all)}, lr=lr, grad_norm=float(gnorm), items=n_img * di.world_size)

        last = step + 1 == tc.steps
        if (step + 1) % tc.eval_every == 0 or last:
            ev = evaluate(raw, held, device, step + 1, tc)
            print0(f"step {step + 1:6d} | held-out loss {ev:.4f} | {time.time() - t0:.0f}s")
            log.write({"step": step + 1, "eval_loss": ev, "train_time_s": time.time() - t0})
        if ((step + 1) % tc.save_every == 0 or last) and is_main():
            save_checkpoint(tc.out_dir, raw, config, opt, step + 1)
    else:
        print0(f"trained {tc.steps - start} steps in {time.time() - t0:.0f}s")
        if tc.match_eval and is_main():
            run_match_eval(tc)
    cleanup_dist()


if __name__ == "__main__":
    main()
