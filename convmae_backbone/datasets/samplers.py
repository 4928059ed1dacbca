"""Per-sample seeding: with :class:`SeededSampler` every sample's augmentation (crop, flip, mask) is a pure
function of (run seed, epoch, index): the same whatever ``num_workers`` or the world size is, and again after
``--resume``.
"""
import random
from contextlib import contextmanager
from typing import Iterator, Tuple

import numpy as np
import torch
from mmengine.dataset import DefaultSampler

from ..registry import register


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed ``random``, numpy's global RNG and torch's CPU RNG with ``seed``; restore their states on exit.

    Only the CPU generator is seeded (``torch.manual_seed`` would also queue a lazy seeding of every accelerator
    backend, recording a stack trace each time: milliseconds per sample, more than decoding the image)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@register('DATA_SAMPLERS')
class SeededSampler(DefaultSampler):
    """mmengine's ``DefaultSampler`` (same order, shuffling and DDP split) yielding ``(index, sample_seed)``
    with ``sample_seed`` derived from (seed, epoch, index), for :class:`ImageFolderDataset`."""

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for idx in super().__iter__():
            yield idx, int(np.random.SeedSequence([self.seed, self.epoch, idx]).generate_state(1)[0])
