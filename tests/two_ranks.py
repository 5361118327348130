"""Two simulated processes in threads with a summing all-reduce: the check that statistics summed once over processes
give the one-process result (``tests/`` is on ``sys.path`` through ``tests/conftest.py``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from torch import Tensor

Reduce = Callable[[Tensor], Tensor]


class AllReduce:
    """A two-rank all-reduce (sum) between threads: each rank's tensor is added to the other's; ``calls`` counts each
    rank's reductions."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=60)
        self.slots: list = [None, None]
        self.calls = [0, 0]

    def rank(self, r: int) -> Reduce:
        def reduce(t: Tensor) -> Tensor:
            self.calls[r] += 1
            self.slots[r] = t.clone()
            self.barrier.wait()
            total = self.slots[0] + self.slots[1]
            self.barrier.wait()
            return total

        return reduce


def run_two_ranks(fn: Callable[[int, Reduce], Any]) -> tuple[list, AllReduce]:
    """Run ``fn(rank, reduce)`` for ranks 0 and 1 in two threads sharing one :class:`AllReduce`; re-raise the first
    error of either rank (the other is released from its barrier). Returns both results and the all-reduce."""
    comm = AllReduce()
    results: list = [None, None]
    errors: list = []

    def run(r: int) -> None:
        try:
            results[r] = fn(r, comm.rank(r))
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)
            comm.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, comm
