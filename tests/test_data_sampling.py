"""nano4d.data.sampling: epoch-seeded sharded shuffling, exact mid-epoch resume, dynamic batches."""
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from nano4d.data.sampling import DynamicBatchSampler, ResumableSampler, stream


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
        return s, stream(DataLoader(_Items(10), batch_size=3, sampler=s, num_workers=workers), s)
    s, it = make()
    ref = _take(iter(it), 15)
    s, it = make()
    first = _take(iter(it), 7)
    state = s.state_dict()
    s2, it2 = make()
    s2.load_state_dict(state)
    assert first + _take(iter(it2), 8) == ref
    assert {r[2] for b in ref for r in [b[0]]} == {0, 1, 2, 3}              # epochs advance (and reach the dataset)
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

    def make():
        s = DynamicBatchSampler(40, views=(2, 6), max_images=12, seed=1)
        return s, stream(DataLoader(_Items(40), batch_sampler=s), s)
    s, it = make()
    ref = _take(iter(it), len(batches) + 3)
    s, it = make()
    first = _take(iter(it), 5)
    s2, it2 = make()
    s2.load_state_dict(s.state_dict())
    assert first + _take(iter(it2), len(batches) - 2) == ref
    with pytest.raises(ValueError, match="views"):
        DynamicBatchSampler(40, views=(2, 5), max_images=12, seed=1).load_state_dict(s.state_dict())
