"""Checkpoint files: reading them without running code, the weights they hold, and atomic writing.

A checkpoint is a pickle; unpickling can call any function it names. Every file is therefore read with
``torch.load(weights_only=True)`` after its pickle has been scanned: it may name torch's own weights-only
allow-list (tensors, storages, dtypes, ``OrderedDict``) and :data:`TRUSTED_GLOBALS`, exact qualified names and
nothing else; anything else is refused with :class:`CheckpointError` naming the file and the global before
anything is unpickled. ``import convmae_backbone`` makes mmengine's ``CheckpointLoader`` read every scheme it
knows through the same loader (:func:`register_safe_mmengine_loader`). The config text that checkpoints carry
(``meta.cfg``) is read by :func:`literal_assignments` without being executed. (Adapting weights to a model is
``models.weights``.)
"""
import ast
import importlib
import io
import logging
import os
import os.path as osp
import pickle
import pickletools
import re
import tempfile
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from typing import Any, BinaryIO, Callable, Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlparse

import numpy as np
import torch
from mmengine.dist import barrier, get_dist_info
from mmengine.fileio import get_file_backend
from mmengine.logging import HistoryBuffer, print_log
from mmengine.runner import checkpoint as mmengine_checkpoint
from mmengine.runner.checkpoint import CheckpointLoader

#: numpy objects in checkpoints: arrays, scalars and dtypes (mmengine's message hub, detectron2's ``.pkl``
#: weights); ``numpy.core`` is the name numpy 1.x wrote, ``numpy._core`` numpy 2.x's.
NUMPY_GLOBALS = ('numpy.ndarray', 'numpy.dtype',
                 'numpy._core.multiarray._reconstruct', 'numpy._core.multiarray.scalar',
                 'numpy.core.multiarray._reconstruct', 'numpy.core.multiarray.scalar')
#: The statistics methods of mmengine's ``HistoryBuffer``, which its pickles name as
#: ``getattr(HistoryBuffer, 'mean')``: the only attributes the ``builtins.getattr`` of a checkpoint resolves.
HISTORY_BUFFER_METHODS = ('min', 'max', 'current', 'mean')
#: Every global a checkpoint may name beyond torch's weights-only allow-list: exact qualified names.
TRUSTED_GLOBALS = NUMPY_GLOBALS + (
    'argparse.Namespace',  # official ConvMAE checkpoints: the training arguments ('args')
    'mmengine.logging.history_buffer.HistoryBuffer',  # mmengine checkpoints: message_hub.log_scalars
    'builtins.getattr',  # mmengine: getattr(HistoryBuffer, one of HISTORY_BUFFER_METHODS), nothing else
)
#: Keys under which a checkpoint keeps the model weights, in the order they are looked up: mmengine and mmcv
#: (``state_dict``), the official code and detectron2 (``model``), DDP wrappers saved whole (``module``).
WEIGHTS_KEYS = ('state_dict', 'model', 'module')


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not fit the model; the message names the file and the cause."""


# ------------------------------------------------------------------------------------------- scanning
def _global_name(module: str, name: str) -> str:
    """``module.name`` as Python 3 and torch's unpickler resolve it (``__builtin__`` -> ``builtins``)."""
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f'{module}.{name}'


def _scan_pickle(stream: BinaryIO) -> List[str]:
    """The globals one pickle in ``stream`` names (its GLOBAL opcodes), read without unpickling it; opcodes that
    name a global some other way (``STACK_GLOBAL``, ``INST``, ``OBJ``, extension codes), which torch's
    weights-only unpickler does not take either, are listed as ``'<OPCODE>'``."""
    found = []
    for op, arg, _ in pickletools.genops(stream):
        if op.name == 'GLOBAL':
            found.append(_global_name(*arg.split(' ', 1)))
        elif op.name in ('STACK_GLOBAL', 'INST', 'OBJ', 'EXT1', 'EXT2', 'EXT4'):
            found.append(f'<{op.name}>')
    return found


