"""Train GeoLRM (posed images -> 3D Gaussians): proposal network, then reconstruction network.

    torchrun --standalone --nproc_per_node=2 train_geolrm.py            # tiny preset, procedural objects (CPU ok)
    python train_geolrm.py --stage proposal|recon|all --preset paper --data DIR --model.grad_checkpoint true
    python train_geolrm.py --infer OBJ_DIR_OR_PT --ckpt runs/geolrm/model.safetensors   # -> .ply + turntable

Stage ``all`` trains the proposal network on occupancy (BCE + scene-class affinity), freezes it, and trains the
reconstruction network on renders of its Gaussians in target views (inputs + other views, on random backgrounds).
Held-out objects are evaluated on novel views (PSNR/SSIM/LPIPS vs a mean-colour baseline, occupancy IoU);
at the end the run dir holds model.safetensors, preview.png, metrics.json and held-out .ply files.
``--data DIR``: a folder of GObjaverse-layout objects (``nano4d.data.gobjaverse.read_gobjaverse_object``); the last
``num_val`` objects are held out. Without an occupancy.npy the target is binned from the depth maps.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from nano4d import utils as U
from nano4d.checkpoint import (CheckpointError, clean_stale_tmp, load_checkpoint, load_weights, save_checkpoint,
                               save_json)
from nano4d.cameras import look_at
from nano4d.data.gobjaverse import list_objects, occupancy_from_depth, read_gobjaverse_object
from nano4d.data.objects import ProceduralObjects
from nano4d.geolrm import (PRESETS, GeoLRM, GeoLRMConfig, Gaussians, load_dinov2_hf, occupancy_iou, occupancy_loss,
                           recon_loss, render)
from nano4d.metrics import load_lpips, psnr, ssim
from nano4d.ply import save_ply
from nano4d.utils import flag


# Named bundles of flag values (train fields, "preset", "model.<field>"): --recipe NAME; explicit flags win.
RECIPES: dict = {}


@dataclasses.dataclass
class TrainConfig:
    run_dir: str = flag("runs/geolrm", "output folder: weights, resume state, log.jsonl, preview, metrics.json, .ply; "
                        "a run resumes from it", resume_may_change=True)
    stage: str = flag("all", "proposal: occupancy network; recon: reconstruction network; all: both in turn",
                      choices=("proposal", "recon", "all"))
    data: str = flag("", "GObjaverse-layout folder; '' = procedural objects")
    num_train: int = flag(96, "training objects (procedural), split over ranks")
    num_val: int = flag(8, "held-out objects (the last ones of --data)")
    views_per_object: int = flag(8, "rendered views per training object")
    eval_views: int = flag(12, "views per held-out object: up to 8 inputs + novel views")
    novel_views: int = flag(4, "held-out novel views per object (the last ones)")
    res: int = flag(32, "rendered/target resolution (inputs are resized to model.img_size)")
    min_inputs: int = flag(1, "fewest input views per training sample")
    max_inputs: int = flag(4, "most input views per training sample (paper: 1-7)")
    num_targets: int = flag(4, "target views per object and step (some inputs + other views)")
    batch_size: int = flag(1, "objects per rank and micro-step")
    grad_accum: int = flag(1, "micro-steps per optimizer step (gradients all-reduced once, at the last)")
    prop_steps: int = flag(400, "optimizer steps of the proposal stage")
    recon_steps: int = flag(500, "optimizer steps of the reconstruction stage")
    prop_lr: float = flag(1e-3, "peak lr of the proposal stage")
    recon_lr: float = flag(1e-3, "peak lr of the reconstruction stage")
    warmup: int = flag(30, "linear lr warmup steps (each stage)")
    min_lr_ratio: float = flag(0.05, "cosine decays to min_lr_ratio * lr")
    weight_decay: float = flag(0.05, "AdamW weight decay (matrices only, not embeddings)")
    grad_clip: float = flag(1.0, "gradient-norm clip")
    anchors: str = flag("proposal", "recon-stage anchors: proposal (paper) or gt (ground-truth occupancy)",
                        choices=("proposal", "gt"))
    lpips: bool = flag(True, "LPIPS(VGG) loss term and metric when the weights are present")
    eval_inputs: int = flag(4, "input views of held-out objects")
    eval_every: int = flag(0, "steps per held-out eval; 0 = only at the end of each stage", resume_may_change=True)
    log_every: int = flag(10, "steps per progress line", resume_may_change=True)
    ckpt_every: int = flag(100, "steps per checkpoint; 0 = only at the end of each stage", resume_may_change=True)
    export_ply: int = flag(2, "held-out objects exported as .ply at the end", resume_may_change=True)
    dino: str = flag("", "optional HF facebook/dinov2-* model.safetensors for both encoders")
    init: str = flag("", "optional model.safetensors to start from (e.g. a proposal-stage run)")
    seed: int = flag(0, "seed (rank r uses seed + r)")
    amp: str = flag("auto", "autocast: auto = bf16 on CUDA, off on CPU", choices=("auto", "bf16", "off"))
    resume: str = flag("auto", "auto: continue from run_dir's checkpoint if there is one (exactly; the config must "
                       "match); weights: load its weights only, start at step 0; fresh: start over",
                       choices=("auto", "fresh", "weights"), resume_may_change=True)
    tensorboard: bool = flag(False, "also log to run_dir/tb (needs the tensorboard package)", resume_may_change=True)
    recipe: str = flag("default", "named bundle of flag values from RECIPES", resume_may_change=True)
    infer: str = flag("", "inference: object folder (GObjaverse layout) or .pt {images, c2w, K}",
                      resume_may_change=True)
    ckpt: str = flag("", "inference: weights (model.safetensors)", resume_may_change=True)
    infer_views: str = flag("", "inference: comma-separated view ids (default: all)", resume_may_change=True)
    turntable: int = flag(8, "views of the turntable strip next to each .ply", resume_may_change=True)


# ----------------------------------------------------------------------------- data


def load_objects(tc: TrainConfig, mc: GeoLRMConfig, split: str, n: int, views: int, rank: int, world: int):
    """This rank's share of the objects: dicts of images (V,3,H,W) on white, alphas, depths, c2w, K, occupancy."""
    idx = list(range(rank, n, world))
    if tc.data:
        dirs = [os.path.join(tc.data, d) for d in list_objects(tc.data)]
        dirs = dirs[:-tc.num_val] if split == "train" else dirs[-tc.num_val:]
        objs = []
        for i in range(rank, len(dirs), world):
            r = read_gobjaverse_object(dirs[i])
            if r["depths"] is None:
                raise ValueError(f"{dirs[i]}: GeoLRM training needs depth maps (<view>_depth.npy/.png or _nd.exr)")
            s = tc.res / r["images"].shape[-1]
            rs = lambda x: F.interpolate(x, size=(tc.res, tc.res), mode="area")  # noqa: E731
            K = r["K"].clone()
            K[:, :2] *= s
            a = rs(r["alphas"])
            dep = rs(r["depths"] * (r["alphas"] > 0.5)) / rs((r["alphas"] > 0.5).float()).clamp_min(1e-6)
            o = dict(images=rs(r["images"] * r["alphas"]) + 1 - a, alphas=a, depths=dep, c2w=r["c2w"], K=K)
            occ = r.get("occupancy")
            o["occupancy"] = occ if occ is not None and occ.shape[0] == mc.occ_res else \
                occupancy_from_depth(r["depths"], r["alphas"], r["c2w"], r["K"], mc.occ_res)
            objs.append(o)
        return objs
    ds = ProceduralObjects(num_objects=n, num_views=views, res=tc.res, seed=tc.seed, split=split,
                           occ_res=mc.occ_res, occ_mode="surface", num_surface_points=0, background="white")
    keys = ("images", "alphas", "depths", "c2w", "K", "occupancy")
    return [{k: v for k, v in ds[i].items() if k in keys} for i in idx]


