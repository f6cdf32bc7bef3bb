"""Global batches: how a recipe's batch is split over processes and accumulation steps, and which process reads
which of an epoch's batches. Positions are counted in global micro-batches, so a resume seeks in O(1)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from roformer.errors import ConfigError


def split_global_batch(global_batch: int, num_processes: int, max_per_process: int) -> tuple[int, int]:
    """(micro-batch per process, accumulation steps) with micro x processes x steps == global_batch, taking the
    fewest steps whose micro-batch fits in `max_per_process` (sequences)."""
    first = max(1, math.ceil(global_batch / (num_processes * max_per_process)))
    for steps in range(first, global_batch // num_processes + 1):
        if global_batch % (num_processes * steps) == 0:
            return global_batch // (num_processes * steps), steps
    raise ConfigError(
        f"train.global_batch_size={global_batch} cannot be split evenly over {num_processes} processes with at most "
        f"train.per_device_batch_size={max_per_process} per micro-batch; use a multiple of {num_processes}"
    )


def split_global_tokens(global_tokens: int, num_processes: int, max_tokens: int) -> tuple[int, int]:
    """(token budget per process and micro-batch, accumulation steps) for a global batch counted in tokens, as
    fairseq's --max-tokens x --update-freq x GPUs: batches hold up to the budget, so the total is approximate."""
    steps = max(1, math.ceil(global_tokens / (num_processes * max_tokens)))
    budget = global_tokens // (num_processes * steps)
    if budget < 1:
        raise ConfigError(f"train.global_batch_size={global_tokens} tokens is fewer than one per process")
    return budget, steps


class RankBatches(Sampler):
    """This process's share of an epoch's batches: global micro-batch j is batches[j*N : (j+1)*N], of which
    process r reads batches[j*N + r]. Starts at global micro-batch `start` without touching the ones before it;
    a tail of fewer than N batches is dropped."""

    def __init__(self, batches: Sequence[np.ndarray], rank: int, world: int, start: int = 0):
        self.batches, self.rank, self.world, self.start = batches, rank, world, start

    def global_batches(self) -> int:
        return len(self.batches) // self.world

    def __len__(self) -> int:
        return max(0, self.global_batches() - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for j in range(self.start, self.global_batches()):
            yield np.asarray(self.batches[j * self.world + self.rank]).tolist()
