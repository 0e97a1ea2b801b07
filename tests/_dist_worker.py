"""Worker for tests/test_dist.py, run under torchrun: setup_dist() all-reduces the rank; broadcast_state and
sync_buffers make ranks identical; a checkpoint gives every rank its own RNG streams back (argv[1]: a run dir)."""
import random
import sys

import numpy as np
import torch
import torch.distributed as dist

from nano4d.checkpoint import load_checkpoint, save_checkpoint
from nano4d.utils import broadcast_state, cleanup_dist, print0, setup_dist, sync_buffers

info = setup_dist(seed=3)
x = torch.tensor([float(info.rank + 1)])
dist.all_reduce(x)
expected = info.world_size * (info.world_size + 1) / 2
draw = torch.rand(1)  # seeded with seed + rank: ranks must differ
draws = [torch.zeros(1) for _ in range(info.world_size)]
dist.all_gather(draws, draw)
ok = x.item() == expected and info.ddp and len({d.item() for d in draws}) == info.world_size


def gathered(t):
    out = [torch.zeros_like(t) for _ in range(info.world_size)]
    dist.all_gather(out, t.contiguous())
    return out


model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))      # initialised per rank
model(torch.randn(5, 3))                                                        # per-rank BN statistics
differ = not torch.equal(*gathered(model[0].weight.detach())) and not torch.equal(*gathered(model[1].running_mean))
broadcast_state(model)
model(torch.randn(5, 3))
sync_buffers(model)
same = all(torch.equal(*gathered(t.detach())) for t in list(model.parameters()) + list(model.buffers()))

gen = torch.Generator().manual_seed(10 + info.rank)
save_checkpoint(sys.argv[1], model, {"v": 1}, None, step=5, generators={"g": gen}, rank_extra={"r": info.rank})
dist.barrier()                                                                  # rank 0 has written


def streams():
    return torch.rand(2), float(np.random.rand()), random.random(), torch.rand(2, generator=gen)


after = streams()
torch.manual_seed(99), np.random.seed(99), random.seed(99), gen.manual_seed(99)
res = load_checkpoint(sys.argv[1], model, generators={"g": gen})
again = streams()
restored = res.step == 5 and res.rank_extra == {"r": info.rank} and all(
    torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(after, again))
own = not torch.equal(*gathered(again[0])) and not torch.equal(*gathered(again[3]))  # each rank its own streams
ok = ok and differ and same and restored and own
print(f"rank {info.rank}/{info.world_size} backend={dist.get_backend()} sum={x.item()} differ={differ} same={same} "
      f"restored={restored} own={own} ok={ok}", flush=True)
print0("MAIN-ONLY LINE")
cleanup_dist()
sys.exit(0 if ok else 1)
