"""Count device->host syncs without a GPU: every Python-level read of a tensor's value on the host.

    with count_host_syncs() as syncs:
        out = op(...); out.sum().backward()
    assert syncs.count == 0, syncs.calls

Inside the block ``Tensor.item / tolist / numpy / __bool__ / __int__ / __float__ / __index__`` are
wrapped (class attributes, restored on exit) and each call is recorded with its caller (file:line). On a
CUDA tensor each of these is a blocking device->host copy; counted on CPU tensors they show the same
code path (a count of 0 means the op never reads a value on the host, so it is CUDA-graph capturable as
far as host reads go). Reads made by torch itself in C++ are not seen (none of our ops rely on those).
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch

METHODS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


class SyncLog:
    def __init__(self):
        self.calls: list[str] = []

    @property
    def count(self) -> int:
        return len(self.calls)


def _caller() -> str:
    f = sys._getframe(2)
    torch_dir = os.path.dirname(torch.__file__)
    while f is not None and f.f_code.co_filename.startswith(torch_dir):
        f = f.f_back
    return f"{f.f_code.co_filename}:{f.f_lineno}" if f is not None else "?"


@contextlib.contextmanager
def count_host_syncs():
    log = SyncLog()
    saved = {}
    depth = [0]

    def wrap(name, orig):
        def wrapper(self, *args, **kwargs):
            if depth[0] == 0:                  # a read inside another counted read is the same sync
                log.calls.append(f"Tensor.{name} at {_caller()}")
            depth[0] += 1
            try:
                return orig(self, *args, **kwargs)
            finally:
                depth[0] -= 1
        return wrapper

    for name in METHODS:
        saved[name] = torch.Tensor.__dict__.get(name)
        setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    try:
        yield log
    finally:
        for name, orig in saved.items():
            if orig is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, orig)
