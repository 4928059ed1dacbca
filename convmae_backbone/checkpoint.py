"""Checkpoint files: safe reading and atomic writing (adapting the weights to a model is ``models.weights``).

Every file is read with ``torch.load(weights_only=True)``. Checkpoints written by mmengine or the official
code hold a few non-tensor objects (numpy arrays in the message hub, ``argparse.Namespace`` args); those
classes, and only those, are allow-listed for the one load that needs them.
"""
import importlib
import os
import os.path as osp
import pickle
import tempfile
import zipfile
from typing import Callable, Union

import torch

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

    Raises :class:`CheckpointError` naming the file and the cause for a missing, truncated or unreadable file,
    anything that is not a PyTorch checkpoint (whatever ``torch.load`` raises), or one that references any
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
    except Exception as exc:  # noqa: BLE001 - torch.load fails in many ways (KeyError: 101 for a text file)
        raise CheckpointError(f'checkpoint file {path!r} could not be read (truncated, corrupt or not a PyTorch '
                              f'checkpoint): {type(exc).__name__}: {exc}') from exc


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
