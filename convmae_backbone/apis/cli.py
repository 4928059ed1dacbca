"""What the command-line tools share: the options of ``tools/train.py``, ``tools/test.py`` and
``tools/pretrain.py``, one way of applying them to a config, and one way of building the Runner.

    parser = add_common_args(argparse.ArgumentParser())       # + the tool's own options
    cfg = config_from_args(parse_args(parser, argv), scopes)  # config with every option applied
    runner = build_runner(cfg)

:func:`train`, :func:`pretrain` and :func:`evaluate` are the whole of ``tools/train.py``, ``tools/pretrain.py`` and
``tools/test.py``.
"""
import argparse
import difflib
import importlib
import inspect
import os
import os.path as osp
import re
import sys
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

from mmengine.config import Config, DictAction
from mmengine.runner import Runner

from ..checkpoint import CheckpointError
from ..datasets.image_folder import find_images, image_dir
from ..datasets.shards import ShardError
from ..engine.amp import apply_amp
from ..engine.distributed import finish_distributed, init_distributed
from ..engine.optim import check_zero
from ..registry import DOWNSTREAM_SCOPES, PRETRAIN_SCOPES

#: ``default_scope`` of the configs each tool runs.


class ConfigError(ValueError):
    """A config or a ``--cfg-options`` override that cannot work; the message names the key and the cause."""


#: A value mmengine's ``DictAction`` leaves as a string although it is a call (``dict(type='X')``).
_CALL = re.compile(r'^[A-Za-z_][\w.]*\(.*\)$', re.S)


class CfgOptionsAction(DictAction):
    """mmengine's ``DictAction`` that names the offending token when an option is not ``KEY=VALUE``, and raises
    :class:`ConfigError` for a value it cannot parse (Python expressions such as ``dict(...)``, on which mmengine
    recurses without end when they hold a comma)."""

    def __call__(self, parser, namespace, values, option_string=None):
        for kv in values:
            key, _, value = kv.partition('=')
            if '=' not in kv or not key:
                parser.error(f'{option_string}: {kv!r} is not KEY=VALUE (e.g. model.backbone.depths=[1,1,3])')
            try:
                leaves = list(_leaves(self._parse_iterable(value)))
            except (RecursionError, AssertionError):  # a comma inside a call, or unbalanced brackets
                leaves = None
            if leaves is None or any(isinstance(v, str) and _CALL.match(v) for v in leaves):
                raise ConfigError(f'{option_string} {kv}: the value could not be parsed; --cfg-options takes '
                                  f'numbers, strings, True/False/None and [...] or (...) of them, not Python '
                                  f'expressions such as dict(...): set {key} in a config file')
        super().__call__(parser, namespace, values, option_string)


