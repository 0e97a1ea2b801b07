"""Worker for tests/test_dist.py: run under torchrun; all-reduces the rank through setup_dist()."""
import sys

import torch
import torch.distributed as dist

from nano4d.utils import cleanup_dist, print0, setup_dist

info = setup_dist(seed=3)
x = torch.tensor([float(info.rank + 1)])
dist.all_reduce(x)
expected = info.world_size * (info.world_size + 1) / 2
draw = torch.rand(1)  # seeded with seed + rank: ranks must differ
draws = [torch.zeros(1) for _ in range(info.world_size)]
dist.all_gather(draws, draw)
ok = x.item() == expected and info.ddp and len({d.item() for d in draws}) == info.world_size
print(f"rank {info.rank}/{info.world_size} backend={dist.get_backend()} sum={x.item()} ok={ok}", flush=True)
print0("MAIN-ONLY LINE")
cleanup_dist()
sys.exit(0 if ok else 1)
