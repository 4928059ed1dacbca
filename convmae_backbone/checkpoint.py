"""Safe checkpoint reading and format-agnostic loading of ConvMAE weights.

Every file is read with ``torch.load(weights_only=True)``. Checkpoints written by mmengine or the official
code hold a few non-tensor objects (numpy arrays in the message hub, ``argparse.Namespace`` args); those
classes, and only those, are allow-listed for the one load that needs them.
"""
import importlib
import logging
import os
import pickle
import zipfile
from collections import OrderedDict
from typing import Dict, Iterable, List

import torch
from mmengine.logging import print_log
from torch import Tensor, nn

from .models.utils import resize_pos_embed

# Globals a checkpoint may reference and still be loaded (prefix match on 'module.name').
TRUSTED_GLOBALS = (
    'numpy.',
    'argparse.Namespace',
    'collections.OrderedDict',
    'collections.defaultdict',
    'mmengine.logging.history_buffer.HistoryBuffer',
    'mmengine.config.config.ConfigDict',
    'builtins.set',
    'builtins.frozenset',
    'builtins.slice',
    'builtins.bytes',
    'builtins.getattr',  # replaced by _restricted_getattr
    'torch.',
)

# Keys of a pretraining checkpoint that the backbone does not use.
PRETRAIN_ONLY_PREFIXES = ('decoder_', 'mask_token', 'norm.', 'stage1_output_decode', 'stage2_output_decode')
# Wrappers put around the encoder's own names by detectors, segmentors, DDP and EMA.
STRIP_PREFIXES = ('module.', 'backbone.', 'encoder.', 'model.')


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not fit the model; the message names the file and the cause."""


def _resolve(name: str):
    module, _, attr = name.rpartition('.')
    while module:
        try:
            obj = importlib.import_module(module)
            for part in attr.split('.'):
                obj = getattr(obj, part)
            return obj
        except (ImportError, AttributeError):
            module, _, head = module.rpartition('.')
            attr = f'{head}.{attr}'
    raise ImportError(name)


def _getattr_owners() -> tuple:
    from mmengine.logging import HistoryBuffer
    return (HistoryBuffer,)


def _restricted_getattr(obj, name: str, *default):
    """``getattr`` for unpickling: only public attributes of the allow-listed mmengine classes.

    mmengine pickles a ``HistoryBuffer``'s statistics methods as ``getattr(buffer, 'mean')``.
    """
    owners = _getattr_owners()
    if name.startswith('_') or not (obj in owners or isinstance(obj, owners)):
        raise pickle.UnpicklingError(f'getattr({type(obj).__name__}, {name!r}) is not allowed in a checkpoint')
    return getattr(obj, name, *default)


def _numpy_dtype_classes() -> list:
    """numpy's per-dtype classes, which the unpickler meets when it rebuilds a ``numpy.dtype``."""
    import numpy as np
    dtypes = getattr(np, 'dtypes', None)
    return [getattr(dtypes, n) for n in dir(dtypes) if n.endswith('DType')] if dtypes else []


