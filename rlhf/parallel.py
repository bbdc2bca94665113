"""Data parallelism under `accelerate launch`: each process's share of a micro-batch."""
from __future__ import annotations


def process_share(items: list, rank: int, world: int) -> tuple[list, float]:
    """This process's part of a micro-batch under data parallelism (every `world`-th item from `rank`), and its weight.

    Every process builds the same micro-batches (same seed), so each knows the step's global counts. A process
    whose part is empty runs the first item with weight 0: DDP needs every process in the gradient all-reduce.
    """
    mine = items[rank::world]
    return (mine, 1.0) if mine else (items[:1], 0.0)