def pickle_globals(path: str, source: Optional[str] = None) -> List[str]:
    """Every global the pickles of checkpoint file ``path`` name, in order of appearance (duplicates removed).

    A zip checkpoint (``torch.save`` since 1.6) has one pickle, ``data.pkl``; a legacy one a sequence of them
    (magic number, protocol, system info, the object, storage keys) before the raw storages; a plain pickle
    (detectron2 ``.pkl``) one. Raises :class:`CheckpointError` naming ``source`` (default ``path``) for a
    TorchScript archive or anything that is not pickle data.
    """
    name = source or path
    found: List[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                records = archive.namelist()
                if any(r.rsplit('/', 1)[-1] == 'constants.pkl' for r in records):
                    raise CheckpointError(f'checkpoint file {name!r} is a TorchScript archive (a program), not a '
                                          f'checkpoint of weights')
                data = [r for r in records if r.rsplit('/', 1)[-1] == 'data.pkl']
                if len(data) != 1:
                    raise CheckpointError(f'checkpoint file {name!r} is a zip archive without the data.pkl of a '
                                          f'PyTorch checkpoint')
                found = _scan_pickle(io.BytesIO(archive.read(data[0])))
        else:
            with open(path, 'rb') as f:
                for _ in range(5):  # a legacy torch file has 5 pickles; a plain pickle has one, then EOF
                    if not f.peek(1)[:1]:
                        break
                    found += _scan_pickle(f)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - zipfile and pickletools fail in many ways on damaged data
        raise CheckpointError(f'checkpoint file {name!r} could not be read (truncated, corrupt or not a PyTorch '
                              f'checkpoint): {_cause(exc)}') from None
    return list(dict.fromkeys(found))


def check_globals(names: List[str], allowed: Tuple[str, ...], source: str,
                  allowed_name: str = 'tensors and convmae_backbone.checkpoint.TRUSTED_GLOBALS') -> None:
    """Raise :class:`CheckpointError` naming the file ``source`` and every name in ``names`` that is not in
    ``allowed`` (called ``allowed_name`` in the message)."""
    refused = [n for n in names if n not in allowed]
    if refused:
        raise CheckpointError(f'checkpoint file {source!r} names {", ".join(refused)}: refused unread (unpickling '
                              f'can run code; a file of weights may name {allowed_name} only)')


def torch_allowed_globals() -> Tuple[str, ...]:
    """The globals torch's weights-only unpickler allows by itself (tensors, storages, dtypes, a few builtins),
    without those added at run time with ``torch.serialization.add_safe_globals``."""
    return tuple(torch._weights_only_unpickler._get_allowed_globals())


# ---------------------------------------------------------------------------------------------- reading
def _history_buffer_method(obj: Any, name: str, *default: Any) -> Callable:
    """``getattr`` as a checkpoint may call it: one of :data:`HISTORY_BUFFER_METHODS` of ``HistoryBuffer``."""
    if obj is HistoryBuffer and name in HISTORY_BUFFER_METHODS and not default:
        return getattr(HistoryBuffer, name)
    raise CheckpointError(f'getattr({getattr(obj, "__name__", type(obj).__name__)}, {name!r}) is not allowed')


def _resolve(name: str) -> Any:
    module, _, attr = name.rpartition('.')
    return getattr(importlib.import_module(module), attr)


def _trusted_objects() -> List[Tuple[Any, str]]:
    """(object, qualified name) of :data:`TRUSTED_GLOBALS` for ``torch.serialization.safe_globals``, plus numpy's
    per-dtype classes, the types of ``numpy.dtype`` instances that the unpickler must be allowed to build."""
    objects = []
    for name in TRUSTED_GLOBALS:
        if name == 'builtins.getattr':
            objects.append((_history_buffer_method, name))
        elif name.startswith('numpy.core.'):
            objects.append((_resolve(name.replace('numpy.core.', 'numpy._core.')), name))
        else:
            objects.append((_resolve(name), name))
    dtype_classes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith('DType')]
    return objects + [(cls, f'numpy.dtypes.{cls.__name__}') for cls in dtype_classes]


def _cause(exc: BaseException) -> str:
    """What went wrong, in one line, without torch's advice to load the file unsafely."""
    text = str(exc)
    match = re.search(r'WeightsUnpickler error: *\n*(.+)', text)
    line = (match.group(1) if match else text).strip().splitlines()[0] if text.strip() else ''
    if 'weights_only' in line:
        line = "refused by torch's weights-only unpickler"
    return f'{type(exc).__name__}: {line}'


