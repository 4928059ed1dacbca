"""Shared fixtures: the official reference outputs and small model configurations."""
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped, with the reason, where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA device (torch sees none); tools/gpu_check.sh runs it on a GPU')
    for item in items:
        if 'cuda' in item.keywords:
            item.add_marker(skip)

FIXTURE = Path(__file__).parent / 'fixtures' / 'official_convmae_small.pt'


@pytest.fixture(scope='session')
def official():
    """Outputs recorded from the official ConvMAE code (see tests/fixtures/README.md)."""
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope='session')
def small_arch(official):
    """Encoder keywords of the fixture's small model."""
    c = official['config']
    return dict(embed_dims=tuple(c['embed_dim']), depths=tuple(c['depth']), num_heads=c['num_heads'],
                mlp_ratios=tuple(c['mlp_ratio']))


@pytest.fixture(scope='session')
def small_decoder(official):
    c = official['config']
    return dict(decoder_embed_dim=c['decoder_embed_dim'], decoder_depth=c['decoder_depth'],
                decoder_num_heads=c['decoder_num_heads'])


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max()).item()
