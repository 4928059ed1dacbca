"""ConvMAE masked-autoencoder pretraining on mmengine's Runner.

    python tools/pretrain.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--auto-scale-lr]
                             [--cfg-options k=v ...] [--launcher none|pytorch|slurm]

``--resume`` without a value resumes from the latest checkpoint of the work dir (its ``last_checkpoint``).
"""
import argparse
import os
import os.path as osp
import sys
from typing import List, Optional

from mmengine.config import Config, DictAction
from mmengine.runner import Runner

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout without install
import convmae_backbone  # noqa: E402,F401  (registers the model, dataset, transforms and hooks)
from convmae_backbone.amp import apply_amp  # noqa: E402
from convmae_backbone.cli import load_config  # noqa: E402
from convmae_backbone.distributed import init_distributed  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='ConvMAE pretraining')
    parser.add_argument('config', help='pretraining config file')
    parser.add_argument('--work-dir', help='folder for logs and checkpoints (default: work_dirs/<config name>)')
    parser.add_argument('--resume', nargs='?', const='auto', default=None, metavar='CKPT',
                        help='resume from CKPT, or from the latest checkpoint of the work dir if no CKPT is given')
    parser.add_argument('--amp', action='store_true',
                        help='mixed precision: bf16 autocast where the device has it, else fp16 with dynamic '
                             'loss scaling')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by (total batch) / auto_scale_lr.base_batch_size')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config keys, key=value')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def build_config(args: argparse.Namespace) -> Config:
    """The config file with the command-line options applied."""
    cfg = load_config(args.config, args.cfg_options, args.launcher, args.work_dir)
    if args.amp:
        apply_amp(cfg)
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise ValueError(f'{args.config} has no auto_scale_lr.base_batch_size; --auto-scale-lr needs it')
        cfg.auto_scale_lr.enable = True
    check_schedule(cfg)
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    return cfg


def check_schedule(cfg: Config) -> None:
    """Fail early, with the numbers, if an epoch-based scheduler starts at or after the last epoch."""
    max_epochs = cfg.get('train_cfg', {}).get('max_epochs')
    schedulers = cfg.get('param_scheduler') or []
    for i, sched in enumerate([schedulers] if isinstance(schedulers, dict) else schedulers):
        if max_epochs is not None and sched.get('by_epoch', True) and sched.get('begin', 0) >= max_epochs:
            raise ValueError(f'param_scheduler[{i}] ({sched.get("type")}) begins at epoch {sched["begin"]} but '
                             f'train_cfg.max_epochs is {max_epochs}; train longer than the warm-up or change '
                             f'param_scheduler')


def main(argv: Optional[List[str]] = None) -> Runner:
    cfg = build_config(parse_args(argv))
    init_distributed(cfg)
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner


if __name__ == '__main__':
    main()
