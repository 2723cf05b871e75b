"""Rollout bookkeeping of `FlowRLTrainer`: which prompts a rollout draws (`RepeatSampler`), the key its randomness
depends on (`RolloutCounter`), and how it is cut into micro-batches (`split_rollout`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from ..models import index_conditioning


class RepeatSampler(Sampler[int]):
    """Yield dataset indices so that each prompt's `num_generations` copies stay together, for all processes.

    Unique prompts are drawn ``prompts_per_generation`` at a time from a permutation seeded by ``seed + epoch``;
    each chunk is emitted ``repeat_count`` times (once per micro-batch served from the rollout), each index
    ``num_generations`` times in a row::

        chunk [a, b], G = 2, repeat 2  ->  a a b b | a a b b      (one rollout of 4 images, served twice)

    The process-split dataloader gives each process a contiguous slice, so a gather restores whole groups.
    """

    def __init__(self, num_rows: int, num_generations: int, prompts_per_generation: int, repeat_count: int,
                 seed: int = 0):
        if num_rows < prompts_per_generation:
            raise ValueError(
                f"The training dataset has {num_rows} prompts but one rollout needs {prompts_per_generation} distinct "
                "prompts (generation_batch_size / num_generations). Add prompts or lower generation_batch_size."
            )
        self.num_rows, self.num_generations = num_rows, num_generations
        self.prompts_per_generation, self.repeat_count = prompts_per_generation, repeat_count
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        n = self.prompts_per_generation
        for start in range(0, self.num_rows - n + 1, n):
            chunk = order[start : start + n].tolist()
            for _ in range(self.repeat_count):
                for index in chunk:
                    yield from [index] * self.num_generations

    def __len__(self) -> int:
        return (self.num_rows // self.prompts_per_generation) * self.prompts_per_generation * (
            self.num_generations * self.repeat_count
        )


class RolloutCounter:
    """Counts rollouts and keys each one's randomness on (seed, optimizer step, index among that step's rollouts).

    Args:
        seed: the run's seed.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.count = 0  # rollouts generated so far (saved with checkpoints)
        self.key: tuple[int, int] | None = None  # (optimizer step, index among that step's rollouts) of the latest

    def start(self, global_step: int) -> None:
        """Record a new rollout at optimizer step `global_step`."""
        same_step = self.key is not None and self.key[0] == global_step
        self.key = (global_step, self.key[1] + 1 if same_step else 0)
        self.count += 1

    @property
    def is_first_of_step(self) -> bool:
        """Whether the latest rollout is the first of its optimizer step (True before any)."""
        return self.key is None or self.key[1] == 0

    def generator(self, global_step: int, process_index: int, salt: int = 0) -> torch.Generator:
        """A CPU generator that depends only on (seed, optimizer step, rollout index within that step, process,
        salt), so rollouts are resumable and the rollouts of one optimizer step draw different noise. The first
        rollout of a step is keyed on (seed, step, process, salt) alone: runs with at most one rollout per optimizer
        step draw what they always drew. Before any rollout, the key is `global_step`'s first."""
        step, index = self.key or (global_step, 0)
        key = (self.seed, step, process_index, salt) + ((index,) if index else ())
        return torch.Generator().manual_seed(hash(key) % (2**63))


def split_rollout(inputs: dict[str, Any], order: torch.Tensor, num_slices: int) -> list[dict[str, Any]]:
    """Shuffle the batch dimension of every tensor (and conditioning) by `order`, then cut into `num_slices`."""
    n = len(order)
    size = n // num_slices
    slices = []
    for s in range(num_slices):
        idx = order[s * size : (s + 1) * size]
        piece = {}
        for key, value in inputs.items():
            if isinstance(value, dict):
                piece[key] = index_conditioning(value, idx.to(next(iter(value.values())).device))
            elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
                piece[key] = value[idx.to(value.device)]
            else:
                piece[key] = value
        slices.append(piece)
    return slices


__all__ = ["RepeatSampler", "RolloutCounter", "split_rollout"]
