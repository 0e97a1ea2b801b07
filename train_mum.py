"""Pretrain MuM (multi-view masked autoencoder) on multi-view images.

    python train_mum.py                                    # tiny preset, procedural objects, CPU ok
    torchrun --standalone --nproc_per_node=2 train_mum.py --steps 600
    python train_mum.py --preset base --data /path/to/frames --res 224 --batch_size 128
    python train_mum.py --eval_only true --run_dir runs/mum   # matching eval of a finished run
    python train_mum.py --recipe paper --data /path/to/sequences    # the paper's run (one GPU: 128 x 32 accum)
    torchrun --nproc_per_node=8 train_mum.py --recipe paper --grad_accum 4 --data /path/to/sequences

Each step draws V uniformly in [min_views, max_views] and a batch of floor(batch_size / V) sequences
(dynamic batching, as the official code); each view gets its own RandomResizedCrop(scale 0.2-1) + flip.
AdamW (0.9, 0.95), wd 0.05 except norms/biases/tokens, lr = blr * images_per_step / 256, warmup + cosine.
Writes run_dir/{model.safetensors, resume.pt, log.jsonl, preview_*.png, match.json}; resumes from run_dir
(--resume auto|weights|fresh). `python train_mum.py --help` explains every flag.
Data: procedural multi-view objects (nano4d.data.objects.ProceduralObjects, rendered on the fly, cached) by default;
--data DIR reads a GObjaverse-layout folder (<obj>/<view:05d>/<view:05d>.png) or image-sequence folders
(<sequence>/*.png|jpg: video frames or photos of one scene, no poses); the last sequences are held out.
"""
import math
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Dataset

from nano4d import utils as U
from nano4d.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, unwrap
from nano4d.data.gobjaverse import GObjaverseDataset
from nano4d.data.objects import ProceduralObjects
from nano4d.data.sampling import DynamicBatchSampler, Stream, collate_list
from nano4d.data.sequences import ImageSequenceFolder
from nano4d.files import clean_stale_tmp, save_image_grid, save_json
from nano4d.mum import PRESETS, MuM, MuMConfig, mark_views_dynamic
from nano4d.mum_eval import compare, format_table
from nano4d.utils import flag

# Named bundles of flag values (train fields, "preset", "model.<field>"): --recipe NAME; explicit flags win.
RECIPES: dict = {
    # The official run (davnords/MuM train-dev: mum.yaml over ssl_default_config.yaml, mum/train.py): ViT-L/16
    # encoder + 768-d x 12-block decoder, 224 px crops, 2-12 views per scene, 128 images per micro-step; the
    # official 32 GPUs x 128 = 4096 images per step become 32 accumulated micro-steps on one process (with N
    # processes pass --grad_accum 32/N); lr = 1.5e-4 * 4096 / 256 = 2.4e-3, 500k steps, 25k warmup, cosine to 0,
    # AdamW (0.9, 0.95) wd 0.05 also on the CLS / mask tokens, trunc-normal init, bf16 autocast, no clipping.
    "paper": {"preset": "large", "model.official_init": True, "model.decay_tokens": True,
              "res": 224, "src_res": 256, "min_views": 2, "max_views": 12, "crop_scale_min": 0.2,
              "batch_size": 128, "grad_accum": 32, "steps": 500_000, "warmup": 25_000, "lr": 0.0, "blr": 1.5e-4,
              "min_lr_ratio": 0.0, "weight_decay": 0.05, "grad_clip": 0.0, "amp": "bf16",
              "eval_every": 5000, "ckpt_every": 5000},
}


