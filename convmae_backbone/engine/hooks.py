"""Training-reliability hooks for mmengine runs.

* :class:`NonFiniteLossHook` rolls a run back to its last good checkpoint at a NaN/Inf loss (at most
  ``max_rollbacks`` times, then stops naming the iteration and the checkpoint); no checkpoint with non-finite
  weights is ever written.
* :class:`AtomicCheckpointHook` (with the ``atomic_local`` file backend) writes every checkpoint and the
  ``last_checkpoint`` pointer to a temporary file in the same folder and renames it into place, and deletes
  outdated checkpoints only after the new one is complete: a crash while saving never leaves a truncated
  checkpoint behind, nor a run without any checkpoint. With mmengine's ``ZeroRedundancyOptimizer`` every
  process takes part in gathering the sharded optimizer state, so the checkpoint holds all of it (mmengine's
  own ``CheckpointHook`` would leave the main process waiting for the others).
* :class:`ResumeCheckHook` refuses to resume from a checkpoint without what mmengine's ``Runner.resume`` reads
  (``--resume`` of the tools adds it), naming the file instead of a traceback.
* :class:`LoadedWeightsCheckHook` refuses a checkpoint that would leave most of the model unloaded (mmengine
  loads ``load_from`` with ``strict=False`` and only warns); ``tools/test.py`` adds it.
* :class:`ReseedHook` re-seeds Python, numpy and torch at the start of every epoch from (seed, epoch, rank)
  and before every iteration from (seed, iteration, rank), so a run resumed from an epoch checkpoint draws
  the same masks (and, with ``num_workers=0`` and mmengine's own samplers, the same crops) as an uninterrupted
  one: mmengine restores weights, optimizer and schedulers but not the RNG state. With the ``SeededSampler``
  of ``convmae_backbone.datasets`` the crops are reproducible for any ``num_workers``.
"""
import logging
import math
import os
import os.path as osp
import random
from typing import Optional

import numpy as np
import torch
from mmengine.dist import all_reduce, get_rank, is_main_process
from mmengine.fileio import LocalBackend, register_backend
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import ZeroRedundancyOptimizer

from ..checkpoint import CheckpointError, atomic_write, checkpoint_weights, safe_torch_load
from ..models.weights import check_filled, resizable
from ..registry import register