def model_inputs(imgs, K, size: int):
    """Resize input views (B, V, 3, H, W) to the encoder size and scale K accordingly."""
    B, V, _, H, W = imgs.shape
    if (H, W) == (size, size):
        return imgs, K
    imgs = F.interpolate(imgs.flatten(0, 1), size=(size, size), mode="bilinear", antialias=True).view(B, V, 3, size, size)
    K = K.clone()
    K[..., 0, :] *= size / W
    K[..., 1, :] *= size / H
    return imgs, K


def make_batch(objs, tc: TrainConfig, device):
    """Random objects, a random number of input views (on white), and targets = some inputs + other views,
    composited on a random background colour."""
    n_in = random.randint(tc.min_inputs, tc.max_inputs)
    n_tin = min(n_in, tc.num_targets // 2)
    B = {k: [] for k in ("in_img", "in_c2w", "in_K", "rgb", "alpha", "depth", "c2w", "K", "bg", "occ")}
    for o in random.sample(objs, tc.batch_size) if len(objs) >= tc.batch_size else random.choices(objs, k=tc.batch_size):
        perm = torch.randperm(o["images"].shape[0])
        vin, vt = perm[:n_in], torch.cat([perm[:n_tin], perm[n_in:n_in + tc.num_targets - n_tin]])
        bg = torch.rand(len(vt), 3)
        a = o["alphas"][vt]
        B["rgb"].append(o["images"][vt] + (1 - a) * (bg[:, :, None, None] - 1))       # white -> random bg
        B["alpha"].append(a), B["depth"].append(o["depths"][vt]), B["bg"].append(bg)
        B["c2w"].append(o["c2w"][vt]), B["K"].append(o["K"][vt])
        B["in_img"].append(o["images"][vin]), B["in_c2w"].append(o["c2w"][vin]), B["in_K"].append(o["K"][vin])
        B["occ"].append(o["occupancy"])
    return {k: torch.stack(v).to(device) for k, v in B.items()}


# ----------------------------------------------------------------------------- eval, export, inference


@torch.no_grad()
def evaluate(model, objs, tc: TrainConfig, stage: str, lpips_fn, n_inputs=None, preview=None):
    """Novel-view metrics on this rank's held-out objects, averaged over all ranks. Inputs: the first
    ``n_inputs`` views; targets: the last ``novel_views`` views, on white. Also the mean-colour baseline
    (each target predicted as its own mean colour) and occupancy IoU."""
    with U.rng_isolated():
        return _evaluate(model, objs, tc, stage, lpips_fn, n_inputs, preview)


def _evaluate(model, objs, tc, stage, lpips_fn, n_inputs, preview):
    was = model.training
    model.eval()
    n_in = n_inputs or tc.eval_inputs
    dev = next(model.parameters()).device
    sums = torch.zeros(8, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)                                         # same anchor subsets every eval
    rows = []
    for o in objs:
        x = {k: v[None].to(dev) for k, v in o.items()}
        img, K = model_inputs(x["images"][:, :n_in], x["K"][:, :n_in], model.cfg.img_size)
        c2w = x["c2w"][:, :n_in]
        logits = model.proposal(img, c2w, K)
        sums[0] += occupancy_iou(logits, x["occupancy"]).sum()
        sums[1] += 1
        if stage == "proposal":
            continue
        tv = slice(-tc.novel_views, None)
        anchors = (model.gt_anchors(x["occupancy"]) if tc.anchors == "gt" else
                   model.propose_anchors(img, c2w, K, generator=gen))
        g = model.recon(*anchors, img, c2w, K)
        T = tc.novel_views
        out = render(g, x["c2w"][:, tv], x["K"][:, tv], tc.res, tc.res, background=torch.ones(1, T, 3, device=dev))
        pred, gt = out["rgb"][0].clamp(0, 1), x["images"][0, tv]
        base = gt.mean((2, 3), keepdim=True).expand_as(gt)
        sums[2] += psnr(pred, gt).sum()
        sums[3] += ssim(pred, gt).sum()
        sums[5] += psnr(base, gt).sum()
        sums[6] += ssim(base, gt).sum()
        if lpips_fn is not None:
            sums[4] += lpips_fn(pred, gt).sum()
            sums[7] += lpips_fn(base, gt).sum()
        if preview is not None and len(rows) < 6:
            rows += [x["images"][0, :n_in], pred, gt]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was)
    if preview is not None and U.is_main() and rows:
        U.save_image_grid(preview, [upscale(r) for r in rows])
    n, nv = max(sums[1].item(), 1), max(sums[1].item() * tc.novel_views, 1)
    res = {"occ_iou": sums[0].item() / n}
    if stage != "proposal":
        res.update(psnr=sums[2].item() / nv, ssim=sums[3].item() / nv, base_psnr=sums[5].item() / nv,
                   base_ssim=sums[6].item() / nv)
        if lpips_fn is not None:
            res.update(lpips=sums[4].item() / nv, base_lpips=sums[7].item() / nv)
    return res