def safe_torch_load(path: str, map_location='cpu') -> dict:
    """``torch.load(path, weights_only=True)`` that also accepts the allow-listed classes above.

    Raises :class:`CheckpointError` for a missing, truncated or unreadable file, or one that references any
    other Python object.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint file {path!r} does not exist')
    extra = []
    if zipfile.is_zipfile(path):
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as exc:  # noqa: BLE001 - any failure here means the archive is damaged
            raise CheckpointError(f'checkpoint file {path!r} is truncated or corrupt: {exc}') from exc
        untrusted = [n for n in names if not n.startswith(TRUSTED_GLOBALS)]
        if untrusted:
            raise CheckpointError(f'checkpoint file {path!r} references objects that are not loaded for safety: '
                                  f'{untrusted}')
        if any(n.startswith('numpy.') for n in names):
            extra.extend(_numpy_dtype_classes())
        for n in names:
            if n == 'builtins.getattr':
                extra.append((_restricted_getattr, n))
                continue
            try:
                extra.append(_resolve(n))
            except ImportError:
                pass
    try:
        with torch.serialization.safe_globals(extra):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(f'checkpoint file {path!r} could not be read (truncated, corrupt or not a PyTorch '
                              f'checkpoint): {exc}') from exc


def extract_state_dict(ckpt) -> Dict[str, Tensor]:
    """The model weights of a checkpoint in any supported format, with wrapper prefixes removed.

    Formats: mmengine (``state_dict``), official ConvMAE/MAE (``model``), plain state dicts, and detector or
    segmentor checkpoints (``backbone.`` prefix).
    """
    if isinstance(ckpt, dict):
        for key in ('state_dict', 'model', 'module'):
            if key in ckpt and isinstance(ckpt[key], dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'expected a dict of weights, found {type(ckpt).__name__}')
    state = OrderedDict((k, v) for k, v in ckpt.items() if isinstance(v, Tensor))
    has_backbone = any(k.startswith('backbone.') for k in state)
    out = OrderedDict()
    for k, v in state.items():
        if has_backbone and not k.startswith(('backbone.', 'module.backbone.')):
            continue  # a detector/segmentor: keep only its backbone
        changed = True
        while changed:
            changed = False
            for p in STRIP_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _square_grid(n: int, key: str, path: str) -> tuple:
    side = int(round(n ** 0.5))
    if side * side != n:
        raise CheckpointError(f'{path}: cannot infer the grid of {key} with {n} tokens')
    return side, side


def load_encoder_weights(model: nn.Module, path: str, logger: str = 'current',
                         keep_prefixes: Iterable[str] = ()) -> List[str]:
    """Load ConvMAE weights from ``path`` into ``model`` (the backbone or the pretrainer).

    ``pos_embed`` is resized to the model's grid and relative-position tables to the model's sizes; any other
    shape mismatch raises :class:`CheckpointError` naming the key and both shapes. Missing and unexpected keys
    are logged. Returns the list of missing keys.
    """
    state = extract_state_dict(safe_torch_load(path))
    own = model.state_dict()
    if not any(k in own for k in state):
        raise CheckpointError(f'checkpoint {path!r} holds no ConvMAE weights (none of its {len(state)} keys, e.g. '
                              f'{list(state)[:3]}, is a ConvMAE key)')
    ignored = [k for k in state if k not in own and k.startswith(PRETRAIN_ONLY_PREFIXES)
               and not k.startswith(tuple(keep_prefixes))]
    unexpected = [k for k in state if k not in own and k not in ignored]
    to_load = OrderedDict()
    for k, v in state.items():
        if k not in own:
            continue
        target = own[k].shape
        if v.shape != target and k == 'pos_embed':
            src = _square_grid(v.shape[1], k, path)
            dst = model.pos_grid
            if v.shape[-1] != target[-1]:
                raise CheckpointError(f'{path}: {k} has shape {tuple(v.shape)}, the model expects {tuple(target)}')
            v = resize_pos_embed(v.float(), src, dst).to(v.dtype)
            print_log(f'resized pos_embed from grid {src} to {dst}', logger=logger)
        elif v.shape != target and k.endswith(('rel_pos_h', 'rel_pos_w')) and v.shape[1:] == target[1:]:
            v = torch.nn.functional.interpolate(v.t().unsqueeze(0).float(), size=target[0],
                                                mode='linear').squeeze(0).t().to(v.dtype)
        elif v.shape != target:
            raise CheckpointError(f'{path}: shape mismatch for {k}: checkpoint {tuple(v.shape)}, '
                                  f'model {tuple(target)} (a different architecture?)')
        to_load[k] = v
    missing = [k for k in own if k not in to_load]
    model.load_state_dict(to_load, strict=False)
    print_log(f'loaded {len(to_load)} ConvMAE weights from {path}', logger=logger)
    if ignored:
        print_log(f'ignored {len(ignored)} pretraining-only keys (decoder, fusion, final norm)', logger=logger)
    if unexpected:
        print_log(f'unexpected keys in {path}: {unexpected}', logger=logger, level=logging.WARNING)
    if missing:
        print_log(f'missing keys (left at their initialisation): {missing}', logger=logger, level=logging.WARNING)
    return missing


def register_safe_mmengine_loader() -> None:
    """Make mmengine read local checkpoints through :func:`safe_torch_load`.

    mmengine 0.10.x calls ``torch.load`` without ``weights_only``; under torch >= 2.6 that refuses its own
    checkpoints (numpy objects in the message hub), which breaks ``--resume`` and ``load_from``. Only the
    allow-listed classes are accepted, so a checkpoint cannot run arbitrary code.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    def load_from_local(filename: str, map_location=None) -> dict:
        filename = os.path.expanduser(filename)
        if not os.path.isfile(filename):
            raise FileNotFoundError(f'{filename} can not be found.')
        return safe_torch_load(filename, map_location=map_location)

    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)