def _leaves(value: Any) -> Iterator[Any]:
    """The non-list, non-tuple elements of a (nested) value."""
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def run_tool(main: Callable[[], Any]) -> Any:
    """Run a tool's ``main``; a :class:`~convmae_backbone.checkpoint.CheckpointError`, :class:`ConfigError` or
    :class:`~convmae_backbone.datasets.shards.ShardError` is printed as ``error: ...`` and exits with status 1
    instead of a traceback."""
    try:
        return main()
    except (CheckpointError, ConfigError, ShardError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        sys.exit(1)


def add_common_args(parser: argparse.ArgumentParser, training: bool = True) -> argparse.ArgumentParser:
    """Add the config file and ``--work-dir``, ``--cfg-options``, ``--launcher``, ``--local-rank`` to ``parser``;
    with ``training`` also ``--amp``, ``--auto-scale-lr`` and ``--resume [CKPT]``. Returns ``parser``."""
    parser.add_argument('config', help='config file')
    parser.add_argument('--work-dir', help='folder for logs, checkpoints and metrics '
                                           '(default: the config\'s work_dir, else work_dirs/<config name>)')
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction,
                        help='override settings of the config, key=value pairs (e.g. '
                             'model.backbone.init_cfg.checkpoint=PATH)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    if training:
        parser.add_argument('--amp', action='store_true',
                            help='mixed precision: bf16 autocast where the device has it (CPU, recent GPUs), '
                                 'else fp16 with dynamic loss scaling')
        parser.add_argument('--auto-scale-lr', action='store_true',
                            help='scale the lr by (total batch) / auto_scale_lr.base_batch_size')
        parser.add_argument('--resume', nargs='?', const='auto', default=None, metavar='CKPT',
                            help='resume from CKPT, or from the latest checkpoint of the work dir if no CKPT is '
                                 'given')
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``; sets ``LOCAL_RANK`` from ``--local-rank`` for launchers that pass it so."""
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def load_config(path: str, cfg_options: Optional[dict] = None, launcher: str = 'none',
                work_dir: Optional[str] = None, scopes: Optional[Sequence[str]] = None) -> Config:
    """Read ``path`` and apply ``--cfg-options``, ``--launcher`` and ``--work-dir`` (default: the config's own
    ``work_dir``, else ``work_dirs/<config name>``). ``scopes``: the ``default_scope`` values the tool accepts."""
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.launcher = launcher
    if scopes is not None and cfg.get('default_scope') not in scopes:
        raise ConfigError(f'{path}: default_scope must be one of {tuple(scopes)}, got {cfg.get("default_scope")!r}')
    check_keywords(cfg, path, cfg_options)
    if work_dir:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('work_dirs', osp.splitext(osp.basename(path))[0])
    return cfg


def _model_class(type_: Any, scope: str) -> Optional[type]:
    """The class a model-component ``type`` names in the MODELS registry of ``scope``, or None."""
    if isinstance(type_, type):
        return type_
    if not isinstance(type_, str):
        return None
    from mmengine.registry import DefaultScope
    try:
        registry = importlib.import_module(f'{scope}.registry').MODELS
        with DefaultScope.overwrite_default_scope(scope):
            return registry.get(type_)
    except Exception:  # noqa: BLE001 - an unknown or unimportable type is reported by the build itself
        return None


def accepted_keywords(cls: type) -> Optional[List[str]]:
    """The keyword arguments ``cls(...)`` accepts, following ``**kwargs`` into the ``__init__`` of its parents;
    None if that chain ends in an open ``**kwargs`` (nothing to check against)."""
    import torch.nn as nn
    names: List[str] = []
    for klass in cls.__mro__:
        if klass in (object, nn.Module) or '__init__' not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names += [p.name for p in params if p.name != 'self' and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return sorted(set(names))
    return None


def _model_components(node: Any, key: str) -> Iterator[Tuple[str, dict]]:
    """(dotted key, dict) of every dict with a ``type`` below ``node`` (at ``key``), list items by index. Dicts under
    a ``*_cfg`` key (norm_cfg, act_cfg, init_cfg, train_cfg ...) are skipped: mmcv's and mmengine's builders
    complete or consume their keys (e.g. ``requires_grad`` of a norm layer)."""
    if isinstance(node, dict):
        if 'type' in node:
            yield key, node
        for name, value in node.items():
            if not str(name).endswith('_cfg'):
                yield from _model_components(value, f'{key}.{name}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _model_components(value, f'{key}.{i}')


def check_keywords(cfg: Config, path: str, cfg_options: Optional[dict] = None) -> None:
    """Raise :class:`ConfigError` for a keyword that a component of ``cfg.model`` does not take (e.g.
    ``model.backbone.depht``), listing the keywords that exist and the closest one; set by ``--cfg-options``
    (named as that option) or in the config file ``path`` (named with the file). Components are the dicts whose
    ``type`` is in the MODELS registry of the config's ``default_scope``."""
    scope = cfg.get('default_scope') or 'mmengine'
    overridden = set(cfg_options or ())
    for key, node in _model_components(cfg.get('model'), 'model'):
        cls = _model_class(node['type'], scope)
        keywords = accepted_keywords(cls) if cls is not None else None
        if keywords is None:
            continue
        for name in node:
            if name in keywords or name in ('type', '_scope_', '_delete_'):
                continue
            close = difflib.get_close_matches(name, keywords, n=1)
            hint = f' (did you mean {close[0]!r}?)' if close else ''
            where = f'--cfg-options {key}.{name}' if f'{key}.{name}' in overridden else f'{path}: {key}.{name}'
            raise ConfigError(f'{where}: {cls.__name__} ({key}) has no keyword {name!r}{hint}; its keywords: '
                              f'{", ".join(keywords)}')


def config_from_args(args: argparse.Namespace, scopes: Optional[Sequence[str]] = None) -> Config:
    """The config file of ``args`` with every option of :func:`add_common_args` applied, checked
    (``default_scope`` in ``scopes``, :func:`check_schedule`)."""
    cfg = load_config(args.config, args.cfg_options, args.launcher, args.work_dir, scopes)
    if getattr(args, 'amp', False):
        try:
            apply_amp(cfg)
        except (RuntimeError, ValueError) as exc:  # no mixed precision for this config on this device
            raise ConfigError(str(exc)) from exc
    if getattr(args, 'auto_scale_lr', False):
        enable_auto_scale_lr(cfg, args.config)
    if getattr(args, 'resume', None) is not None:
        cfg.resume = True
        cfg.load_from = None if args.resume == 'auto' else args.resume
        # mmengine's Runner.resume reads meta, message_hub, ... with a traceback for a file without them
        cfg.custom_hooks = list(cfg.get('custom_hooks') or []) + [
            dict(type='ResumeCheckHook', checkpoint=cfg.load_from)]
    check_schedule(cfg)
    check_zero(cfg)
    return cfg


def enable_auto_scale_lr(cfg: Config, path: str) -> None:
    """Turn on mmengine's lr scaling by (total batch size) / ``auto_scale_lr.base_batch_size``."""
    if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
        raise ConfigError(f'{path} has no auto_scale_lr.base_batch_size; --auto-scale-lr needs it')
    cfg.auto_scale_lr.enable = True


def check_schedule(cfg: Config) -> None:
    """Fail early, with the numbers, if a scheduler ends before it begins, or an epoch-based one starts at or after
    the last epoch."""
    max_epochs = cfg.get('train_cfg', {}).get('max_epochs')
    schedulers = cfg.get('param_scheduler') or []
    for i, sched in enumerate([schedulers] if isinstance(schedulers, dict) else schedulers):
        begin, end = sched.get('begin', 0), sched.get('end')
        if end is not None and begin >= end:
            unit = 'epoch' if sched.get('by_epoch', True) else 'iteration'
            raise ConfigError(f'param_scheduler[{i}] ({sched.get("type")}) begins at {unit} {begin} and ends at '
                              f'{unit} {end}; it must end after it begins')
        if max_epochs is not None and sched.get('by_epoch', True) and begin >= max_epochs:
            raise ConfigError(f'param_scheduler[{i}] ({sched.get("type")}) begins at epoch {begin} but '
                             f'train_cfg.max_epochs is {max_epochs}; train longer than the warm-up or change '
                             f'param_scheduler')


def check_data(cfg: Config, loader: str) -> None:
    """Raise :class:`ConfigError` before anything is built when the dataset of ``cfg[loader]`` (e.g.
    ``'train_dataloader'``; inside dataset wrappers too) reads a local ``data_root`` that does not exist, or is
    an :class:`~convmae_backbone.datasets.ImageFolderDataset` whose folder holds no image."""
    dataset = (cfg.get(loader) or {}).get('dataset')
    key = f'{loader}.dataset'
    while isinstance(dataset, dict):
        root = dataset.get('data_root')
        if dataset.get('type') == 'ImageFolderDataset':
            try:
                find_images(image_dir(root, dataset.get('subdir', 'train')))
            except FileNotFoundError as exc:
                raise ConfigError(f'{key}: {exc}') from None
        elif isinstance(root, str) and root and '://' not in root and not osp.isdir(root):
            raise ConfigError(f'{key}.data_root {root!r} is not a folder')
        dataset, key = dataset.get('dataset'), f'{key}.dataset'


def build_runner(cfg: Config) -> Runner:
    """The Runner of ``cfg``: the config's ``runner_type`` from the registry of its ``default_scope`` (mmdet,
    mmseg or mmengine), else mmengine's ``Runner``."""
    scope = cfg.get('default_scope') or 'mmengine'
    if scope == 'mmdet':
        from mmdet.utils import setup_cache_size_limit_of_dynamo
        setup_cache_size_limit_of_dynamo()
    init_distributed(cfg)  # gloo without CUDA; mmengine's launcher would call torch.cuda.set_device
    if 'runner_type' in cfg:
        return importlib.import_module(f'{scope}.registry').RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


def _train(argv: Optional[Sequence[str]], description: str, scopes: Sequence[str]) -> Runner:
    parser = add_common_args(argparse.ArgumentParser(description=description))
    cfg = config_from_args(parse_args(parser, argv), scopes)
    check_data(cfg, 'train_dataloader')
    runner = build_runner(cfg)
    runner.train()
    finish_distributed()
    return runner


def train(argv: Optional[Sequence[str]] = None) -> Runner:
    """``tools/train.py``: train an mmdet detector, mmseg segmentor or mmpretrain classifier (the config's
    ``default_scope``)."""
    return _train(argv, 'Train an mmdet detector, mmseg segmentor or mmpretrain classifier with a ConvMAE '
                  'backbone', DOWNSTREAM_SCOPES)


def pretrain(argv: Optional[Sequence[str]] = None) -> Runner:
    """``tools/pretrain.py``: ConvMAE masked-autoencoder pretraining."""
    return _train(argv, 'ConvMAE masked-autoencoder pretraining', PRETRAIN_SCOPES)


def add_test_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``tools/test.py`` beyond :func:`add_common_args` (``training=False``)."""
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', help='mmdet: .pkl file for the raw results; mmseg: dir for predicted masks; '
                        'mmpretrain: .pkl file for the predictions')
    parser.add_argument('--show', action='store_true', help='show the predictions')
    parser.add_argument('--show-dir', help='dir (inside the work dir) to save the painted predictions')
    parser.add_argument('--wait-time', type=float, default=2, help='seconds per image with --show')
    return parser


def evaluate(argv: Optional[Sequence[str]] = None) -> Runner:
    """``tools/test.py``: evaluate a checkpoint of an mmdet detector, mmseg segmentor or mmpretrain classifier."""
    parser = add_test_args(add_common_args(argparse.ArgumentParser(
        description='Test an mmdet detector, mmseg segmentor or mmpretrain classifier with a ConvMAE backbone'),
        training=False))
    args = parse_args(parser, argv)
    cfg = config_from_args(args, DOWNSTREAM_SCOPES)
    scope = cfg.default_scope
    cfg.load_from = args.checkpoint
    # mmengine loads it with strict=False and only warns: refuse one that leaves most of the model unloaded
    cfg.custom_hooks = list(cfg.get('custom_hooks') or []) + [
        dict(type='LoadedWeightsCheckHook', checkpoint=args.checkpoint)]
    if args.show or args.show_dir:
        enable_visualization(cfg, args.show, args.show_dir, args.wait_time)
    if args.out is not None and scope in ('mmdet', 'mmpretrain') and not args.out.endswith(('.pkl', '.pickle')):
        raise ConfigError(f'--out must be a .pkl file for {scope}, got {args.out!r}')
    if args.out is not None and scope == 'mmseg':
        cfg.test_evaluator['output_dir'] = args.out
        cfg.test_evaluator['keep_results'] = True
    check_data(cfg, 'test_dataloader')
    runner = build_runner(cfg)
    if args.out is not None and scope == 'mmdet':
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    elif args.out is not None and scope == 'mmpretrain':
        from mmengine.evaluator import DumpResults
        runner.test_evaluator.metrics.append(DumpResults(out_file_path=args.out))
    runner.test()
    finish_distributed()
    return runner


def enable_visualization(cfg: Config, show: bool, show_dir: Optional[str], wait_time: float) -> None:
    """Turn on the config's visualization hook: draw, and show (``show``) or save under ``show_dir`` (inside the
    work dir). mmdet's and mmseg's hooks take ``draw``; mmpretrain's takes ``enable`` and draws every
    ``interval``-th sample (set to 1, as the others draw every test image)."""
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        raise ConfigError('--show/--show-dir need a visualization hook in default_hooks')
    if cfg.default_scope == 'mmpretrain':
        hook.update(enable=True, interval=1)
    else:
        hook['draw'] = True
    if show:
        hook['show'] = True
        hook['wait_time'] = wait_time
    if show_dir:
        if cfg.default_scope == 'mmdet':
            hook['test_out_dir'] = show_dir
        elif cfg.default_scope == 'mmpretrain':
            hook['out_dir'] = osp.join(cfg.work_dir, show_dir)
        else:
            cfg.visualizer['save_dir'] = show_dir