def upscale(images, min_size: int = 96):
    """Nearest-neighbour enlargement of tiny renders for viewing."""
    f = max(1, math.ceil(min_size / images.shape[-1]))
    return F.interpolate(images.float().cpu(), scale_factor=f, mode="nearest") if f > 1 else images


def reconstruct(model: GeoLRM, images, c2w, K, seed: int = 0) -> Gaussians:
    """Inference: one object's views (V, 3, H, W) in [0, 1] on white -> its Gaussians (``GeoLRM.reconstruct``)."""
    return model.reconstruct(images, c2w, K, seed=seed)


@torch.no_grad()
def turntable(g: Gaussians, K, res: int, n: int, distance: float, elevation_deg: float = 20.0):
    """Render Gaussians (M, .) from ``n`` cameras on a circle around the origin -> (n, 3, res, res)."""
    az = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    el = math.radians(elevation_deg)
    eye = distance * torch.stack([math.cos(el) * az.cos(), math.cos(el) * az.sin(), torch.full_like(az, math.sin(el))], -1)
    c2w = look_at(eye, torch.zeros(3, dtype=torch.float64)).float()
    dev = g.means.device
    out = render(Gaussians(*(t[None] for t in g)), c2w[None].to(dev), K.expand(1, n, 3, 3).to(dev), res, res,
                 background=torch.ones(1, n, 3, device=dev))
    return out["rgb"][0].clamp(0, 1)


