"""Samplers that shard, shuffle per epoch and resume mid-epoch, plus the loop helper that feeds training.

``ResumableSampler`` is ``DistributedSampler``'s contract (one permutation per epoch, seeded by
``seed + epoch``, padded to a multiple of the world size by repeating its head, rank r takes every R-th item)
with a position: ``state_dict()`` holds the epoch and how many items of it were *consumed* (handed to the
training loop, not merely prefetched by ``DataLoader`` workers), and a fresh sampler that loads it continues
with the next item. The position is kept as a global offset into the epoch's permutation, so a run may
resume on a different number of ranks (the items already seen by all ranks are skipped).

``DynamicBatchSampler`` is MuM's dynamic batching: per batch a view count S uniform in ``views`` = (min, max)
and ``max(1, max_images // S)`` sequences, yielded as lists of ``(index, S)`` that ``ImageSequenceFolder``
accepts; the S draws are seeded by (seed, epoch) and shared by all ranks (equal work per step, and every rank's
position is the same), so the batches of an epoch replay exactly and the position is counted in batches.

``Stream(dataset, sampler, ...)`` wraps the ``DataLoader`` and yields batches forever (epoch after epoch, calling
``set_epoch`` on the sampler and the dataset); it advances the sampler's position only when a batch reaches the
caller and accumulates the time spent waiting for data; ``next(stream)`` gives the next batch.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler


class ResumableSampler(Sampler):
    """Indices of an epoch for one rank, shuffled with ``seed + epoch``; resumable mid-epoch."""

    def __init__(self, num_items: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas), got rank {rank} of {num_replicas}")
        self.num_items, self.num_replicas, self.rank = int(num_items), int(num_replicas), int(rank)
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.epoch, self.offset = 0, 0          # offset: items of this epoch's padded order consumed by all ranks
        self.total = -(-self.num_items // self.num_replicas) * self.num_replicas

    def order(self, epoch: int) -> list[int]:
        """The epoch's global order, padded to a multiple of the world size."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + int(epoch))
            idx = torch.randperm(self.num_items, generator=g).tolist()
        else:
            idx = list(range(self.num_items))
        return (idx * (-(-self.total // len(idx))))[:self.total]

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (a no-op for the current epoch, so a resumed position stays)."""
        if int(epoch) != self.epoch:
            self.epoch, self.offset = int(epoch), 0

    def advance(self, n: int) -> None:
        """Mark ``n`` more items of this rank as consumed (every rank advances by the same count)."""
        self.offset = min(self.total, self.offset + int(n) * self.num_replicas)

    def __iter__(self):
        return iter(self.order(self.epoch)[self.offset + self.rank::self.num_replicas])

    def __len__(self) -> int:
        return (self.total - self.offset) // self.num_replicas

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "num_items": self.num_items, "seed": self.seed,
                "shuffle": self.shuffle, "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_items", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state: {key} is {state[key]!r} in the saved state but {getattr(self, key)!r} "
                                 "here; resume with the same dataset and seed")
        self.epoch = int(state["epoch"])
        # a different world size keeps the items all ranks consumed; the offset is rounded down to whole rounds
        self.offset = min(self.total, int(state["offset"]) // self.num_replicas * self.num_replicas)


class DynamicBatchSampler(Sampler):
    """MuM's dynamic batches over a ``ResumableSampler`` order: lists of (index, S), S per batch."""

    def __init__(self, num_items: int, views=(2, 12), max_images: int = 48, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 0):
        lo, hi = views
        if not 1 <= lo <= hi:
            raise ValueError(f"views must be (min, max) with 1 <= min <= max, got {views}")
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        self.items = ResumableSampler(num_items, num_replicas, rank, shuffle, seed)
        self.views, self.max_images, self.seed, self.rank = (int(lo), int(hi)), int(max_images), int(seed), int(rank)
        self.epoch, self.position = 0, 0        # position: batches of this epoch consumed

    def batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        order = self.items.order(epoch)[self.rank::self.items.num_replicas]
        g = np.random.default_rng([self.seed, int(epoch)])         # the same S sequence on every rank
        out, i = [], 0
        while i < len(order):
            S = int(g.integers(self.views[0], self.views[1] + 1))
            bs = max(1, self.max_images // S)
            out.append([(j, S) for j in order[i:i + bs]])
            i += bs
        return out

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def advance(self, n: int = 1) -> None:
        self.position += int(n)

    def __iter__(self):
        return iter(self.batches(self.epoch)[self.position:])

    def __len__(self) -> int:
        return max(0, len(self.batches(self.epoch)) - self.position)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_items": self.items.num_items, "seed": self.seed,
                "views": list(self.views), "max_images": self.max_images, "num_replicas": self.items.num_replicas}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("num_items", self.items.num_items), ("seed", self.seed), ("views", list(self.views)),
                          ("max_images", self.max_images), ("num_replicas", self.items.num_replicas)):
            saved = list(state[key]) if key == "views" else state[key]
            if saved != mine:
                raise ValueError(f"sampler state: {key} is {saved!r} in the saved state but {mine!r} here")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def collate_list(items):
    """DataLoader ``collate_fn`` that keeps a batch as the list of its items (the training loop assembles it)."""
    return items


class Stream:
    """Batches of ``dataset`` forever, epoch after epoch, in ``sampler``'s order, read by a ``DataLoader``
    (``num_workers`` processes, ``pin_memory``, ``collate_fn``; a ``batch_size`` of items per batch, or the
    batches of a batch sampler such as ``DynamicBatchSampler``). The loader draws its base seed from a dedicated
    generator, so iterating never touches the global torch RNG (a resumed run keeps its random streams).
    The sampler's position advances when a batch reaches the caller, so ``state_dict()`` taken between two
    batches resumes exactly after the last one (``load_state_dict`` before iterating). ``wait_s``: total
    seconds spent waiting for batches; ``take_wait()`` returns and resets it (for the progress line)."""

    def __init__(self, dataset, sampler, batch_size: int = 1, num_workers: int = 0, pin_memory: bool = False,
                 collate_fn=None, seed: int = 0):
        batched = isinstance(sampler, DynamicBatchSampler)
        kw = dict(batch_sampler=sampler) if batched else dict(batch_size=batch_size, sampler=sampler)
        self.loader = DataLoader(dataset, num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate_fn,
                                 generator=torch.Generator().manual_seed(int(seed)), **kw)
        self.sampler, self.step, self.wait_s, self._it = sampler, 1 if batched else batch_size, 0.0, None

    def __next__(self):
        """The next batch (``next(stream)``; one iterator kept across calls)."""
        if self._it is None:
            self._it = iter(self)
        return next(self._it)

    def __iter__(self):
        while True:
            dataset = self.loader.dataset
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(self.sampler.epoch)
            it = iter(self.loader)
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    break
                self.wait_s += time.perf_counter() - t0
                self.sampler.advance(self.step)
                yield batch
            self.sampler.set_epoch(self.sampler.epoch + 1)

    def take_wait(self) -> float:
        w, self.wait_s = self.wait_s, 0.0
        return w

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._it = None                                  # the next batch is read from the loaded position
