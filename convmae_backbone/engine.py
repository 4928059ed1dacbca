"""Training-reliability hooks for mmengine runs.

* :class:`NonFiniteLossHook` stops a run at the first NaN/Inf loss, before any checkpoint of that iteration
  is written, naming the iteration and the last good checkpoint.
* :class:`AtomicCheckpointHook` (with the ``atomic_local`` file backend) writes every checkpoint and the
  ``last_checkpoint`` pointer to a temporary file in the same folder and renames it into place, and deletes
  outdated checkpoints only after the new one is complete: a crash while saving never leaves a truncated
  checkpoint behind, nor a run without any checkpoint.
* :class:`ReseedHook` re-seeds Python, numpy and torch at the start of every epoch from (seed, epoch, rank)
  and before every iteration from (seed, iteration, rank), so a run resumed from an epoch checkpoint draws
  the same masks (and, with ``num_workers=0`` and mmengine's own samplers, the same crops) as an uninterrupted
  one: mmengine restores weights, optimizer and schedulers but not the RNG state. With the ``SeededSampler``
  of ``convmae_backbone.data`` the crops are reproducible for any ``num_workers``.
"""
import logging
import math
import os
import os.path as osp
import random
import tempfile
from typing import Callable, Optional, Union

import numpy as np
import torch
from mmengine.dist import get_rank, is_main_process
from mmengine.fileio import LocalBackend, register_backend
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log


def atomic_write(path: Union[str, os.PathLike], write: Callable, mode: str = 'wb') -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it, then ``os.replace`` it onto ``path``.

    If anything fails (or the process dies) before the rename, ``path`` keeps its previous content.
    """
    path = os.fspath(path)
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(path)}.', suffix='.tmp', dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@register_backend('atomic_local', force=True)
class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend with atomic ``put`` / ``put_text`` (temporary file + rename)."""

    def put(self, obj: bytes, filepath) -> None:
        atomic_write(filepath, lambda f: f.write(obj))

    def put_text(self, obj: str, filepath, encoding: str = 'utf-8') -> None:
        atomic_write(filepath, lambda f: f.write(obj.encode(encoding)))


class AtomicCheckpointHook(CheckpointHook):
    """``CheckpointHook`` whose checkpoints and ``last_checkpoint`` pointer are written atomically.

    Takes the same arguments as ``CheckpointHook``; local paths use the ``atomic_local`` backend. Unlike the
    parent, outdated checkpoints (``max_keep_ckpts``) are removed after the new one has been written.
    """

    def __init__(self, *args, backend_args: Optional[dict] = None, **kwargs):
        super().__init__(*args, backend_args=backend_args or dict(backend='atomic_local'), **kwargs)

    def before_train(self, runner) -> None:
        super().before_train(runner)
        if is_main_process() and osp.isdir(self.out_dir):  # left over by a run killed while saving
            for name in os.listdir(self.out_dir):
                if name.endswith('.tmp') and (name.startswith('.last_checkpoint.') or
                                              (name.startswith('.') and '.pth.' in name)):
                    os.remove(osp.join(self.out_dir, name))
                    print_log(f'removed incomplete checkpoint file {name} of an interrupted save',
                              logger='current', level=logging.WARNING)

    def _save_checkpoint_with_step(self, runner, step, meta):
        outdated = []
        if self.max_keep_ckpts > 0 and (not self.keep_ckpt_ids or self.keep_ckpt_ids[-1] != step):
            while len(self.keep_ckpt_ids) >= self.max_keep_ckpts:  # the deque may have a maxlen
                outdated.append(self.keep_ckpt_ids.popleft())
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))
        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, ckpt_filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        runner.save_checkpoint(self.out_dir, ckpt_filename, self.file_client_args,
                               save_optimizer=self.save_optimizer,
                               save_param_scheduler=self.save_param_scheduler, meta=meta,
                               by_epoch=self.by_epoch, backend_args=self.backend_args, **self.args)
        if not is_main_process():
            return
        AtomicLocalBackend().put_text(self.last_ckpt, osp.join(runner.work_dir, 'last_checkpoint'))
        for old_step in outdated:  # only now that the new checkpoint is complete
            old = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(old_step))
            if self.file_backend.isfile(old):
                self.file_backend.remove(old)


def last_checkpoint(work_dir: str) -> Optional[str]:
    """The checkpoint named by ``work_dir/last_checkpoint``, or None."""
    pointer = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(pointer):
        return None
    with open(pointer) as f:
        return f.read().strip() or None


class NonFiniteLossHook(Hook):
    """Raise ``FloatingPointError`` at the first iteration whose loss is NaN or infinite.

    Runs before the checkpoint and logger hooks of the same iteration, so no checkpoint with corrupted weights
    is written; the message names the iteration and the last good checkpoint to resume from.
    """

    priority = 'VERY_HIGH'

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        for name, value in (outputs or {}).items():
            if 'loss' not in name:
                continue
            value = float(torch.as_tensor(value).detach().float().sum())
            if not math.isfinite(value):
                last = last_checkpoint(runner.work_dir) or 'none saved yet'
                msg = (f'non-finite {name} ({value}) at iteration {runner.iter + 1} (epoch {runner.epoch + 1}); '
                       f'training stopped. Last good checkpoint: {last}')
                print_log(msg, logger='current', level=logging.ERROR)
                raise FloatingPointError(msg)


class ReseedHook(Hook):
    """Seed ``random``, numpy and torch from (run seed, epoch, rank) before every training epoch and from
    (run seed, iteration, rank) before every training iteration.

    The model's masks (and drop-path) then depend only on the seed, the iteration and the rank, whatever
    data loading consumed from the RNGs; the per-epoch seed covers augmentations done in the main process
    (``num_workers=0``) with mmengine's samplers.
    """

    priority = 'VERY_HIGH'

    @staticmethod
    def _seed(runner, *keys: int) -> None:
        seed = runner.seed if runner.seed is not None else 0
        state = int(np.random.SeedSequence([seed, *keys, get_rank()]).generate_state(1)[0])
        random.seed(state)
        np.random.seed(state)
        torch.manual_seed(state)

    def before_train_epoch(self, runner) -> None:
        self._seed(runner, 0, runner.epoch)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self._seed(runner, 1, runner.iter)
