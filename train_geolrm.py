"""Train GeoLRM (posed images -> 3D Gaussians): proposal network, then reconstruction network.

    torchrun --standalone --nproc_per_node=2 train_geolrm.py            # tiny preset, procedural objects (CPU ok)
    torchrun --nproc_per_node=8 train_geolrm.py --recipe paper --data GOBJAVERSE_DIR   # the paper's two stages
    python train_geolrm.py --infer OBJ_DIR_OR_PT --ckpt runs/geolrm                    # -> .ply + turntable
    python train_geolrm.py --infer OBJ_DIR_OR_PT --official geolrm.ckpt --res 256      # the released model

Stage ``all`` trains the proposal network on occupancy (BCE + scene-class affinity), freezes it, and trains the
reconstruction network on renders of its Gaussians in target views (inputs + other views, on random backgrounds);
each stage has its own schedule (``--prop_*`` / ``--recon_*``; -1 = the shared flag). Held-out objects are
evaluated on novel views (PSNR/SSIM/LPIPS vs a mean-colour baseline, occupancy IoU); at the end the run dir holds
model.safetensors, preview.png, metrics.json and held-out .ply files. Both stages go through the model's front
door ``GeoLRM.forward(batch) -> (loss, out)``.
``--data DIR``: a folder of GObjaverse-layout objects (``nano4d.data.gobjaverse.read_gobjaverse_object``); the last
``num_val`` objects are held out; objects are read per step (``--num_workers``). Occupancy targets: GeoLRM's
pts.npy under ``--occ_root``, else the object's occupancy.npy, else binned from the depth maps of the views read.
``--infer``: one object (GObjaverse folder, or a ``.pt`` of {images (V,3,H,W) in [0,1] on white, c2w (V,4,4)
OpenCV, K (V,3,3) pixels}) -> run_dir/infer.ply (+ turntable); deterministic given ``--seed``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Dataset

from nano4d import utils as U
from nano4d.cameras import look_at
from nano4d.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from nano4d.data.gobjaverse import GObjaverseDataset, list_objects, read_gobjaverse_object
from nano4d.data.objects import ProceduralObjects
from nano4d.data.sampling import ResumableSampler, Stream, collate_list
from nano4d.files import clean_stale_tmp, colorize, save_image_grid, save_json
from nano4d.geolrm import PRESETS, GeoLRM, GeoLRMConfig, Gaussians, load_dinov2_hf, render, resize_views
from nano4d.metrics import load_lpips, psnr, ssim
from nano4d.ply import save_ply
from nano4d.utils import flag
from nano4d.view import save_cameras

# Named bundles of flag values (train fields, "preset", "model.<field>"): --recipe NAME; explicit flags win.
# "paper": the official configs/srl-bf16.yaml (stage 1: lr 2e-4, 500 warmup steps, cosine to 0.001x at 50k,
# clip 10, 1-4 orbit + 0-4 random inputs, 2 objects x 8 GPUs) and configs/geolrm-train.yaml (stage 2: lr 1e-4,
# 12k warmup, 100k steps, clip 4, 1-4 + 0-3 inputs, all 8 views as 448 px targets on a random background,
# 1 object x 8 accumulation x 32 GPUs = 256, gradient checkpointing), AdamW (0.9, 0.95), weight decay 0.05.
RECIPES: dict = {
    "paper": {"preset": "paper", "model.grad_checkpoint": True, "res": 448, "views_per_object": 8, "num_targets": 8,
              "min_inputs": 1, "weight_decay": 0.05, "min_lr_ratio": 0.001, "batch_size": 1, "lpips": True,
              "prop_steps": 50_000, "prop_lr": 2e-4, "prop_warmup": 500, "prop_grad_clip": 10.0,
              "prop_max_inputs": 8, "prop_objects_per_step": 16,
              "recon_steps": 100_000, "recon_lr": 1e-4, "recon_warmup": 12_000, "recon_grad_clip": 4.0,
              "recon_max_inputs": 7, "recon_objects_per_step": 256},
}


@dataclasses.dataclass
class TrainConfig(U.RunFlags):
    run_dir: str = flag("runs/geolrm", "output folder: weights, resume state, log.jsonl, preview, metrics.json, .ply; "
                        "a run resumes from it", resume_may_change=True)
    stage: str = flag("all", "proposal: occupancy network; recon: reconstruction network; all: both in turn",
                      choices=("proposal", "recon", "all"))
    data: str = flag("", "GObjaverse-layout folder; '' = procedural objects")
    num_train: int = flag(96, "training objects (procedural, rendered on demand), shuffled and split over ranks "
                          "each epoch")
    num_workers: int = flag(0, "DataLoader worker processes per rank (0 = read/render in the training process)")
    cache_dir: str = flag("", "procedural renders are stored here (GObjaverse layout) and read back; '' = render "
                          "every time", resume_may_change=True)
    occ_root: str = flag("", "--data: GeoLRM's occupancy targets <occ_root>/<object>/pts.npy; '' = the object's "
                         "occupancy.npy, else binned from the depth of the views read")
    num_val: int = flag(8, "held-out objects (the last ones of --data)")
    views_per_object: int = flag(8, "rendered views per training object")
    eval_views: int = flag(12, "views per held-out object: up to 8 inputs + novel views")
    novel_views: int = flag(4, "held-out novel views per object (the last ones)")
    res: int = flag(32, "rendered/target resolution (inputs are resized to model.img_size); --infer: turntable size")
    min_inputs: int = flag(1, "fewest input views per training sample")
    max_inputs: int = flag(4, "most input views per training sample (paper: 1-8 proposal, 1-7 reconstruction)")
    num_targets: int = flag(4, "target views per object and step (some inputs + other views)")
    batch_size: int = flag(1, "objects per rank and micro-step")
    grad_accum: int = flag(1, "micro-steps per optimizer step (gradients all-reduced once, at the last)")
    prop_steps: int = flag(400, "optimizer steps of the proposal stage")
    recon_steps: int = flag(500, "optimizer steps of the reconstruction stage")
    prop_lr: float = flag(1e-3, "peak lr of the proposal stage")
    recon_lr: float = flag(1e-3, "peak lr of the reconstruction stage")
    warmup: int = flag(30, "linear lr warmup steps (each stage, unless --prop_warmup / --recon_warmup)")
    prop_warmup: int = flag(-1, "warmup steps of the proposal stage; -1 = --warmup")
    recon_warmup: int = flag(-1, "warmup steps of the reconstruction stage; -1 = --warmup")
    min_lr_ratio: float = flag(0.05, "cosine decays to min_lr_ratio * lr")
    weight_decay: float = flag(0.05, "AdamW weight decay (matrices only, not embeddings)")
    grad_clip: float = flag(1.0, "gradient-norm clip (each stage, unless --prop_grad_clip / --recon_grad_clip)")
    prop_grad_clip: float = flag(-1.0, "gradient-norm clip of the proposal stage; -1 = --grad_clip")
    recon_grad_clip: float = flag(-1.0, "gradient-norm clip of the reconstruction stage; -1 = --grad_clip")
    prop_max_inputs: int = flag(-1, "most input views in the proposal stage; -1 = --max_inputs")
    recon_max_inputs: int = flag(-1, "most input views in the reconstruction stage; -1 = --max_inputs")
    prop_objects_per_step: int = flag(0, "objects per proposal optimizer step over all ranks (sets the accumulation "
                                      "from --batch_size and the world size); 0 = --grad_accum")
    recon_objects_per_step: int = flag(0, "objects per reconstruction optimizer step over all ranks; 0 = --grad_accum")
    anchors: str = flag("proposal", "recon-stage anchors: proposal (paper) or gt (ground-truth occupancy)",
                        choices=("proposal", "gt"))
    lpips: bool = flag(True, "LPIPS(VGG) loss term and metric when the weights are present")
    eval_inputs: int = flag(4, "input views of held-out objects")
    eval_every: int = flag(0, "steps per held-out eval; 0 = only at the end of each stage", resume_may_change=True)
    log_every: int = flag(10, "steps per progress line", resume_may_change=True)
    ckpt_every: int = flag(100, "steps per checkpoint; 0 = only at the end of each stage", resume_may_change=True)
    export_ply: int = flag(2, "held-out objects exported as .ply at the end", resume_may_change=True)
    ply_sh_degree: int = flag(0, "f_rest bands written (zeros) into .ply files; 3 = what INRIA's default readers expect",
                              choices=(0, 1, 2, 3), resume_may_change=True)
    dino: str = flag("", "optional HF facebook/dinov2-* model.safetensors for both encoders")
    init: str = flag("", "optional model.safetensors to start from (e.g. a proposal-stage run)")
    seed: int = flag(0, "seed (rank r uses seed + r); --infer: the anchor-subset seed")
    infer: str = flag("", "inference: object folder (GObjaverse layout) or .pt {images, c2w, K}",
                      resume_may_change=True)
    ckpt: str = flag("", "inference: a nano4d run dir or its model.safetensors", resume_may_change=True)
    official: str = flag("", "inference: the released GeoLRM weights (geolrm.ckpt); --model.<field> flags override "
                         "what the tensors do not tell", resume_may_change=True)
    infer_views: str = flag("", "inference: comma-separated view ids (default: all)", resume_may_change=True)
    turntable: int = flag(8, "views of the turntable strip next to each .ply", resume_may_change=True)


def stage_plan(tc: TrainConfig, stage: str, world: int) -> dict:
    """One stage's schedule: steps, lr, warmup, clip, max inputs, accumulation (from objects per step)."""
    p = "prop" if stage == "proposal" else "recon"
    pick = lambda v, shared: shared if v < 0 else v  # noqa: E731
    ops = getattr(tc, f"{p}_objects_per_step")
    accum = max(1, math.ceil(ops / (tc.batch_size * world))) if ops > 0 else tc.grad_accum
    return dict(steps=getattr(tc, f"{p}_steps"), lr=getattr(tc, f"{p}_lr"),
                warmup=pick(getattr(tc, f"{p}_warmup"), tc.warmup), clip=pick(getattr(tc, f"{p}_grad_clip"), tc.grad_clip),
                max_inputs=pick(getattr(tc, f"{p}_max_inputs"), tc.max_inputs), accum=accum,
                batch=tc.batch_size * accum * world)