@dataclass
class TrainConfig(U.RunFlags):
    run_dir: str = flag("runs/mum", "output folder: weights, resume state, log.jsonl, previews, match.json; a run "
                        "resumes from it", resume_may_change=True)
    data: str = flag("", "'' = procedural objects; else a GObjaverse-layout or image-sequence folder")
    num_train: int = flag(128, "procedural training objects (rendered on demand; shuffled and split over ranks each "
                          "epoch)")
    num_val: int = flag(8, "held-out sequences (procedural split 'val', or the last ones of --data)")
    num_workers: int = flag(0, "DataLoader worker processes per rank (0 = read/render in the training process)")
    cache_dir: str = flag("runs/cache", "procedural renders are stored here (GObjaverse layout) and read back; "
                          "'' = render every time",
                          resume_may_change=True)
    src_res: int = flag(80, "rendered / loaded resolution before the random crop")
    res: int = flag(64, "training crop size (a multiple of the patch size)")
    min_views: int = flag(2, "fewest views per training sequence")
    max_views: int = flag(12, "most views per training sequence")
    eval_views: int = flag(4, "views per held-out sequence")
    batch_size: int = flag(48, "images per process per micro-step; sequences per micro-step = batch_size // V")
    grad_accum: int = flag(1, "micro-steps per optimizer step (gradients all-reduced once, at the last)")
    steps: int = flag(600, "optimizer steps")
    warmup: int = flag(40, "linear lr warmup steps")
    lr: float = flag(0.0, "absolute peak lr; 0 = blr * images per optimizer step (all ranks) / 256")
    blr: float = flag(1.5e-3, "base lr per 256 images, used when --lr is 0 (paper: 1.5e-4)")
    min_lr_ratio: float = flag(0.0, "cosine decays to min_lr_ratio * lr (0 as the official schedule)")
    weight_decay: float = flag(0.05, "AdamW weight decay (not on norms and biases, nor on the CLS / mask tokens "
                                      "unless --model.decay_tokens true)")
    grad_clip: float = flag(0.0, "gradient-norm clip; 0 = no clipping (official), the norm is still logged")
    crop_scale_min: float = flag(0.2, "RandomResizedCrop: smallest crop area fraction")
    log_every: int = flag(10, "steps per progress line", resume_may_change=True)
    eval_every: int = flag(100, "steps per held-out eval + preview; 0 = only at the end", resume_may_change=True)
    ckpt_every: int = flag(100, "steps per checkpoint; 0 = only at the end", resume_may_change=True)
    seed: int = flag(0, "seed (data order and per-batch view counts: seed + epoch; crops: seed + rank)")
    compile: bool = flag(False, "torch.compile the model", resume_may_change=True)
    eval_only: bool = flag(False, "only run the stereo matching eval on run_dir/model.safetensors",
                           resume_may_change=True)
    match_eval: bool = flag(True, "after training: frozen-feature matching PCK (needs scikit-image)",
                            resume_may_change=True)


# ------------------------------------------------------------------------------------------------ data

class Sequences(Dataset):
    """A subset of a multi-view dataset as MuM reads it: item ``(i, V)`` -> ((V_i, 3, H, W) float images in
    [0, 1], V): V frames of an image sequence, or all views of an object, from which the training loop picks V.
    Holds only the index; every item is read (or rendered, or served from the procedural disk cache) when
    asked for."""

    def __init__(self, ds, ids, pass_v=False):
        self.ds, self.ids, self.pass_v = ds, list(ids), pass_v

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        i, V = index if isinstance(index, tuple) else (index, None)
        j = self.ids[i]
        return self.ds[(j, V) if self.pass_v and V is not None else j]["images"], V


def make_datasets(tc: TrainConfig):
    """-> (train, held-out) `Sequences`. Procedural: objects rendered on demand (stored in and read back from
    cache_dir when set); --data: the last sequences are held out."""
    if not tc.data:
        kw = dict(res=tc.src_res, seed=tc.seed, occ_res=0, num_surface_points=0, background="random",
                  cache_dir=tc.cache_dir or None)
        train = ProceduralObjects(num_objects=tc.num_train, num_views=tc.max_views, split="train", **kw)
        held = ProceduralObjects(num_objects=tc.num_val, num_views=tc.eval_views, split="val", **kw)
        return Sequences(train, range(len(train))), Sequences(held, range(len(held)))
    sub = [os.path.join(tc.data, d) for d in sorted(os.listdir(tc.data)) if os.path.isdir(os.path.join(tc.data, d))]
    if sub and any(len(n) == 5 and n.isdigit() for n in os.listdir(sub[0])):      # <obj>/<view:05d>/...
        ds, pass_v = GObjaverseDataset(tc.data, num_views=tc.max_views, res=tc.src_res, seed=tc.seed), False
    else:                                                                          # <sequence>/*.png|jpg
        ds, pass_v = ImageSequenceFolder(tc.data, views=(1, tc.max_views), res=tc.src_res, seed=tc.seed), True
    n_held = min(tc.num_val, max(1, len(ds) // 10))
    return Sequences(ds, range(len(ds) - n_held), pass_v), Sequences(ds, range(len(ds) - n_held, len(ds)), pass_v)


def random_resized_crop(img, out: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip=True):
    """torchvision's RandomResizedCrop (area fraction ``scale``, log-uniform aspect ``ratio``, 10 tries, then a
    centred fallback; bicubic, antialiased) + horizontal flip (p = 0.5) of one image (3, H, W) -> (3, out, out),
    the official per-view augmentation."""
    _, H, W = img.shape
    for _ in range(10):
        area = H * W * random.uniform(*scale)
        r = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * r)), round(math.sqrt(area / r))
        if 0 < w <= W and 0 < h <= H:
            i, j = random.randint(0, H - h), random.randint(0, W - w)
            break
    else:  # fallback as torchvision: the whole image, cropped to the nearest allowed aspect ratio, centred
        in_ratio = W / H
        if in_ratio < ratio[0]:
            w, h = W, round(W / ratio[0])
        elif in_ratio > ratio[1]:
            w, h = round(H * ratio[1]), H
        else:
            w, h = W, H
        i, j = (H - h) // 2, (W - w) // 2
    crop = img[None, :, i:i + h, j:j + w]
    crop = F.interpolate(crop, size=(out, out), mode="bicubic", align_corners=False, antialias=True)[0].clamp(0, 1)
    return crop.flip(-1) if flip and random.random() < 0.5 else crop


