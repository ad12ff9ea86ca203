"""Training order for a union of datasets: every part drawn equally often (`data.balance_parts`).

A union epoch of a large and a small dataset shows the small one's images a small share of the
steps: on apple_mask (240 fruits photos, 83 mask photos) the mask class sees 26% of them, and a
student distilled on it learns that class last. Dataset-balanced sampling (UniDet, "Simple
multi-dataset detection", samples its datasets uniformly) draws each group of images the same
number of times per epoch. The epoch keeps its length (len(dataset) samples, so the same steps
and the same compute); a small part's images are drawn several times, a large part's not all
of them each epoch.

A part here is a group of images that label (and declare absent) the same classes: that is
what tells a union's datasets apart without knowing how it was built.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class BalancedGroupSampler(Sampler[int]):
    """Indices of one epoch: len(dataset) draws, each group ~equally often, shuffled.

    groups: the dataset's indices, one list per group. Within a group the draws walk through
    random permutations (every image once before any twice). Under DDP (`num_replicas` > 1)
    each rank takes every num_replicas-th draw of the same epoch order, padded to equal length.
    `set_epoch` changes the order, reproducibly from `seed`.
    """

    def __init__(
        self,
        groups: Sequence[Sequence[int]],
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.groups = [list(group) for group in groups if len(group)]
        if not self.groups:
            raise ValueError("BalancedGroupSampler needs at least one non-empty group")
        self.total = sum(len(group) for group in self.groups)
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def draws_per_group(self) -> list[int]:
        """total // groups each, the remainder one more for the first groups."""
        share, extra = divmod(self.total, len(self.groups))
        return [share + (i < extra) for i in range(len(self.groups))]

    def epoch_order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        draws = []
        for group, count in zip(self.groups, self.draws_per_group(), strict=True):
            members = torch.tensor(group)
            cycles = -(-count // len(group))
            order = torch.cat(
                [torch.randperm(len(group), generator=generator) for _ in range(cycles)]
            )
            draws.append(members[order[:count]])
        order = torch.cat(draws)
        return order[torch.randperm(len(order), generator=generator)]

    def __len__(self) -> int:
        return -(-self.total // self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        padded = torch.cat([order, order[: len(self) * self.num_replicas - len(order)]])
        return iter(padded[self.rank :: self.num_replicas].tolist())
