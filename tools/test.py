"""Evaluate a detector (mmdet) or a segmentor (mmseg) with a ConvMAE backbone.

The task is taken from the config's ``default_scope`` ('mmdet' or 'mmseg'); the command line is that of
mmdet's and mmseg's ``tools/test.py``::

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE_OR_DIR] [--show-dir DIR]
    bash tools/dist_test.sh CONFIG CHECKPOINT 8 [ARGS]   # distributed (torchrun)

``--out``: mmdet dumps the raw predictions to this .pkl file; mmseg writes the predicted masks to this
directory.
"""
import argparse
import importlib
import os
import os.path as osp
import sys

from mmengine.config import Config, DictAction
from mmengine.runner import Runner

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout without installing
import convmae_backbone  # noqa: F401,E402  registers ConvMAE and the safe checkpoint loader
from convmae_backbone.cli import load_config  # noqa: E402
from convmae_backbone.distributed import init_distributed  # noqa: E402

SCOPES = ('mmdet', 'mmseg')


def parse_args():
    parser = argparse.ArgumentParser(description='Test an mmdet detector or mmseg segmentor with ConvMAE')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save the evaluation metrics')
    parser.add_argument('--out', help='mmdet: .pkl file for the raw results; mmseg: dir for predicted masks')
    parser.add_argument('--show', action='store_true', help='show the predictions')
    parser.add_argument('--show-dir', help='dir (inside the work dir) to save the painted predictions')
    parser.add_argument('--wait-time', type=float, default=2, help='seconds per image with --show')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config, key=value pairs')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def enable_visualization(cfg: Config, scope: str, args) -> None:
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        raise RuntimeError('--show/--show-dir need a visualization hook in default_hooks')
    hook['draw'] = True
    if args.show:
        hook['show'] = True
        hook['wait_time'] = args.wait_time
    if args.show_dir:
        if scope == 'mmdet':
            hook['test_out_dir'] = args.show_dir
        else:
            cfg.visualizer['save_dir'] = args.show_dir


def main():
    args = parse_args()
    cfg = load_config(args.config, args.cfg_options, args.launcher, args.work_dir, SCOPES)
    scope = cfg.default_scope
    if scope == 'mmdet':
        from mmdet.utils import setup_cache_size_limit_of_dynamo
        setup_cache_size_limit_of_dynamo()

    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        enable_visualization(cfg, scope, args)
    if args.out is not None and scope == 'mmseg':
        cfg.test_evaluator['output_dir'] = args.out
        cfg.test_evaluator['keep_results'] = True

    init_distributed(cfg)
    if 'runner_type' in cfg:
        runner = importlib.import_module(f'{scope}.registry').RUNNERS.build(cfg)
    else:
        runner = Runner.from_cfg(cfg)

    if args.out is not None and scope == 'mmdet':
        from mmdet.evaluation import DumpDetResults
        if not args.out.endswith(('.pkl', '.pickle')):
            raise ValueError('--out must be a .pkl file for detection')
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    runner.test()


if __name__ == '__main__':
    main()
