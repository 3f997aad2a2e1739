"""The order in which training images are visited, as a pure function of (seed, epoch).

Its whole state is `(epoch, position)`, which is what a checkpoint stores; the plan of an epoch
is rebuilt from the seed on resume. Batches never mix aspect-ratio buckets: each epoch shuffles
every bucket, cuts it into batches (wrapping around when a bucket has fewer images than a
batch), and shuffles the batches.
"""

from __future__ import annotations

from typing import Any

import torch


class DataOrder:
    def __init__(self, groups: list[list[int]], batch_size: int, seed: int):
        if not groups or not any(groups):
            raise ValueError("DataOrder needs at least one image.")
        self.groups = [list(g) for g in groups if g]
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._plan: list[list[int]] | None = None

    def plan(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        batches: list[list[int]] = []
        for group in self.groups:
            perm = [group[i] for i in torch.randperm(len(group), generator=g).tolist()]
            n = -(-len(perm) // self.batch_size) * self.batch_size
            filled = [perm[i % len(perm)] for i in range(n)]
            batches += [filled[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def next_batch(self) -> list[int]:
        if self._plan is None:
            self._plan = self.plan(self.epoch)
        if self.position >= len(self._plan):
            self.epoch += 1
            self.position = 0
            self._plan = self.plan(self.epoch)
        batch = self._plan[self.position]
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._plan = None
