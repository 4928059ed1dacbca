"""Helpers shared by several test modules: tiny pretraining configs, images to train them on, the applications."""
import contextlib
import functools
import http.server
import importlib
import sys
import threading
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from mmengine.optim.scheduler import CosineAnnealingLR, LinearLR, MultiStepLR, PolyLR
from PIL import Image

from convmae_backbone.models import ConvMAEPretrainer
from convmae_backbone.resources import config_path
from convmae_backbone.testing import TINY_DECODER, TINY_ENCODER

ROOT = Path(__file__).resolve().parents[1]
BASE_CFG = Path(config_path('pretrain/convmae-b_8xb128-1600e_in1k.py'))
DEMO_CFG = Path(config_path('pretrain/convmae-tiny_demo.py'))
TOOLS = ROOT / 'tools'
#: The tiny pretrainer: :data:`convmae_backbone.testing.TINY_ENCODER` with its decoder.
TINY_ARCH = {**TINY_ENCODER, **TINY_DECODER}


def load_tool(name: str):
    """The application ``tools/<name>.py`` (the demo, the benchmark) as a module named ``name``, as the tools
    import each other (their folder on ``sys.path``)."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    return importlib.import_module(name)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max()).item()


def random_pretrainer(sparse: bool, seed: int = 0, **kwargs) -> ConvMAEPretrainer:
    """:data:`TINY_ARCH` float64 pretrainer at 64x64 whose every parameter (LayerNorms and biases included) is random;
    ``kwargs``: further constructor arguments (masking, ablation switches)."""
    torch.manual_seed(seed)
    model = ConvMAEPretrainer(img_size=64, **TINY_ARCH, sparse=sparse, **kwargs).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if 'norm' in name else 0.1))
    return model


def make_images(root: Path, n: int = 8, size: int = 40, seed: int = 0) -> Path:
    """``n`` smooth random RGB JPEGs in root/train/cls{0,1}/."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        freq = rng.uniform(1, 4, 3)
        img = np.stack([np.sin(freq[c] * (xx + yy * c) * np.pi) for c in range(3)], -1) * 100 + 128
        img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
        folder = root / 'train' / f'cls{i % 2}'
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f'{i}.jpg')
    return root


def write_tiny_config(path: Path, data_root: Path, max_epochs: int = 2, seed: int = 123,
                      extra: Optional[str] = None, base: Path = BASE_CFG) -> Path:
    """A config inheriting the base recipe (``base``) with a tiny model on 32x32 crops, batch 4, a checkpoint per
    epoch."""
    text = f'''
_base_ = [{str(base)!r}]
model = dict(img_size=32, **{TINY_ARCH!r})
train_pipeline = [
    dict(type='DecodeRandomResizedCrop', size=32, scale=(0.2, 1.0)),
    dict(type='MAERandomFlip', prob=0.5),
    dict(type='RandomBlockMask', input_size=32, patch_size=16, mask_ratio=0.75),
    dict(type='PackMAEInputs'),
]
train_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False, pin_memory=False,
                        dataset=dict(data_root={str(data_root)!r}, pipeline=train_pipeline))
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=True, begin=0, end=1, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=1, convert_to_iter_based=True),
]
train_cfg = dict(max_epochs={max_epochs})
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1, max_keep_ckpts=-1))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
log_processor = dict(window_size=1)
randomness = dict(seed={seed}, deterministic=True)
'''
    path.write_text(text + (extra or ''))
    return path


def sync_bn_to_bn(node):
    """Replace SyncBN by BN everywhere in a config (SyncBN needs a process group to be meaningful)."""
    if isinstance(node, dict):
        if node.get('type') == 'SyncBN':
            node['type'] = 'BN'
        for value in node.values():
            sync_bn_to_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            sync_bn_to_bn(value)
    return node


def lr_curve(param_scheduler: list, steps: int, iters_per_epoch: int = 1) -> list:
    """The lr of an optimizer with base lr 1 at steps 0..steps-1 under these scheduler configs."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    types = dict(LinearLR=LinearLR, CosineAnnealingLR=CosineAnnealingLR, PolyLR=PolyLR, MultiStepLR=MultiStepLR)
    schedulers = []
    for cfg in param_scheduler:
        cfg = dict(cfg)
        cls = types[cfg.pop('type')]
        if cfg.pop('convert_to_iter_based', False):
            schedulers.append(cls.build_iter_from_epoch(optimizer, epoch_length=iters_per_epoch, **cfg))
        else:
            schedulers.append(cls(optimizer, **cfg))
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]['lr'])
        for s in schedulers:
            s.step()
    return lrs


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve the files of ``folder`` over http on 127.0.0.1 (a free port) while in the context; yields the base
    URL (``http://127.0.0.1:PORT``)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f'http://127.0.0.1:{server.server_address[1]}'
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