def safe_torch_load(path: Union[str, os.PathLike], map_location: Any = 'cpu', source: Optional[str] = None) -> Any:
    """Read the checkpoint file ``path`` without running code: its pickle is scanned (:func:`pickle_globals`)
    and refused unless every global it names is in torch's weights-only allow-list or :data:`TRUSTED_GLOBALS`,
    then read with ``torch.load(weights_only=True)``.

    Raises :class:`CheckpointError` naming the file (``source`` if given, e.g. the URL it came from) and the
    cause for a missing, truncated or unreadable file, anything that is not a PyTorch checkpoint, a TorchScript
    archive, and a file naming any other global.
    """
    path = os.fspath(path)
    name = source or path
    if not osp.isfile(path):
        raise CheckpointError(f'checkpoint file {name!r} does not exist')
    check_globals(pickle_globals(path, name), TRUSTED_GLOBALS + torch_allowed_globals(), name)
    try:
        with torch.serialization.safe_globals(_trusted_objects()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except CheckpointError as exc:  # raised by _history_buffer_method
        raise CheckpointError(f'checkpoint file {name!r}: {exc}') from None
    except Exception as exc:  # noqa: BLE001 - torch.load fails in many ways (KeyError: 101 for a text file)
        raise CheckpointError(f'checkpoint file {name!r} could not be read (truncated, corrupt or not a PyTorch '
                              f'checkpoint): {_cause(exc)}') from None


class _WeightsUnpickler(pickle.Unpickler):
    """Unpickler of plain weight pickles (detectron2 ``.pkl``): dicts of numpy arrays and nothing else. Every
    global a pickle names, by any opcode, is looked up through :meth:`find_class`."""
    ALLOWED = NUMPY_GLOBALS + ('collections.OrderedDict',)

    def __init__(self, file: BinaryIO, source: str):
        super().__init__(file, encoding='latin1')  # detectron2's model zoo pickles were written by Python 2
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        full = _global_name(module, name)
        if full not in self.ALLOWED:
            raise CheckpointError(f'checkpoint file {self.source!r} names {full}: refused (unpickling can run code; '
                                  f'a pickle of weights may name numpy arrays and OrderedDict only)')
        return super().find_class(module, name)


def load_weights_pickle(path: str) -> Any:
    """Read the (first) pickle in file ``path`` as a plain pickle of numpy weights (detectron2's ``.pkl``): it
    may name numpy arrays, scalars, dtypes and ``OrderedDict`` only. Raises :class:`CheckpointError` naming the
    file and the cause, e.g. the first other global it names (before calling anything)."""
    if not osp.isfile(path):
        raise CheckpointError(f'checkpoint file {path!r} does not exist')
    try:
        with open(path, 'rb') as f:
            return _WeightsUnpickler(f, path).load()
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means it is not a weights pickle
        raise CheckpointError(f'checkpoint file {path!r} could not be read (not a PyTorch checkpoint nor a pickle '
                              f'of numpy weights): {_cause(exc)}') from None


def checkpoint_weights(ckpt: Any, source: str = 'checkpoint') -> Dict[str, Any]:
    """The weights dict of a loaded checkpoint, keys as stored: ``ckpt[k]`` for the first of :data:`WEIGHTS_KEYS`
    that holds a dict, else ``ckpt`` itself (a plain state dict). Raises :class:`CheckpointError` naming
    ``source`` if there is no dict."""
    if isinstance(ckpt, Mapping):
        for key in WEIGHTS_KEYS:
            if isinstance(ckpt.get(key), Mapping):
                return ckpt[key]
        return ckpt
    raise CheckpointError(f'{source}: expected a dict of weights, found {type(ckpt).__name__}')


# ----------------------------------------------------------------------------------- config text, unexecuted
class _NotLiteral(ValueError):
    pass


def _literal(node: ast.AST) -> Any:
    """The value of a literal expression: constants, tuples, lists, sets, dicts and ``dict(key=value, ...)``,
    nested, with unary +/- on numbers. Raises ``_NotLiteral`` naming the first other construct."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = [_literal(e) for e in node.elts]
        return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise _NotLiteral(f'a ** expansion at line {node.lineno}')
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'dict'
            and not node.args and all(kw.arg is not None for kw in node.keywords)):
        return {kw.arg: _literal(kw.value) for kw in node.keywords}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _literal(node.operand)
        if isinstance(value, (int, float, complex)) and not isinstance(value, bool):
            return +value if isinstance(node.op, ast.UAdd) else -value
    what = type(node).__name__ if not isinstance(node, ast.Call) else f'a call of {ast.unparse(node.func)}'
    raise _NotLiteral(f'{what} at line {getattr(node, "lineno", "?")}')


def literal_assignments(text: str, source: str = 'config text') -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Read Python config text (e.g. the ``meta.cfg`` mmengine stores in a checkpoint) without executing it.

    Returns ``(values, refused)``: the top-level ``NAME = <literal>`` assignments (see :func:`_literal`: what
    mmengine's ``Config.pretty_text`` writes for plain configs), and for every other top-level assignment the
    construct that made it not a literal. Nothing in ``text`` runs; imports and other statements are ignored.
    Raises :class:`CheckpointError` naming ``source`` if the text is not Python."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError) as exc:
        raise CheckpointError(f'{source} is not Python text: {exc}') from None
    values: Dict[str, Any] = {}
    refused: Dict[str, str] = {}
    for stmt in tree.body:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            continue
        name = stmt.targets[0].id
        try:
            values[name] = _literal(stmt.value)
            refused.pop(name, None)
        except _NotLiteral as exc:
            values.pop(name, None)
            refused[name] = str(exc)
    return values, refused


# ----------------------------------------------------------------------------------- mmengine's loaders
def _for_mmengine(ckpt: Any, source: str) -> Any:
    """``ckpt`` without ``meta['config']``: config text that mmengine's ``Runner.resume`` would execute (mmengine
    writes its config to ``meta['cfg']``, which it never executes on resuming)."""
    meta = ckpt.get('meta') if isinstance(ckpt, dict) else None
    if isinstance(meta, dict) and 'config' in meta:
        meta.pop('config')
        print_log(f'{source}: ignored meta.config (config text in a checkpoint is never executed)',
                  logger='current', level=logging.WARNING)
    return ckpt


def load_from_local(filename: str, map_location: Any = None) -> Any:
    filename = osp.expanduser(filename)
    return _for_mmengine(safe_torch_load(filename, map_location), filename)


def download(url: str) -> str:
    """The local copy of ``url`` in torch hub's checkpoint folder (``<hub dir>/checkpoints/<file name>``, where
    mmengine's and torch's own downloads go), downloaded if not there yet (by rank 0 first under DDP)."""
    folder = osp.join(torch.hub.get_dir(), 'checkpoints')
    name = osp.basename(urlparse(url).path)
    if name in ('', '.', '..'):  # 'checkpoints/..' would make torch write (and move) its .partial file outside
        raise CheckpointError(f'checkpoint URL {url!r} does not end in a file name')
    os.makedirs(folder, exist_ok=True)
    cached = osp.join(folder, name)
    rank, world_size = get_dist_info()
    for turn in ((0,) if world_size == 1 else (0, 1)):
        if (rank == 0) == (turn == 0) and not osp.isfile(cached):
            try:
                torch.hub.download_url_to_file(url, cached, progress=False)
            except Exception as exc:  # noqa: BLE001 - urllib raises URLError, HTTPError, OSError...
                raise CheckpointError(f'checkpoint {url!r} could not be downloaded: {type(exc).__name__}: '
                                      f'{exc}') from None
        if world_size > 1 and turn == 0:
            barrier()
    return cached


def load_from_http(filename: str, map_location: Any = None) -> Any:
    return _for_mmengine(safe_torch_load(download(filename), map_location, source=filename), filename)


def _model_name(filename: str, table: Mapping[str, str], scheme: str) -> str:
    name = filename.split('://', 1)[1]
    if name not in table:
        raise CheckpointError(f'{filename!r}: mmengine knows no {scheme} model named {name!r}')
    return table[name]


def load_from_torchvision(filename: str, map_location: Any = None) -> Any:
    url = _model_name(filename, mmengine_checkpoint.get_torchvision_models(), 'torchvision')
    return load_from_http(url, map_location)


def load_from_openmmlab(filename: str, map_location: Any = None) -> Any:
    name = filename.split('://', 1)[1]
    name = mmengine_checkpoint.get_deprecated_model_names().get(name, name)
    url = _model_name(f'open-mmlab://{name}', mmengine_checkpoint.get_external_models(), 'open-mmlab')
    if url.startswith(('http://', 'https://')):
        return load_from_http(url, map_location)
    return load_from_local(osp.join(mmengine_checkpoint._get_mmengine_home(), url), map_location)


def load_from_mmcls(filename: str, map_location: Any = None) -> Any:
    url = _model_name(filename, mmengine_checkpoint.get_mmcls_models(), 'mmcls')
    return mmengine_checkpoint._process_mmcls_checkpoint(load_from_http(url, map_location))


def _load_fetched(fetch: Callable[[str], None], filename: str, map_location: Any) -> Any:
    """Read the checkpoint that ``fetch(path)`` writes to a temporary file (a storage service's copy of
    ``filename``)."""
    with tempfile.TemporaryDirectory() as folder:
        path = osp.join(folder, 'checkpoint.pth')
        fetch(path)
        return _for_mmengine(safe_torch_load(path, map_location, source=filename), filename)


def load_from_ceph(filename: str, map_location: Any = None) -> Any:
    def fetch(path: str) -> None:
        with open(path, 'wb') as f:
            f.write(get_file_backend(filename, backend_args={'backend': 'petrel'}).get(filename))
    return _load_fetched(fetch, filename, map_location)


def load_from_pavi(filename: str, map_location: Any = None) -> Any:
    from pavi import modelcloud  # optional: only pavi:// paths need it
    return _load_fetched(modelcloud.get(filename[len('pavi://'):]).download, filename, map_location)


#: Our loader for every scheme mmengine 0.10's ``CheckpointLoader`` knows (its prefixes): each resolves the
#: path as mmengine does and reads the file with :func:`safe_torch_load`.
SAFE_LOADERS: Dict[Tuple[str, ...], Callable] = {
    ('',): load_from_local,
    ('http://', 'https://'): load_from_http,
    ('modelzoo://', 'torchvision://'): load_from_torchvision,
    ('open-mmlab://', 'openmmlab://'): load_from_openmmlab,
    ('mmcls://',): load_from_mmcls,
    ('pavi://',): load_from_pavi,
    (r'(\S+\:)?s3://', r'(\S+\:)?petrel://'): load_from_ceph,
}


def _refuse_scheme(prefix: str) -> Callable:
    def load_from_unsafe_scheme(filename: str, map_location: Any = None) -> Any:
        raise CheckpointError(f'{filename!r}: checkpoints of the scheme {prefix!r} are not read (not one of '
                              f'convmae_backbone.checkpoint.SAFE_LOADERS, the schemes it reads without running code)')
    return load_from_unsafe_scheme


def register_safe_mmengine_loader() -> None:
    """Make mmengine's ``CheckpointLoader`` read every scheme through :func:`safe_torch_load`
    (:data:`SAFE_LOADERS`); a scheme some other package registered, which we cannot read safely, is refused.

    mmengine's ``load_from``, ``--resume``, ``tools/test.py``, inferencers and ``init_cfg`` all read through
    ``CheckpointLoader``. mmengine 0.10.7's own loaders call ``torch.load`` without an allow-list, which under
    torch >= 2.6 refuses mmengine's own checkpoints.
    """
    ours = {p for prefixes in SAFE_LOADERS for p in prefixes}
    for prefix in [p for p in CheckpointLoader._schemes if p not in ours]:
        CheckpointLoader.register_scheme(prefixes=prefix, loader=_refuse_scheme(prefix), force=True)
    for prefixes, loader in SAFE_LOADERS.items():
        CheckpointLoader.register_scheme(prefixes=list(prefixes), loader=loader, force=True)


def load_checkpoint(filename: str, map_location: Any = 'cpu') -> Any:
    """Read a checkpoint from a local path or any URL scheme mmengine knows (``https://``, ``open-mmlab://``...)
    through mmengine's ``CheckpointLoader`` (:func:`register_safe_mmengine_loader`)."""
    return CheckpointLoader.load_checkpoint(filename, map_location=map_location, logger='current')


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