def export(g: Gaussians, path: str, K, res: int, n: int, distance: float) -> tuple:
    m = save_ply(path, *g)
    strip = U.save_image_grid(path.replace(".ply", "_turntable.png"), [upscale(turntable(g, K, res, n, distance))])
    return m, strip


def infer_main(tc: TrainConfig):
    sd, cfg = load_weights(tc.ckpt)
    mc = GeoLRMConfig(**{k: v for k, v in cfg["model"].items() if k in {f.name for f in dataclasses.fields(GeoLRMConfig)}})
    model = GeoLRM(mc)
    model.load_state_dict(sd)
    if tc.infer.endswith(".pt"):
        obj = torch.load(tc.infer, weights_only=True)
        images = obj["images"].float()
    else:
        obj = read_gobjaverse_object(tc.infer, [int(v) for v in tc.infer_views.split(",")] if tc.infer_views else None)
        images = obj["images"] * obj["alphas"] + 1 - obj["alphas"]                 # straight colour -> on white
    c2w, K = obj["c2w"].float(), obj["K"].float()
    g = reconstruct(model, images, c2w, K)
    os.makedirs(tc.run_dir, exist_ok=True)
    dist_ = c2w[:, :3, 3].norm(dim=-1).mean().item()
    Kt = K[0].clone()
    Kt[:2] *= cfg["train"]["res"] / images.shape[-1]
    m, strip = export(g, os.path.join(tc.run_dir, "infer.ply"), Kt, cfg["train"]["res"], tc.turntable, dist_)
    print(f"{len(images)} views -> {m} Gaussians: {os.path.join(tc.run_dir, 'infer.ply')}, {strip}")


# ----------------------------------------------------------------------------- training