@register_backend('atomic_local', force=True)
class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend with atomic ``put`` / ``put_text`` (temporary file + rename)."""

    def put(self, obj: bytes, filepath) -> None:
        atomic_write(filepath, lambda f: f.write(obj))

    def put_text(self, obj: str, filepath, encoding: str = 'utf-8') -> None:
        atomic_write(filepath, lambda f: f.write(obj.encode(encoding)))


@register('HOOKS')
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
            # ZeRO: the main process's save_checkpoint gathered the optimizer state with a collective
            # (ZeroRedundancyOptimizer.state_dict); Runner.save_checkpoint runs on the main process only, so
            # the other processes take their part here
            if self.save_optimizer and isinstance(getattr(runner.optim_wrapper, 'optimizer', None),
                                                  ZeroRedundancyOptimizer):
                runner.optim_wrapper.optimizer.consolidate_state_dict()
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


@register('HOOKS')
class NonFiniteLossHook(Hook):
    """On a NaN/Inf loss (or weights), roll back to the last good checkpoint and continue; stop after
    ``max_rollbacks`` rollbacks.

    Checked after every training iteration, before the checkpoint and logger hooks of that iteration: the loss
    (every output whose name contains ``loss``) and, with ``check_weights``, the model's parameters (a
    non-finite gradient can corrupt them under a finite loss). All processes agree (the flags are all-reduced),
    so they roll back together. A rollback loads the weights and the optimizer state (moments, loss scale) of
    the checkpoint named by ``work_dir/last_checkpoint`` and keeps the iteration counter, the schedule (the
    current learning rate and other hyper-parameters) and the data order: the run continues with the next
    batches, each rollback logged with its count. Without a checkpoint to roll back to, or after
    ``max_rollbacks`` rollbacks (0: stop at the first), it raises ``FloatingPointError`` naming the iteration and
    the last good checkpoint. As a last guard no checkpoint with non-finite weights is ever written.
    """

    priority = 'VERY_HIGH'

    def __init__(self, max_rollbacks: int = 3, check_weights: bool = True):
        if max_rollbacks < 0:
            raise ValueError(f'max_rollbacks must be >= 0, got {max_rollbacks}')
        self.max_rollbacks, self.check_weights = max_rollbacks, check_weights
        self.rollbacks = 0

    @staticmethod
    def _model(runner) -> torch.nn.Module:
        return runner.model.module if is_model_wrapper(runner.model) else runner.model

    def _problem(self, runner, outputs) -> Optional[str]:
        """What is non-finite on any process: 'loss (value)', 'weights' or None."""
        value = 0.0
        for name, out in (outputs or {}).items():
            if 'loss' in name:
                value += float(torch.as_tensor(out).detach().float().sum())
        bad_weights = False
        if self.check_weights:
            params = [p.detach() for p in self._model(runner).parameters()]
            bad_weights = bool(params) and not bool(torch.stack([p.float().sum() for p in params]).isfinite().all())
        flags = torch.tensor([float(not math.isfinite(value)), float(bad_weights)])
        all_reduce(flags, op='max')
        if flags[0]:
            return f'loss ({value})' if not math.isfinite(value) else 'loss (on another process)'
        return 'weights' if flags[1] else None

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        problem = self._problem(runner, outputs)
        if problem is None:
            return
        last = last_checkpoint(runner.work_dir)
        where = f'at iteration {runner.iter + 1} (epoch {runner.epoch + 1})'
        if last is None or self.rollbacks >= self.max_rollbacks:
            why = ('no checkpoint to roll back to' if last is None else
                   f'{self.rollbacks} rollback(s) done, max_rollbacks={self.max_rollbacks}')
            msg = (f'non-finite {problem} {where}; training stopped ({why}). Last good checkpoint: '
                   f'{last or "none saved yet"}')
            print_log(msg, logger='current', level=logging.ERROR)
            raise FloatingPointError(msg)
        self.rollback(runner, last)
        self.rollbacks += 1
        print_log(f'non-finite {problem} {where}: rolled back to {last} (rollback {self.rollbacks} of at most '
                  f'{self.max_rollbacks}); continuing with the next iteration', logger='current',
                  level=logging.WARNING)

    def rollback(self, runner, path: str) -> None:
        """Load the weights and optimizer state of checkpoint ``path``; keep the current hyper-parameters."""
        ckpt = safe_torch_load(path, map_location='cpu')
        state = checkpoint_weights(ckpt, path)
        if not all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point()):
            raise FloatingPointError(f'cannot roll back: checkpoint {path} holds non-finite weights')
        self._model(runner).load_state_dict(state)
        wrapper = runner.optim_wrapper
        if 'optimizer' in ckpt and hasattr(wrapper, 'param_groups'):
            hyper = [{k: v for k, v in g.items() if k != 'params'} for g in wrapper.param_groups]
            wrapper.load_state_dict(ckpt['optimizer'])
            for group, values in zip(wrapper.param_groups, hyper):  # the schedule's values, not the checkpoint's
                group.update(values)
        wrapper.zero_grad()

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        bad = [k for k, v in checkpoint.get('state_dict', {}).items()
               if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise FloatingPointError(f'refusing to write a checkpoint with non-finite weights ({bad[:5]}) at '
                                     f'iteration {runner.iter}')


@register('HOOKS')
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


@register('HOOKS')
class PlainParamGroupsHook(Hook):
    """Before training, turn the optimizer's parameter groups into plain ``dict`` s (same keys and values).

    mmengine's optim-wrapper constructors store them as ``ConfigDict``, which TorchDynamo cannot trace: with
    ``compile=True`` (mmengine compiles ``train_step``, optimizer step included) the run fails at the first
    step. Runs before the optimizer is used and before compilation (which happens at the first call).
    """

    priority = 'VERY_HIGH'

    def before_train(self, runner) -> None:
        from mmengine.optim import OptimWrapperDict
        wrapper = runner.optim_wrapper
        for wrapper in (wrapper.optim_wrappers.values() if isinstance(wrapper, OptimWrapperDict) else [wrapper]):
            groups = wrapper.optimizer.param_groups
            groups[:] = [dict(group) for group in groups]


@register('HOOKS')
class ResumeCheckHook(Hook):
    """When the Runner resumes, raise :class:`~convmae_backbone.checkpoint.CheckpointError` naming the checkpoint
    unless it holds what mmengine's ``Runner.resume`` reads: a dict with ``meta`` (``epoch`` and ``iter``
    integers), ``message_hub`` and ``state_dict`` dicts. Added by the tools with ``--resume``; ``checkpoint``:
    the file, or None for the latest of the work dir."""

    priority = 'VERY_HIGH'

    def __init__(self, checkpoint: Optional[str] = None):
        self.checkpoint = checkpoint

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
        why = (f'holds a {type(checkpoint).__name__}, not a dict' if not isinstance(checkpoint, dict) else
               'has no meta dict' if not isinstance(meta, dict) else
               "has no integer meta['epoch'] and meta['iter']" if not all(
                   type(meta.get(k)) is int for k in ('epoch', 'iter')) else
               next((f'has no {k} dict' for k in ('message_hub', 'state_dict')
                     if not isinstance(checkpoint.get(k), dict)), None))
        if why:
            name = self.checkpoint or last_checkpoint(runner.work_dir)
            raise CheckpointError(f'checkpoint {name!r} {why}: it cannot be resumed (a checkpoint that '
                                  f'tools/pretrain.py or tools/train.py wrote can)')


@register('HOOKS')
class LoadedWeightsCheckHook(Hook):
    """Before the Runner loads ``checkpoint`` (``load_from``) into the model, raise
    :class:`~convmae_backbone.checkpoint.CheckpointError` if it fills fewer than ``min_loaded`` of the model's
    tensors, naming what it fills per top-level module (``backbone 0/312, neck 16/16, ...``).

    A tensor counts as filled when the checkpoint holds its key (as mmengine loads it: ``state_dict`` or the
    checkpoint itself, ``module.`` stripped) with its shape, or one the encoder resizes on loading.
    """

    priority = 'VERY_HIGH'

    def __init__(self, checkpoint: str, min_loaded: float = 0.5):
        self.checkpoint, self.min_loaded = checkpoint, min_loaded

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if not isinstance(checkpoint, dict):
            raise CheckpointError(f'checkpoint {self.checkpoint!r} holds a {type(checkpoint).__name__}, not a dict '
                                  f'of weights')
        state = checkpoint.get('state_dict', checkpoint)
        if not isinstance(state, dict):
            raise CheckpointError(f'checkpoint {self.checkpoint!r}: its state_dict is a {type(state).__name__}, not '
                                  f'a dict of weights')  # what mmengine's _load_checkpoint_to_model loads
        state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
        own = model.state_dict()
        filled = [k for k, v in own.items() if torch.is_tensor(state.get(k)) and (
            state[k].shape == v.shape or resizable(k, state[k], v.shape))]
        hint = ("It holds the official format ({'model': ...}): convert it with tools/convert_official.py."
                if 'state_dict' not in checkpoint and isinstance(checkpoint.get('model'), dict) else
                'Evaluate a checkpoint of this config (e.g. one tools/train.py wrote).')
        check_filled(list(own), filled, self.min_loaded, f'checkpoint {self.checkpoint!r}', 'the model', hint)
