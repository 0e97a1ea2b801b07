"""nano4d.data.sampling: epoch-seeded sharded shuffling, exact mid-epoch resume, dynamic batches."""
import os

import pytest
import torch
from torch.utils.data import Dataset

from nano4d.data.sampling import DynamicBatchSampler, ResumableSampler, Stream


class _Items(Dataset):
    def __init__(self, n):
        self.n, self.epoch = n, 0

    def __len__(self):
        return self.n

    def set_epoch(self, e):
        self.epoch = e

    def __getitem__(self, i):
        i, S = i if isinstance(i, tuple) else (i, 0)
        return torch.tensor([i, S, self.epoch])


def _take(it, n):
    return [next(it).tolist() for _ in range(n)]


def test_epochs_shard_like_distributed_sampler():
    from torch.utils.data import DistributedSampler
    ds = _Items(10)
    for epoch in (0, 3):
        for r in range(3):
            ref = DistributedSampler(ds, num_replicas=3, rank=r, shuffle=True, seed=5)
            ref.set_epoch(epoch)
            s = ResumableSampler(10, 3, r, shuffle=True, seed=5)
            s.set_epoch(epoch)
            assert list(s) == list(ref) and len(s) == len(ref) == 4
    a, b = ResumableSampler(10, seed=1), ResumableSampler(10, seed=1)
    b.set_epoch(1)
    assert sorted(a) == list(range(10)) and list(a) != list(b)


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_and_resumed_iteration_sees_the_same_items(workers):
    """Consume 7 batches, save the sampler state, rebuild everything, consume 8 more: the same item sequence as
    15 uninterrupted batches, across an epoch boundary, although workers prefetch ahead."""
    def make():
        s = ResumableSampler(10, shuffle=True, seed=3)
        return s, Stream(_Items(10), s, batch_size=3, num_workers=workers)
    s, it = make()
    ref = _take(iter(it), 15)
    s, it = make()
    first = _take(iter(it), 7)
    state = s.state_dict()
    s2, it2 = make()
    it2.load_state_dict(state)
    rng_before = torch.random.get_rng_state()
    assert first + _take(iter(it2), 8) == ref
    assert torch.equal(torch.random.get_rng_state(), rng_before)          # the global RNG is left alone
    assert {r[2] for b in ref for r in [b[0]]} == {0, 1, 2, 3}              # epochs advance (and reach the dataset)
    s3, it3 = make()
    assert [next(it3).tolist() for _ in range(4)] == ref[:4]                 # next(stream) keeps one iterator
    it3.load_state_dict(state)
    assert next(it3).tolist() == ref[7]
    assert it.wait_s >= 0 and it.take_wait() >= 0 and it.wait_s == 0


def test_resume_on_another_world_size_skips_the_consumed_items():
    two = [ResumableSampler(12, 2, r, seed=0) for r in range(2)]
    seen = [i for s in two for i in list(s)[:3]]
    for s in two:
        s.advance(3)
    three = [ResumableSampler(12, 3, r, seed=0) for r in range(3)]
    for s in three:
        s.load_state_dict(two[0].state_dict())
    rest = [i for s in three for i in s]
    assert sorted(seen + rest) == list(range(12))
    with pytest.raises(ValueError, match="seed is 0 in the saved state but 1 here"):
        ResumableSampler(12, seed=1).load_state_dict(two[0].state_dict())


def test_dynamic_batches_replay_and_resume():
    b = DynamicBatchSampler(40, views=(2, 6), max_images=12, seed=1)
    batches = b.batches(0)
    assert [i for bt in batches for i, _ in bt] == ResumableSampler(40, seed=1).order(0)
    for bt in batches:
        S = bt[0][1]
        assert 2 <= S <= 6 and all(s == S for _, s in bt) and len(bt) <= max(1, 12 // S)
    assert len({bt[0][1] for bt in batches}) > 1 and batches == b.batches(0) and batches != b.batches(1)
    ranks = [DynamicBatchSampler(40, views=(2, 6), max_images=12, num_replicas=2, rank=r, seed=1) for r in range(2)]
    r0, r1 = ranks[0].batches(0), ranks[1].batches(0)
    assert [len(x) for x in r0] == [len(x) for x in r1] and [x[0][1] for x in r0] == [x[0][1] for x in r1]
    assert not {i for x in r0 for i, _ in x} & {i for x in r1 for i, _ in x}             # disjoint shards

    def make():
        s = DynamicBatchSampler(40, views=(2, 6), max_images=12, seed=1)
        return s, Stream(_Items(40), s)
    s, it = make()
    ref = _take(iter(it), len(batches) + 3)
    s, it = make()
    first = _take(iter(it), 5)
    s2, it2 = make()
    s2.load_state_dict(s.state_dict())
    assert first + _take(iter(it2), len(batches) - 2) == ref
    with pytest.raises(ValueError, match="views"):
        DynamicBatchSampler(40, views=(2, 5), max_images=12, seed=1).load_state_dict(s.state_dict())


_RSS_SCRIPT = r"""
import os, sys, torch
from nano4d.data.gobjaverse import GObjaverseDataset
from nano4d.data.sampling import ResumableSampler, Stream
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
torch.set_num_threads(1)
ds = GObjaverseDataset(sys.argv[1], num_views=4, res=16)
s = ResumableSampler(len(ds), seed=0)
it = iter(Stream(ds, s, batch_size=2))
for _ in range(5):
    next(it)
before = rss_mib()
for _ in range(int(sys.argv[2])):
    next(it)
print(len(ds), before, rss_mib())
"""


def test_rss_does_not_grow_with_the_dataset(tmp_path):
    """A disk dataset 10x larger (GObjaverse layout, 20 vs 200 objects) leaves the training process's RSS after
    the same number of steps where the small one leaves it: only the index is in memory, items are read per step."""
    import subprocess
    import sys

    from nano4d.data.gobjaverse import write_gobjaverse_object
    from nano4d.data.objects import orbit_cameras
    c2w, K = orbit_cameras(4, 32, seed=0)
    g = torch.Generator().manual_seed(0)
    for n, name in ((20, "small"), (200, "large")):
        for i in range(n):
            rgba = torch.rand(4, 32, 32, 4, generator=g)
            write_gobjaverse_object(str(tmp_path / name), f"{i:05d}", rgba, c2w, K, depth=torch.rand(4, 32, 32, generator=g))
    out = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for name in ("small", "large"):
        r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / name), "60"], capture_output=True,
                           text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        n, before, after = r.stdout.split()
        out[name] = (int(n), float(before), float(after))
    assert out["small"][0] == 20 and out["large"][0] == 200
    growth = {k: v[2] - v[1] for k, v in out.items()}
    assert growth["large"] < 8.0, (out, growth)                                 # MiB over 60 steps
    assert out["large"][2] < out["small"][2] + 8.0, out
