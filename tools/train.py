"""Train a detector (mmdet) or a segmentor (mmseg) with a ConvMAE backbone.

The task is taken from the config's ``default_scope`` ('mmdet' or 'mmseg'); the command line is that of
mmdet's and mmseg's ``tools/train.py``::

    python tools/train.py configs/mmseg/upernet_convmae-b_8xb2-160k_ade20k-512x512.py \
        --work-dir work_dirs/upernet --cfg-options model.backbone.init_cfg.checkpoint=backbone.pth
    bash tools/dist_train.sh CONFIG 8 [ARGS]   # distributed (torchrun)
"""
import argparse
import importlib
import os
import os.path as osp
import sys

from mmengine.config import DictAction
from mmengine.runner import Runner

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout without installing
import convmae_backbone  # noqa: F401,E402  registers ConvMAE, its optimizer constructor and the safe loader
from convmae_backbone.amp import apply_amp  # noqa: E402
from convmae_backbone.cli import load_config  # noqa: E402
from convmae_backbone.distributed import init_distributed  # noqa: E402

SCOPES = ('mmdet', 'mmseg')


def parse_args():
    parser = argparse.ArgumentParser(description='Train an mmdet detector or mmseg segmentor with ConvMAE')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument('--amp', action='store_true',
                        help='mixed precision: bf16 autocast where the device has it, else fp16 with dynamic '
                             'loss scaling')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by the actual/base batch size (configs with auto_scale_lr)')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from this checkpoint, or without a path from the latest checkpoint in the '
                             'work dir')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config, key=value pairs (e.g. '
                             'model.backbone.init_cfg.checkpoint=PATH)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def main():
    args = parse_args()
    cfg = load_config(args.config, args.cfg_options, args.launcher, args.work_dir, SCOPES)
    scope = cfg.default_scope
    if scope == 'mmdet':
        from mmdet.utils import setup_cache_size_limit_of_dynamo
        setup_cache_size_limit_of_dynamo()

    if args.amp:
        apply_amp(cfg)

    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise RuntimeError('--auto-scale-lr needs auto_scale_lr.base_batch_size in the config')
        cfg.auto_scale_lr.enable = True

    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume

    init_distributed(cfg)
    if 'runner_type' in cfg:
        runner = importlib.import_module(f'{scope}.registry').RUNNERS.build(cfg)
    else:
        runner = Runner.from_cfg(cfg)
    runner.train()


if __name__ == '__main__':
    main()