def main(argv=None):
    tc, mc = U.parse_config(TrainConfig, GeoLRMConfig, PRESETS, argv=argv, recipes=RECIPES)
    if tc.infer:
        return infer_main(tc)
    info = U.setup_dist(tc.seed)
    dev, rank, world = info.device, info.rank, info.world_size
    U.print0(U.format_config(train=tc, model=mc))
    config = U.config_to_dict(train=tc, model=mc)
    if U.is_main():
        clean_stale_tmp(tc.run_dir)
    U.print0(f"GeoLRM: {world} process(es) on {dev}, run dir {tc.run_dir}")
    t0 = time.time()
    train_objs = load_objects(tc, mc, "train", tc.num_train, tc.views_per_object, rank, world)
    eval_objs = load_objects(tc, mc, "test", tc.num_val, tc.eval_views, rank, world)
    U.print0(f"data: {tc.num_train} train / {tc.num_val} held-out objects ({'procedural' if not tc.data else tc.data}) "
             f"in {time.time() - t0:.0f}s")

    model = GeoLRM(mc).to(dev)
    if tc.init:
        load_weights(tc.init, model)
    elif tc.stage == "recon" and tc.anchors == "proposal" and not os.path.exists(os.path.join(tc.run_dir, "resume.pt")):
        U.print0("WARNING: --stage recon without --init: the proposal network is untrained (random anchors)")
    if tc.dino:
        from safetensors.torch import load_file
        hf = load_file(tc.dino)
        for enc in (model.proposal.encoder, model.recon.encoder):
            load_dinov2_hf(enc, hf)
    U.print0(f"parameters: proposal {sum(p.numel() for p in model.proposal.parameters()) / 1e6:.2f}M, "
             f"reconstruction {sum(p.numel() for p in model.recon.parameters()) / 1e6:.2f}M")
    lpips_fn = None
    if tc.lpips:
        try:
            lpips_fn = load_lpips("vgg", device=dev)
            lpips_fn.requires_grad_(False)
        except (FileNotFoundError, OSError) as e:
            U.print0(f"WARNING: LPIPS weights not available ({e}); training and evaluating WITHOUT the LPIPS term.")

    stages = [s for s in ("proposal", "recon") if tc.stage in (s, "all")]
    steps = {"proposal": tc.prop_steps, "recon": tc.recon_steps}
    offset = {"proposal": 0, "recon": tc.prop_steps if "proposal" in stages else 0}
    total = sum(steps[s] for s in stages)
    try:
        res = load_checkpoint(tc.run_dir, model, None, tc.resume,
                              expect_config={"model": config["model"], "train": U.resume_config(tc)})
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    start, extra = (res.step, res.extra) if res else (0, {})
    U.broadcast_state(model)                                                   # all ranks start identical
    if U.is_main():
        save_json(os.path.join(tc.run_dir, "config.json"), config)
    if start:
        U.print0(f"resumed from {tc.run_dir} at step {start}")
    metrics = dict(extra.get("metrics", {}))
    log = U.ProgressLogger(tc.run_dir, total, tc.log_every, unit="obj", tensorboard=tc.tensorboard)
    log.truncate(start)
    for stage in stages:
        if start >= offset[stage] + steps[stage]:
            continue
        net = model.proposal if stage == "proposal" else model.recon
        model.proposal.requires_grad_(stage == "proposal")
        model.recon.requires_grad_(stage == "recon")
        ddp = DDP(net) if info.ddp else net
        lr = tc.prop_lr if stage == "proposal" else tc.recon_lr
        decay = [p for n, p in net.named_parameters() if p.ndim >= 2 and "embed" not in n]
        other = [p for n, p in net.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay}, {"params": other, "weight_decay": 0.0}],
                                lr=lr, betas=(0.9, 0.95))
        if start > offset[stage] and extra.get("stage") == stage:
            opt.load_state_dict(res.optimizer)
        model.train()
        U.print0(f"== stage {stage}: {steps[stage]} steps, lr {lr:g}")
        for s in range(max(0, start - offset[stage]), steps[stage]):
            gstep = offset[stage] + s                                              # step of the whole run
            cur = U.lr_at(s, steps[stage], lr, tc.warmup, tc.min_lr_ratio)
            for grp in opt.param_groups:
                grp["lr"] = cur
            terms_sum = {}
            for micro in range(tc.grad_accum):
                b = make_batch(train_objs, tc, dev)
                img, K = model_inputs(b["in_img"], b["in_K"], mc.img_size)
                with U.grad_sync(ddp, micro, tc.grad_accum):
                    with U.autocast(dev, tc.amp):
                        if stage == "proposal":
                            terms = occupancy_loss(ddp(img, b["in_c2w"], K), b["occ"])
                        else:
                            anchors = (model.gt_anchors(b["occ"]) if tc.anchors == "gt"
                                       else model.propose_anchors(img, b["in_c2w"], K))
                            g = ddp(*anchors, img, b["in_c2w"], K)
                            out = render(g, b["c2w"], b["K"], tc.res, tc.res, background=b["bg"])
                            terms = recon_loss(out, b, mc, lpips_fn)
                    terms["loss"] = U.inject_nan(terms["loss"], gstep)
                    (terms["loss"] / tc.grad_accum).backward()
                for k, v in terms.items():
                    terms_sum[k] = terms_sum.get(k, 0.0) + v.item() / tc.grad_accum
            gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)
            terms_mean = U.finite_step(terms_sum, gnorm, gstep, tc.run_dir)
            opt.step()
            opt.zero_grad(set_to_none=True)
            log.log(gstep, terms_mean, cur, gnorm.item(), items=tc.batch_size * tc.grad_accum * world, stage=stage)
            done, last = gstep + 1, s + 1 == steps[stage]
            if last or (tc.eval_every > 0 and (s + 1) % tc.eval_every == 0):
                U.sync_buffers(model)
                metrics[stage] = evaluate(model, eval_objs, tc, stage, lpips_fn,
                                          preview=os.path.join(tc.run_dir, "preview.png") if stage == "recon" else None)
                log.eval(done, metrics[stage], stage=stage)
                log.image("preview", os.path.join(tc.run_dir, "preview.png") if stage == "recon" else "", done)
            if last or (tc.ckpt_every > 0 and (s + 1) % tc.ckpt_every == 0):
                U.sync_buffers(model)
                save_checkpoint(tc.run_dir, model, config, opt, done, extra={"stage": stage, "metrics": metrics})
        start = offset[stage] + steps[stage]
        del ddp

    if "recon" in stages:
        sweep = {}
        for n in (2, 4, 8):
            if n + tc.novel_views <= tc.eval_views:
                sweep[n] = evaluate(model, eval_objs, tc, "recon", None, n_inputs=n)["psnr"]
        U.print0("held-out PSNR vs input views: " + ", ".join(f"{n}: {p:.2f} dB" for n, p in sweep.items()))
        metrics["psnr_vs_views"] = sweep
        if U.is_main():
            for i, o in enumerate(eval_objs[:tc.export_ply]):
                n = tc.eval_inputs
                g = reconstruct(model, o["images"][:n], o["c2w"][:n], o["K"][:n])
                path = os.path.join(tc.run_dir, f"heldout_{i}.ply")
                m, strip = export(g, path, o["K"][0], tc.res, tc.turntable, o["c2w"][0, :3, 3].norm().item())
                U.print0(f"held-out object {i}: {m} Gaussians -> {path}, {strip}")
    if U.is_main():
        save_json(os.path.join(tc.run_dir, "metrics.json"), {**metrics, "time_s": time.time() - t0})
        U.print0(f"done in {time.time() - t0:.0f}s: weights {os.path.join(tc.run_dir, 'model.safetensors')}, "
                 f"preview {os.path.join(tc.run_dir, 'preview.png')}, metrics {os.path.join(tc.run_dir, 'metrics.json')}")
    U.cleanup_dist()
    return metrics


if __name__ == "__main__":
    main()