# ----------------------------------------------------------------------------- data


KEYS = ("images", "alphas", "depths", "c2w", "K", "occupancy")


class Objects(Dataset):
    """Objects as GeoLRM takes them (``KEYS``: images on white at ``res``, alphas, z-depth, c2w, K, occupancy),
    read or rendered when asked for: the dataset holds only an index."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        it = self.ds[i]
        if it.get("depths") is None:
            raise ValueError(f"{it.get('object_id', i)}: GeoLRM training needs depth maps "
                             "(<view>_depth.npy/.png or _nd.exr)")
        return {k: it[k] for k in KEYS}


def make_objects(tc: TrainConfig, mc: GeoLRMConfig, split: str) -> Objects:
    """The training ("train") or held-out ("test") objects: the last ``num_val`` objects of ``--data`` are held
    out; procedural objects come from disjoint seed streams. Training objects give ``views_per_object`` views
    (GObjaverse: 4 orbit views + random others, as GeoLRM draws them); held-out ones their first ``eval_views``."""
    views = tc.views_per_object if split == "train" else tc.eval_views
    if tc.data:
        names = list_objects(tc.data)
        names = names[:-tc.num_val] if split == "train" else names[-tc.num_val:]
        return Objects(GObjaverseDataset(tc.data, num_views=views, res=tc.res, background="white", seed=tc.seed,
                                         object_ids=names, random_views=split == "train", occ_res=mc.occ_res,
                                         occ_root=tc.occ_root or None))
    n = tc.num_train if split == "train" else tc.num_val
    return Objects(ProceduralObjects(num_objects=n, num_views=views, res=tc.res, seed=tc.seed, split=split,
                                     occ_res=mc.occ_res, occ_mode="surface", num_surface_points=0,
                                     background="white", cache_dir=tc.cache_dir or None))


def make_data(tc: TrainConfig, mc: GeoLRMConfig, info):
    """-> (training Stream: objects read per step in this rank's share of each epoch's shuffle, this rank's
    held-out objects, kept in memory)."""
    train = make_objects(tc, mc, "train")
    stream = Stream(train, ResumableSampler(len(train), info.world_size, info.rank, seed=tc.seed),
                    batch_size=tc.batch_size, num_workers=tc.num_workers, pin_memory=info.device.type == "cuda",
                    collate_fn=collate_list, seed=tc.seed)
    held = make_objects(tc, mc, "test")
    return stream, [held[i] for i in range(info.rank, len(held), info.world_size)]


def make_batch(objs, tc: TrainConfig, max_inputs: int, size: int, device) -> dict:
    """A front-door batch from the loader's objects: a random number of input views (on white, resized to the
    encoder's ``size``), targets = some inputs + other views composited on a random background colour."""
    n_in = random.randint(tc.min_inputs, max_inputs)
    n_tin = min(n_in, tc.num_targets // 2)
    keys = ("images", "c2w", "K", "target_rgb", "target_alpha", "target_depth", "target_c2w", "target_K",
            "background", "occupancy")
    B = {k: [] for k in keys}
    for o in objs:
        perm = torch.randperm(o["images"].shape[0])
        vin, vt = perm[:n_in], torch.cat([perm[:n_tin], perm[n_in:n_in + tc.num_targets - n_tin]])
        bg, a = torch.rand(len(vt), 3), o["alphas"][vt]
        vals = (o["images"][vin], o["c2w"][vin], o["K"][vin], o["images"][vt] + (1 - a) * (bg[:, :, None, None] - 1),
                a, o["depths"][vt], o["c2w"][vt], o["K"][vt], bg, o["occupancy"])
        for k, v in zip(keys, vals):
            B[k].append(v)
    batch = {k: torch.stack(v).to(device) for k, v in B.items()}
    batch["images"], batch["K"] = resize_views(batch["images"], batch["K"], size)
    return batch


# ----------------------------------------------------------------------------- eval, export, inference


@torch.no_grad()
def evaluate(model, objs, tc: TrainConfig, stage: str, lpips_fn, n_inputs=None, preview=None):
    """Novel-view metrics of held-out objects through the front door, averaged over ranks: inputs = the first
    ``n_inputs`` views, targets = the last ``novel_views`` (on white); mean-colour baseline; occupancy IoU."""
    with U.rng_isolated():
        return _evaluate(model, objs, tc, stage, lpips_fn, n_inputs, preview)


def _evaluate(model, objs, tc, stage, lpips_fn, n_inputs, preview):
    was = model.training
    model.eval()
    n_in, T = n_inputs or tc.eval_inputs, tc.novel_views
    dev = next(model.parameters()).device
    sums = torch.zeros(8, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)                                         # same anchor subsets every eval
    rows = []
    for o in objs:
        x = {k: v[None].to(dev) for k, v in o.items()}
        img, K = resize_views(x["images"][:, :n_in], x["K"][:, :n_in], model.cfg.img_size)
        batch = {"images": img, "c2w": x["c2w"][:, :n_in], "K": K, "occupancy": x["occupancy"],
                 "target_rgb": x["images"][:, -T:], "target_alpha": x["alphas"][:, -T:],
                 "target_depth": x["depths"][:, -T:], "target_c2w": x["c2w"][:, -T:], "target_K": x["K"][:, -T:],
                 "background": torch.ones(1, T, 3, device=dev)}
        _, out = model(batch, stage="proposal")
        sums[0] += out["occ_iou"]
        sums[1] += 1
        if stage == "proposal":
            continue
        occ = x["occupancy"] if tc.anchors == "gt" else out["occ_logits"] > 0
        batch["anchors"] = model.gt_anchors(occ, generator=gen)
        _, out = model(batch, stage="recon")
        pred, gt = out["rgb"][0].clamp(0, 1), batch["target_rgb"][0]
        base = gt.mean((2, 3), keepdim=True).expand_as(gt)
        sums[2:4] += torch.stack([psnr(pred, gt).sum(), ssim(pred, gt).sum()]).cpu()
        sums[5:7] += torch.stack([psnr(base, gt).sum(), ssim(base, gt).sum()]).cpu()
        if lpips_fn is not None:
            sums[4] += lpips_fn(pred, gt).sum()
            sums[7] += lpips_fn(base, gt).sum()
        if preview is not None and len(rows) < 10:                                # 2 objects x 5 labelled rows
            d, a = out["depth"][0], out["alpha"][0]
            rows += [x["images"][0, :n_in], pred, gt, a.clamp(0, 1), colorize(torch.where(a > 0.5, d, float("nan")))]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was)
    if preview is not None and U.is_main() and rows:
        save_image_grid(preview, rows, min_size=96, labels=["inputs", "renders", "targets", "alpha", "depth"] * (len(rows) // 5))
    n, nv = max(sums[1].item(), 1), max(sums[1].item() * T, 1)
    res = {"occ_iou": sums[0].item() / n}
    if stage != "proposal":
        res.update(psnr=sums[2].item() / nv, ssim=sums[3].item() / nv, base_psnr=sums[5].item() / nv,
                   base_ssim=sums[6].item() / nv)
        if lpips_fn is not None:
            res.update(lpips=sums[4].item() / nv, base_lpips=sums[7].item() / nv)
    return res


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


def export(g: Gaussians, path: str, K, res: int, n: int, distance: float, sh_degree: int, inputs) -> tuple:
    """``.ply`` + turntable strip (K at ``res`` px) + input views (images, c2w, K) as .cameras.npz for nano4d.view."""
    m = save_ply(path, *g, sh_degree=sh_degree)
    save_cameras(path[:-len(".ply")] + ".cameras.npz", *inputs)
    strip = save_image_grid(path.replace(".ply", "_turntable.png"), [turntable(g, K, res, n, distance)], min_size=96)
    return m, strip


def load_official(path: str, overrides: dict) -> GeoLRM:
    """The released weights (``torch.load`` of geolrm.ckpt: a state dict of tensors) -> ``GeoLRM.from_official``."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one message naming it
        raise SystemExit(f"error: {path}: cannot read it as a state dict of tensors ({type(e).__name__}: {e}); "
                         "for a full Lightning checkpoint run the official tools/save_state_dict.py first") from None
    return GeoLRM.from_official(sd, **overrides)


def infer_main(tc: TrainConfig, mc: GeoLRMConfig, argv) -> Gaussians:
    """One object -> run_dir/infer.ply + turntable, with a nano4d checkpoint (--ckpt) or the released model
    (--official; explicit --model.<field> flags override the sizes the tensors do not tell)."""
    if bool(tc.ckpt) == bool(tc.official):
        raise SystemExit("error: --infer needs exactly one of --ckpt (a nano4d run) or --official (geolrm.ckpt)")
    if tc.official:
        given = {a[len("--model."):].split("=")[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--model.")}
        model = load_official(tc.official, {k: getattr(mc, k) for k in given})
    else:
        model = GeoLRM.from_checkpoint(tc.ckpt)
    if tc.infer.endswith(".pt"):
        obj = torch.load(tc.infer, weights_only=True)
        images = obj["images"].float()
    else:
        obj = read_gobjaverse_object(tc.infer, [int(v) for v in tc.infer_views.split(",")] if tc.infer_views else None)
        images = obj["images"] * obj["alphas"] + 1 - obj["alphas"]                 # straight colour -> on white
    c2w, K = obj["c2w"].float(), obj["K"].float()
    model.to(U.setup_dist(tc.seed).device)
    g = model.reconstruct(images, c2w, K, seed=tc.seed)
    os.makedirs(tc.run_dir, exist_ok=True)
    Kt = K[0].clone()
    Kt[:2] *= tc.res / images.shape[-1]
    path = os.path.join(tc.run_dir, "infer.ply")
    m, strip = export(g, path, Kt, tc.res, tc.turntable, c2w[:, :3, 3].norm(dim=-1).mean().item(), tc.ply_sh_degree,
                      inputs=(images, c2w, K))
    print(f"{len(images)} views -> {m} Gaussians: {path}, {strip}")
    U.cleanup_dist()
    return g


# ----------------------------------------------------------------------------- training


def build(tc: TrainConfig, mc: GeoLRMConfig, dev):
    """The model (optionally from --init / --dino) and the LPIPS module (None without weights or --lpips false)."""
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
    model.use_lpips(lpips_fn)
    return model, lpips_fn


def train_stage(stage, model, tc, plan, data, info, log, offset, resumed, metrics, config):
    """One stage through the front door: accumulation, finite guard, eval, checkpoints."""
    train_objs, eval_objs, lpips_fn = data
    start = resumed.step if resumed else 0
    model.stage = stage
    model.proposal.requires_grad_(stage == "proposal")
    model.recon.requires_grad_(stage == "recon")
    ddp = DDP(model) if info.ddp else model
    opt = model.configure_optimizer(plan["lr"], tc.weight_decay, stage=stage)
    if resumed and start > offset and resumed.extra.get("stage") == stage:
        opt.load_state_dict(resumed.optimizer)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for s in range(max(0, start - offset), plan["steps"]):
        gstep = offset + s                                                         # step of the whole run
        cur = U.lr_at(s, plan["steps"], plan["lr"], plan["warmup"], tc.min_lr_ratio)
        for grp in opt.param_groups:
            grp["lr"] = cur
        terms_sum = {}
        for micro in range(plan["accum"]):
            batch = make_batch(next(train_objs), tc, plan["max_inputs"], model.cfg.img_size, info.device)
            if stage == "recon" and tc.anchors == "gt":
                batch["anchors"] = model.gt_anchors(batch["occupancy"])
            with U.grad_sync(ddp, micro, plan["accum"]):
                with U.autocast(info.device, tc.amp):
                    loss, out = ddp(batch)
                loss = U.inject_nan(loss, gstep)
                (loss / plan["accum"]).backward()
            for k, v in {**out["terms"], "loss": loss}.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + v.item() / plan["accum"]
        gnorm = torch.nn.utils.clip_grad_norm_(params, plan["clip"])
        terms_mean = U.finite_step(terms_sum, gnorm, gstep, tc.run_dir)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.log(gstep, {**terms_mean, "data_wait_s": train_objs.take_wait()}, cur, gnorm.item(), items=plan["batch"],
                stage=stage)
        done, last = gstep + 1, s + 1 == plan["steps"]
        if last or (tc.eval_every > 0 and (s + 1) % tc.eval_every == 0):
            U.sync_buffers(model)
            metrics[stage] = evaluate(model, eval_objs, tc, stage, lpips_fn,
                                      preview=os.path.join(tc.run_dir, "preview.png") if stage == "recon" else None)
            log.eval(done, metrics[stage], stage=stage)
            log.image("preview", os.path.join(tc.run_dir, "preview.png") if stage == "recon" else "", done)
        if last or (tc.ckpt_every > 0 and (s + 1) % tc.ckpt_every == 0):
            U.sync_buffers(model)
            save_checkpoint(tc.run_dir, model, config, opt, done,
                            extra={"stage": stage, "metrics": metrics, "data": train_objs.state_dict()})


def finish(model, tc, eval_objs, metrics, t0):
    """After the reconstruction stage: PSNR vs the number of input views and held-out .ply exports."""
    sweep = {n: evaluate(model, eval_objs, tc, "recon", None, n_inputs=n)["psnr"]
             for n in (2, 4, 8) if n + tc.novel_views <= tc.eval_views}
    U.print0("held-out PSNR vs input views: " + ", ".join(f"{n}: {p:.2f} dB" for n, p in sweep.items()))
    metrics["psnr_vs_views"] = sweep
    if U.is_main():
        for i, o in enumerate(eval_objs[:tc.export_ply]):
            n = tc.eval_inputs
            g = model.reconstruct(o["images"][:n], o["c2w"][:n], o["K"][:n], seed=tc.seed)
            path = os.path.join(tc.run_dir, f"heldout_{i}.ply")
            m, strip = export(g, path, o["K"][0], tc.res, tc.turntable, o["c2w"][0, :3, 3].norm().item(), tc.ply_sh_degree,
                              inputs=(o["images"][:n], o["c2w"][:n], o["K"][:n]))
            U.print0(f"held-out object {i}: {m} Gaussians -> {path}, {strip}")


def main(argv=None):
    tc, mc = U.parse_config(TrainConfig, GeoLRMConfig, PRESETS, argv=argv, recipes=RECIPES)
    if tc.infer:
        return infer_main(tc, mc, argv)
    info = U.setup_dist(tc.seed)
    U.print0(U.format_config(train=tc, model=mc))
    config = U.config_to_dict(train=tc, model=mc)
    if U.is_main():
        clean_stale_tmp(tc.run_dir)
    stages = [s for s in ("proposal", "recon") if tc.stage in (s, "all")]
    plans = {s: stage_plan(tc, s, info.world_size) for s in stages}
    for s, p in plans.items():
        U.print0(f"stage {s}: {p['steps']} steps, lr {p['lr']:g} (warmup {p['warmup']}, cosine to x{tc.min_lr_ratio:g}), "
                 f"clip {p['clip']:g}, {tc.min_inputs}-{p['max_inputs']} inputs, effective batch {p['batch']} objects "
                 f"= {tc.batch_size} x {p['accum']} accumulation x {info.world_size} ranks")
    t0 = time.time()
    data = make_data(tc, mc, info)
    U.print0(f"data: {len(data[0].sampler) * info.world_size} train objects (read per step, {tc.num_workers} workers) / "
             f"{tc.num_val} held-out ({tc.data or 'procedural'}) in {time.time() - t0:.0f}s")
    model, lpips_fn = build(tc, mc, info.device)
    try:
        resumed = load_checkpoint(tc.run_dir, model, None, tc.resume,
                                  expect_config={"model": config["model"], "train": U.resume_config(tc)})
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    U.broadcast_state(model)                                                   # all ranks start identical
    if U.is_main():
        save_json(os.path.join(tc.run_dir, "config.json"), config)
    if resumed and resumed.step:
        U.print0(f"resumed from {tc.run_dir} at step {resumed.step}")
    metrics = dict(resumed.extra.get("metrics", {})) if resumed else {}
    if resumed and "data" in resumed.extra:
        data[0].load_state_dict(resumed.extra["data"])                       # continue mid-epoch
    log = U.ProgressLogger(tc.run_dir, sum(p["steps"] for p in plans.values()), tc.log_every, unit="obj",
                           tensorboard=tc.tensorboard)
    log.truncate(resumed.step if resumed else 0)
    offset = 0
    for stage in stages:
        if not resumed or resumed.step < offset + plans[stage]["steps"]:
            train_stage(stage, model, tc, plans[stage], (*data, lpips_fn), info, log, offset, resumed, metrics, config)
        offset += plans[stage]["steps"]
    if "recon" in stages:
        finish(model, tc, data[1], metrics, t0)
    if U.is_main():
        save_json(os.path.join(tc.run_dir, "metrics.json"), {**metrics, "time_s": time.time() - t0})
        U.print0(f"done in {time.time() - t0:.0f}s: weights, preview.png, metrics.json in {tc.run_dir}")
    U.cleanup_dist()
    return metrics


if __name__ == "__main__":
    main()
