"""Per-sample seeding: with :class:`SeededSampler` every sample's augmentation (crop, flip, mask) is a pure
function of (run seed, epoch, index): the same whatever ``num_workers`` or the world size is, and again after
``--resume``.
"""
import random
from contextlib import contextmanager
from typing import Iterator, Tuple, Union

import numpy as np
import torch
from mmengine.dataset import BaseDataset, DefaultSampler

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
    with ``sample_seed`` derived from (seed, epoch, index), for a :class:`SeededDataset` (the image folder,
    the tar shards)."""

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for idx in super().__iter__():
            yield idx, int(np.random.SeedSequence([self.seed, self.epoch, idx]).generate_state(1)[0])


class SeededDataset(BaseDataset):
    """A ``BaseDataset`` whose items can be asked for as ``(index, sample_seed)`` (:class:`SeededSampler`).

    With a seed, the pipeline runs under Python, numpy and torch RNGs seeded with it (the caller's RNG state is
    left untouched) and an unreadable image is replaced by an index drawn from the same seed. Subclasses name
    where their samples come from in :attr:`source`.
    """

    @property
    def source(self) -> str:
        return type(self).__name__

    def __getitem__(self, index: Union[int, Tuple[int, int]]) -> dict:
        """``index`` is an int (mmengine's samplers) or ``(index, sample_seed)`` (:class:`SeededSampler`)."""
        if not isinstance(index, (tuple, list)):
            return super().__getitem__(index)
        idx, seed = int(index[0]), int(index[1])
        if not self._fully_initialized:
            self.full_init()
        replacement = np.random.default_rng(seed)
        for _ in range(self.max_refetch + 1):
            with seeded_rngs(seed):
                data = self.prepare_data(idx)
            if data is not None:
                return data
            idx = int(replacement.integers(len(self)))
        raise RuntimeError(f'no readable image found after {self.max_refetch} attempts in {self.source}')
