"""ReconstructionMonitorHook: the pretraining loss on held-out images under the same masks at every evaluation,
unreadable images left out, failures logged without ending the run, and the curve it draws."""
import json
import logging
import os
from types import SimpleNamespace

import pytest
import torch
from mmengine.logging import MessageHub
from PIL import Image

from convmae_backbone import ConvMAEPretrainer
from convmae_backbone.apis.visualization import reconstruction_error
from convmae_backbone.datasets import list_images
from convmae_backbone.engine import ReconstructionMonitorHook, reconstruction
from convmae_backbone.engine.knn import load_eval_image
from helpers import TINY_ARCH, make_images


class _Visualizer:
    def __init__(self):
        self.logged = []

    def add_scalars(self, scalars, step):
        self.logged.append((dict(scalars), step))


def _runner(model, data_root=None):
    cfg = {'train_dataloader': {'dataset': {'data_root': data_root}}} if data_root else {}
    return SimpleNamespace(model=model, epoch=0, cfg=cfg, visualizer=_Visualizer(),
                           message_hub=MessageHub.get_instance('recon_monitor_test'))


def _model(seed=0):
    torch.manual_seed(seed)
    return ConvMAEPretrainer(img_size=32, **TINY_ARCH, data_preprocessor=dict(
        type='ImgDataPreprocessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375]))


@pytest.fixture
def held_out(tmp_path):
    """A data root whose ``val`` split holds 5 images (in two class folders)."""
    make_images(tmp_path / 'data' / 'val', n=5, size=40, seed=1)  # data/val/train/cls{0,1}/*.jpg
    return tmp_path / 'data'


def test_same_masks_every_evaluation_and_the_mean_over_batches(held_out):
    model = _model().train()
    runner = _runner(model, str(held_out))  # data_root: the training data root's
    hook = ReconstructionMonitorHook(batch_size=2, seed=5)
    first, again = hook.evaluate(runner, step=0), hook.evaluate(runner, step=1)
    assert first == again and model.training  # same images, same masks; train mode restored
    paths = list_images(str(held_out / 'val'))
    assert len(paths) == 5
    images = torch.stack([load_eval_image(p, 32) for p in paths])
    expected = sum(reconstruction_error(model.eval(), images[i:i + 2], 5 + i // 2) * len(images[i:i + 2])
                   for i in range(0, 5, 2)) / 5
    assert first == pytest.approx(expected, rel=1e-6)
    assert runner.visualizer.logged == [({'recon/val_error': first}, 0), ({'recon/val_error': first}, 1)]
    other = ReconstructionMonitorHook(data_root=str(held_out), batch_size=2, seed=6).evaluate(runner, 0)
    assert other != first  # other masks


def test_training_lowers_the_held_out_error(held_out):
    """A few steps on the held-out images themselves must lower the error under the fixed masks."""
    model = _model()
    runner = _runner(model, str(held_out))
    hook = ReconstructionMonitorHook(batch_size=8)
    before = hook.evaluate(runner, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    x = model.data_preprocessor(dict(inputs=list(hook._images)), False)['inputs']
    for step in range(12):
        loss = model.forward_mae(x, generator=torch.Generator().manual_seed(step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = hook.evaluate(runner, 1)
    assert after < 0.95 * before, (before, after)


def test_unreadable_images_left_out_and_failures_logged(held_out, monkeypatch):
    clean = ReconstructionMonitorHook(batch_size=8).evaluate(_runner(_model(), str(held_out)), 0)
    bad = held_out / 'val' / 'train' / 'cls1' / 'zz_bad.png'  # sorts last: the same batches as before
    bad.write_bytes(b'\x89PNG\r\n\x1a\n' + b'not a png' * 8)
    logged = []
    monkeypatch.setattr(reconstruction, 'print_log', lambda msg, **kw: logged.append((kw.get('level'), msg)))
    assert ReconstructionMonitorHook(batch_size=8).evaluate(_runner(_model(), str(held_out)), 0) == clean
    warnings = [m for level, m in logged if level == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(
        f'reconstruction monitor: skipped unreadable image {str(bad)!r} (UnidentifiedImageError')
    logged.clear()
    empty = _runner(_model(), str(held_out / 'nothing'))
    assert ReconstructionMonitorHook()._evaluate_logged(empty, 0) is None
    assert logged[-1][0] == logging.ERROR and 'no images under' in logged[-1][1] and 'training goes on' in logged[-1][1]
    with pytest.raises(TypeError, match='needs a ConvMAE pretraining model'):
        ReconstructionMonitorHook().evaluate(_runner(torch.nn.Linear(2, 2), str(held_out)), 0)


def test_curve_needs_the_untrained_point_and_draws_it(tmp_path):
    scalars = tmp_path / 'scalars.json'
    scalars.write_text('\n'.join(json.dumps(e) for e in (
        {'recon/val_error': 1.02, 'step': 0}, {'loss': 0.9, 'step': 3}, {'recon/val_error': 0.81, 'step': 1},
        {'recon/val_error': 0.7, 'step': 2})) + '\n')
    assert reconstruction.read_reconstruction_curve(str(scalars)) == ([0, 1, 2], [1.02, 0.81, 0.7])
    png = reconstruction.plot_reconstruction_curve(str(scalars), str(tmp_path / 'curve.png'))
    with Image.open(png) as img:
        assert img.format == 'PNG' and img.size[0] > 500
    late = tmp_path / 'late.json'
    late.write_text(json.dumps({'recon/val_error': 0.8, 'step': 1}) + '\n')
    with pytest.raises(ValueError, match='no evaluation before training'):
        reconstruction.plot_reconstruction_curve(str(late), str(tmp_path / 'x.png'))
    os.remove(png)