def crop_batch(items, tc: TrainConfig):
    """Dynamic batch from the loader's (views, V) items (one V per batch, ``DynamicBatchSampler``): V views of
    each (drawn here, in the training process), each with its own RandomResizedCrop + flip -> (B, V, 3, res, res)."""
    seqs = []
    for views, V in items:
        pick = random.sample(range(len(views)), V) if len(views) >= V else random.choices(range(len(views)), k=V)
        seqs.append(torch.stack([random_resized_crop(views[v], tc.res, (tc.crop_scale_min, 1.0)) for v in pick]))
    return torch.stack(seqs)


def heldout_batch(ds, tc: TrainConfig):
    """Fixed held-out batch: the first eval_views views of every held-out sequence, resized (no crop)."""
    seqs = [ds[(i, tc.eval_views)][0][:tc.eval_views] for i in range(len(ds))]
    V = min(len(s) for s in seqs)
    return torch.stack([F.interpolate(s[:V], size=(tc.res, tc.res), mode="bicubic", align_corners=False,
                                      antialias=True).clamp(0, 1) for s in seqs])


@torch.no_grad()
def evaluate(model, images, device, step, tc, preview=True):
    """Held-out reconstruction loss with a fixed mask (same seed every eval) and a preview PNG:
    for 2 samples, rows = masked input / reconstruction / target, one column per view."""
    model.eval()
    with U.rng_isolated(), U.autocast(device, tc.amp):
        torch.manual_seed(1234)
        losses, first = [], None
        for i in range(0, len(images), 4):
            x = images[i:i + 4].to(device)
            loss, out = model({"images": x})
            losses.append(float(loss) * len(x))
            first = first or (x, out["pred"], out["mask"])
    model.train()
    if preview and U.is_main():
        x, pred, mask = first
        n = min(2, len(x)) * x.shape[1]
        rows = [t[:n] for t in model.reconstruct(x, pred, mask)]
        save_image_grid(os.path.join(tc.run_dir, f"preview_{step:06d}.png"), rows, min_size=64,
                        labels=["masked input", "reconstruction", "target"])
    return sum(losses) / len(images)


# ------------------------------------------------------------------------------------------------ main

def run_match_eval(tc: TrainConfig):
    try:
        import skimage  # noqa: F401
    except ImportError:
        U.print0("match eval skipped: scikit-image is not installed (pip install scikit-image, or the 'test' extra)")
        return None
    res = compare(os.path.join(tc.run_dir, "model.safetensors"))
    U.print0(format_table(res))
    save_json(os.path.join(tc.run_dir, "match.json"), res)
    return res


