"""One place for the one-thread rule: small models and many small memory-bound ops run on a single
intra-op thread on the CPU. With several threads every op ends in a barrier, and on a machine shared
with other jobs each barrier can cost a scheduler time slice (measured on 2 loaded cores: 20-45x slower
for chart parsing, small reference models and Hessian-vector products)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread(enabled: bool = True) -> Iterator[None]:
    """Run the block on one intra-op thread (``enabled=False``: leave the setting alone, e.g. on GPU)."""
    previous = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
