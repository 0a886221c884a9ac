"""Per-epoch seeding, so that a resumed run replays the randomness of an uninterrupted one.

``seed_everything(seed)`` at start-up fixes the random streams of a run that is never interrupted,
but Lightning's checkpoints do not hold the RNG states: a run resumed from ``last.ckpt`` would draw
its shuffling, augmentation and dropout from other streams than the same epochs of the uninterrupted
run. So at the start of every training epoch the global RNGs (torch, numpy, ``random``: augmentation,
dropout) are reseeded from (seed, epoch, rank), and the training loaders' shuffling and worker seeds
get generators of their own, seeded the same way: every epoch's randomness is a function of its
number only, which resuming at an epoch boundary preserves.

The loaders need their own generators because Lightning creates the first training iterator of a
``fit`` call early (when the LR schedule asks for the number of steps), before any epoch hook, and
later ones after ``on_train_epoch_start``: an iterator drawing its seed from the global stream would
shift that stream by one draw in one case and not in the other. (The shuffling permutation itself is
drawn lazily, at the first batch, so a generator set in the hook is used in both cases.)

Not covered: a ``DistributedSampler`` keeps its own seed + epoch (deterministic already); with
``num_workers > 0`` and ``persistent_workers`` the workers' augmentation streams run on across epochs,
so a resumed run's augmentations differ from an uninterrupted one's.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, RandomSampler


def epoch_seed(seed: int, epoch: int, rank: int = 0, stream: int = 0) -> int:
    """A 32-bit seed for (seed, epoch, rank, stream); SeedSequence mixing, so nearby values give
    unrelated streams."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank), int(stream)]).generate_state(1)[0])


def reseed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _loaders(obj) -> list:
    if isinstance(obj, DataLoader):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    return [dl for x in obj for dl in _loaders(x)] if isinstance(obj, (list, tuple)) else []


class EpochSeed(Callback):
    """At every training epoch start: reseed the global RNGs and the training loaders' generators
    from (``seed``, epoch, rank)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch, rank = trainer.current_epoch, trainer.global_rank
        reseed(epoch_seed(self.seed, epoch, rank))
        for dl in _loaders(trainer.train_dataloader):
            # worker base seeds (drawn when an iterator is created) and the shuffling permutation
            dl.generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, rank, 1))
            if isinstance(dl.sampler, RandomSampler):
                dl.sampler.generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, rank, 2))