def main(argv=None):
    tc, mc = U.parse_config(TrainConfig, MuMConfig, PRESETS, argv=argv, recipes=RECIPES)
    if tc.eval_only:
        return run_match_eval(tc)
    di = U.setup_dist(tc.seed)
    device = di.device
    U.print0(U.format_config(train=tc, model=mc))
    if tc.res % mc.patch_size:
        raise ValueError(f"--res {tc.res} must be a multiple of the patch size {mc.patch_size}")
    if not 1 <= tc.min_views <= tc.max_views:
        raise ValueError(f"need 1 <= min_views <= max_views, got {tc.min_views}, {tc.max_views}")
    config = U.config_to_dict(model=mc, train=tc)
    if U.is_main():
        clean_stale_tmp(tc.run_dir)

    train_ds, held_ds = make_datasets(tc)
    held = heldout_batch(held_ds, tc)
    train = Stream(train_ds, DynamicBatchSampler(len(train_ds), (tc.min_views, tc.max_views), tc.batch_size,
                                                 di.world_size, di.rank, seed=tc.seed),
                   num_workers=tc.num_workers, pin_memory=device.type == "cuda", collate_fn=collate_list,
                   seed=tc.seed)
    U.print0(f"data: {len(train_ds)} train sequences (read per step, {tc.num_workers} workers), {len(held)} held-out "
             f"x {held.shape[1]} views, crop {tc.res}px from {tc.src_res}px")

    model = MuM(mc).to(device)
    images_per_step = tc.batch_size * tc.grad_accum * di.world_size
    base_lr = tc.lr or tc.blr * images_per_step / 256
    U.print0(f"effective batch: {tc.batch_size} images/micro-step x {tc.grad_accum} accumulated x {di.world_size} "
             f"process(es) = {images_per_step} images/step (at most; floor(batch_size / V) sequences of V views); "
             "lr = " + (f"{base_lr:.3e} (--lr)" if tc.lr else
                        f"blr {tc.blr:g} x {images_per_step} / 256 = {base_lr:.3e}"))
    opt = model.configure_optimizer(base_lr, tc.weight_decay)
    try:
        res = load_checkpoint(tc.run_dir, model, opt, tc.resume, generators=None,
                              expect_config={"model": config["model"], "train": U.resume_config(tc)})
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    start = res.step if res else 0
    if res and "data" in res.extra:
        train.load_state_dict(res.extra["data"])                              # continue mid-epoch
    U.broadcast_state(model)                                                   # all ranks start identical
    if U.is_main():
        save_json(os.path.join(tc.run_dir, "config.json"), config)
    U.print0(f"MuM {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | {images_per_step} img/step | "
             f"lr {base_lr:.2e} | world {di.world_size} | " + (f"resumed at step {start}" if start else
                                                                 "from loaded weights" if res else "from scratch"))
    if tc.compile:
        model = torch.compile(model)
    dmodel = DDP(model) if di.ddp else model
    raw = unwrap(model)

    log = U.ProgressLogger(tc.run_dir, tc.steps, interval=tc.log_every, unit="img", tensorboard=tc.tensorboard)
    log.truncate(start)
    if start == 0:
        log.eval(0, {"loss": evaluate(raw, held, device, 0, tc)})
    t0 = time.time()
    for step in range(start, tc.steps):
        lr = U.lr_at(step, tc.steps, base_lr, tc.warmup, tc.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        n_img, loss_sum = 0, 0.0
        for micro in range(tc.grad_accum):
            x = crop_batch(next(train), tc).to(device)
            if tc.compile:
                mark_views_dynamic(x)
            with U.grad_sync(dmodel, micro, tc.grad_accum):
                with U.autocast(device, tc.amp):
                    loss = U.inject_nan(dmodel({"images": x})[0], step)
                (loss / tc.grad_accum).backward()
            loss_sum += loss.detach().float() / tc.grad_accum
            n_img += x.shape[0] * x.shape[1]
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        terms = U.finite_step({"loss": loss_sum}, gnorm, step, tc.run_dir)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.log(step, {**terms, "data_wait_s": train.take_wait()}, lr=lr, grad_norm=float(gnorm),
                items=n_img * di.world_size)

        done, last = step + 1, step + 1 == tc.steps
        if last or (tc.eval_every > 0 and done % tc.eval_every == 0):
            U.sync_buffers(raw)
            log.eval(done, {"loss": evaluate(raw, held, device, done, tc)})
            log.image("preview", os.path.join(tc.run_dir, f"preview_{done:06d}.png"), done)
        if last or (tc.ckpt_every > 0 and done % tc.ckpt_every == 0):
            U.sync_buffers(raw)
            save_checkpoint(tc.run_dir, raw, config, opt, done, extra={"data": train.state_dict()})
    U.print0(f"trained {tc.steps - start} steps in {time.time() - t0:.0f}s")
    if tc.match_eval and U.is_main():
        run_match_eval(tc)
    U.cleanup_dist()


if __name__ == "__main__":
    main()
