"""Held-out reconstruction monitor: what masked-autoencoder pretraining optimises, measured on images it never
trains on.

:class:`ReconstructionMonitorHook` takes a folder of held-out images (``<data_root>/<split>/**``), and every
``interval`` epochs computes the pretraining model's loss on them (the norm-pix MSE over the masked patches for
the paper's settings) with masks drawn from a fixed seed, so that every evaluation, the one before training (the
randomly initialised model) included, sees the same images under the same masks::

    custom_hooks = [dict(type='ReconstructionMonitorHook', data_root='data/held_out', interval=10)]

It logs ``recon/val_error`` to the log and to the visualizer (``vis_data/scalars.json``, ``step`` = finished
epochs, 0 before training); :func:`plot_reconstruction_curve` draws it against the untrained level. Every rank
evaluates every image (meant for a small folder). Like the k-NN monitor it never costs a run: it runs after the
epoch's checkpoint is written, leaves unreadable images out with a warning naming each, and logs any other
failure as an error.
"""
import logging
import os
import os.path as osp
from typing import List, Optional, Tuple

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from torch import Tensor, nn

from ..apis.visualization import reconstruction_error
from ..datasets import list_images
from ..registry import register
from .knn import load_eval_image, read_knn_curve

RECON_KEY = 'recon/val_error'


@register('HOOKS')
class ReconstructionMonitorHook(Hook):
    """The pretraining loss on held-out images under fixed masks, before training and every ``interval`` epochs.

    Args:
        data_root: folder holding ``split``; None: the data root of the runner's ``train_dataloader`` (whose
            ``val`` split pretraining does not read).
        split: sub-folder of the held-out images (searched recursively).
        interval: evaluate after every ``interval``-th training epoch and after the last one.
        seed: seed of the masks (batch ``i`` uses ``seed + i``): the same masks at every evaluation.
        img_size: evaluation size (shorter side resized, centre crop); default: the model's pretraining size.
        batch_size: images per forward pass (also fixes which masks go with which image).
        at_start: also evaluate before the first epoch (step 0: the untrained model).
    """

    priority = 'LOWEST'  # after CheckpointHook ('VERY_LOW'), as the k-NN monitor

    def __init__(self, data_root: Optional[str] = None, split: str = 'val', interval: int = 1, seed: int = 0,
                 img_size: Optional[int] = None, batch_size: int = 64, at_start: bool = True):
        if interval < 1 or batch_size < 1:
            raise ValueError(f'interval and batch_size must be >= 1, got {interval} and {batch_size}')
        self.data_root, self.split, self.interval, self.seed = data_root, split, interval, seed
        self.img_size, self.batch_size, self.at_start = img_size, batch_size, at_start
        self._images: Optional[Tensor] = None  # uint8 (N, 3, S, S), read once

    @staticmethod
    def _model(runner) -> nn.Module:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if not hasattr(model, 'forward_mae'):
            raise TypeError(f'ReconstructionMonitorHook needs a ConvMAE pretraining model, got '
                            f'{type(model).__name__}')
        return model

    def _paths(self, runner) -> List[str]:
        if self.data_root is None:
            self.data_root = runner.cfg.get('train_dataloader', {}).get('dataset', {}).get('data_root')
            if not self.data_root:
                raise ValueError("ReconstructionMonitorHook: set data_root (the runner's train_dataloader has none)")
        folder = osp.join(self.data_root, self.split)
        paths = list_images(folder) if osp.isdir(folder) else []
        if not paths:
            raise FileNotFoundError(f'ReconstructionMonitorHook: no images under {folder!r}')
        return paths

    def _load(self, runner, model: nn.Module) -> Tensor:
        size = self.img_size or int(model.pos_grid[0] * model.patch_size)
        images = []
        for path in self._paths(runner):
            try:
                images.append(load_eval_image(path, size))
            except Exception as exc:  # noqa: BLE001 - any decoding failure means: leave this image out
                print_log(f'reconstruction monitor: skipped unreadable image {path!r} ({type(exc).__name__}: '
                          f'{exc})', logger='current', level=logging.WARNING)
        if not images:
            raise RuntimeError(f'no readable image under {osp.join(self.data_root, self.split)!r}')
        return torch.stack(images)

    @torch.no_grad()
    def evaluate(self, runner, step: int) -> float:
        """Mean loss over the held-out images (weighted by batch size); logged at ``step`` and returned."""
        model = self._model(runner)
        if self._images is None:
            self._images = self._load(runner, model)
        was_training = model.training
        model.eval()
        try:
            total = 0.0
            for i, start in enumerate(range(0, len(self._images), self.batch_size)):
                batch = self._images[start:start + self.batch_size]
                total += reconstruction_error(model, batch, self.seed + i) * len(batch)
        finally:
            model.train(was_training)
        error = total / len(self._images)
        runner.message_hub.update_scalar(RECON_KEY, error)
        runner.visualizer.add_scalars({RECON_KEY: error}, step=step)
        print_log(f'held-out reconstruction error after epoch {step}: {error:.4f} ({len(self._images)} images, '
                  f'fixed masks)', logger='current')
        return error

    def _evaluate_logged(self, runner, step: int) -> Optional[float]:
        """:meth:`evaluate`; a failure is logged (ERROR) and None returned: the monitor never ends a run."""
        try:
            return self.evaluate(runner, step)
        except Exception as exc:  # noqa: BLE001 - the monitor must not cost the run
            print_log(f'reconstruction monitor failed after epoch {step} ({type(exc).__name__}: {exc}); training '
                      f'goes on', logger='current', level=logging.ERROR)
            return None

    def before_train(self, runner) -> None:
        if self.at_start and runner.epoch == 0:
            self._evaluate_logged(runner, step=0)

    def after_train_epoch(self, runner) -> None:
        if self.every_n_epochs(runner, self.interval) or self.is_last_train_epoch(runner):
            self._evaluate_logged(runner, step=runner.epoch + 1)  # runner.epoch counts from 0 until this returns


def read_reconstruction_curve(scalars_json: str) -> Tuple[List[int], List[float]]:
    """(epochs, held-out errors) from an mmengine ``vis_data/scalars.json``."""
    return read_knn_curve(scalars_json, RECON_KEY)


def plot_reconstruction_curve(scalars_json: str, out_png: str, what: str = 'held-out images') -> str:
    """Draw the held-out error against the epoch as a PNG, the epoch-0 value (the untrained model, same images
    and masks) as a dashed reference line; returns ``out_png``. Needs the step-0 evaluation (``at_start``)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    epochs, errors = read_reconstruction_curve(scalars_json)
    if epochs[0] != 0:
        raise ValueError(f'{scalars_json} has no evaluation before training (step 0); set at_start=True')
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.axhline(errors[0], color='grey', linestyle='--', label='untrained (random init), same masks')
    ax.plot(epochs, errors, marker='o', color='tab:blue', label='pretrained model at each epoch')
    ax.annotate(f'{errors[-1]:.3f}', (epochs[-1], errors[-1]), textcoords='offset points', xytext=(0, 8),
                ha='center')
    ax.annotate(f'{errors[0]:.3f}', (epochs[0], errors[0]), textcoords='offset points', xytext=(4, 6))
    ax.set_xlabel('epoch')
    ax.set_ylabel('masked-patch error (lower is better)')
    ax.set_title(f'Reconstruction of masked patches on {what}', fontsize=10)
    ax.set_ylim(0, 1.2 * max(errors))
    ax.grid(alpha=0.3)
    ax.legend(loc='lower left', fontsize=8)
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
