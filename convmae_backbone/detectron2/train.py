"""``tools/d2_train.py``: train, resume and evaluate a detectron2 LazyConfig (``configs/detectron2``) with
detectron2's own machinery, the command line of detectron2's ``tools/lazyconfig_train_net.py``::

    python tools/d2_train.py --config-file CONFIG [--num-gpus N] [--resume] [--eval-only] [KEY=VALUE ...]
        [--register-coco NAME JSON IMAGE_ROOT ...]

``LazyConfig`` + overrides, ``instantiate``, ``AMPTrainer`` / ``SimpleTrainer`` with detectron2's hooks
(iteration timer, LR scheduler, periodic checkpointer, evaluation, writers), ``DetectionCheckpointer`` (reading
through the safe loader and writing atomically: :mod:`.checkpoint`), ``COCOEvaluator`` via
``inference_on_dataset``, and ``launch`` (one process per GPU; on CPU, ``--num-gpus N`` runs N gloo processes).
``--register-coco`` registers a COCO-format dataset (``register_coco_instances``) in every process, for
datasets outside detectron2's builtin paths. ``train.device=cpu`` trains on CPU (DDP then has no device ids).
"""
import argparse
import logging
from typing import Any, Dict, List, Optional, Sequence

import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import (AMPTrainer, SimpleTrainer, create_ddp_model, default_argument_parser,
                               default_setup, default_writers, hooks, launch)
from detectron2.evaluation import inference_on_dataset, print_csv_format
from omegaconf import DictConfig
from torch import nn

from . import register_safe_detectron2_checkpointer

logger = logging.getLogger('detectron2')


def parser() -> argparse.ArgumentParser:
    """detectron2's ``default_argument_parser`` plus ``--register-coco NAME JSON IMAGE_ROOT`` (repeatable)."""
    p = default_argument_parser()
    p.add_argument('--register-coco', nargs=3, action='append', default=[], metavar=('NAME', 'JSON', 'IMAGE_ROOT'),
                   help='register a COCO-format instance dataset under NAME (in every process)')
    return p


def register_datasets(specs: Sequence[Sequence[str]]) -> None:
    for name, json_file, image_root in specs:
        if name not in DatasetCatalog.list():
            register_coco_instances(name, {}, json_file, image_root)


def evaluate(cfg: DictConfig, model: nn.Module) -> Optional[Dict[str, Any]]:
    """``inference_on_dataset`` over ``dataloader.test`` with ``dataloader.evaluator``; the metrics."""
    if 'evaluator' not in cfg.dataloader:
        return None
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(results)
    return results


def _ddp(model: nn.Module, cfg: DictConfig) -> nn.Module:
    kwargs = dict(cfg.train.ddp)
    if cfg.train.device == 'cpu':
        kwargs['device_ids'] = None  # CPU modules take no device ids
    return create_ddp_model(model, **kwargs)


def train(args: argparse.Namespace, cfg: DictConfig) -> None:
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    loader = instantiate(cfg.dataloader.train)
    model = _ddp(model, cfg)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, loader, optimizer)
    checkpointer = DetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
        hooks.EvalHook(cfg.train.eval_period, lambda: evaluate(cfg, model)),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
        if comm.is_main_process() else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # a checkpoint holds the iteration that had just finished
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """One process: the config with its overrides, then training or (``--eval-only``) evaluation of
    ``train.init_checkpoint``."""
    register_safe_detectron2_checkpointer()  # in spawned workers too
    register_datasets(args.register_coco)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    default_setup(cfg, args)
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = _ddp(model, cfg)
        DetectionCheckpointer(model).load(cfg.train.init_checkpoint)
        return evaluate(cfg, model)
    train(args, cfg)
    return None


def run(argv: Optional[List[str]] = None) -> None:
    """Parse ``argv`` and ``launch`` :func:`main` in ``--num-gpus`` processes."""
    args = parser().parse_args(argv)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
