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
import argparse
import ast
import logging
import math
import os
import os.path as osp
import pickle
import pickletools
import re
import tempfile
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections import Counter, OrderedDict
from typing import Any, BinaryIO, Callable, Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlparse

import numpy as np
import torch
from mmengine import registry as mmengine_registry
from mmengine.dist import barrier, get_dist_info
from mmengine.fileio import get_file_backend
from mmengine.logging import HistoryBuffer, print_log
from mmengine.registry import Registry
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
#: numpy dtypes a checkpoint's arrays and scalars may have, as numpy names them in pickles: booleans, integers,
#: floats and complex numbers (no object, structured, subarray, void, string or datetime dtypes).
PLAIN_DTYPES = ('b1', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4', 'u8', 'f2', 'f4', 'f8', 'c8', 'c16')
#: Deepest nesting of containers in a checkpoint (its weights sit 2 to 5 levels deep).
MAX_DEPTH = 64
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


def _scan_pickle(stream: BinaryIO, found: Dict[str, None]) -> None:
    """Add to ``found`` the globals one pickle in ``stream`` names (its GLOBAL opcodes), read without unpickling
    it; opcodes that name a global some other way (``STACK_GLOBAL``, ``INST``, ``OBJ``, extension codes), which
    torch's weights-only unpickler does not take either, are listed as ``'<OPCODE>'``."""
    for op, arg, _ in pickletools.genops(stream):
        if op.name == 'GLOBAL':
            found[_global_name(*arg.split(' ', 1))] = None
        elif op.name in ('STACK_GLOBAL', 'INST', 'OBJ', 'EXT1', 'EXT2', 'EXT4'):
            found[f'<{op.name}>'] = None


def is_torch_zip(path: str) -> bool:
    """Whether ``torch.load`` reads file ``path`` as a zip checkpoint: as torch decides it, by the zip signature
    at the start of the file (``zipfile.is_zipfile`` looks for a directory at the end, and so takes a pickle put
    in front of a zip for the zip, which torch does not read)."""
    with open(path, 'rb') as f:
        return f.read(4) == b'PK\x03\x04'


def _data_pickle(archive: zipfile.ZipFile, name: str, size: int) -> zipfile.ZipInfo:
    """The ``data.pkl`` record of a zip checkpoint of ``size`` bytes; raises :class:`CheckpointError` naming the
    file for a TorchScript archive, none or several ``data.pkl``, and one that unpacks to more bytes than the
    file holds (torch stores it uncompressed: only a zip bomb's is larger)."""
    records = archive.infolist()
    if any(r.filename.rsplit('/', 1)[-1] == 'constants.pkl' for r in records):
        raise CheckpointError(f'checkpoint file {name!r} is a TorchScript archive (a program), not a checkpoint '
                              f'of weights')
    data = [r for r in records if r.filename.rsplit('/', 1)[-1] == 'data.pkl']
    if len(data) != 1:
        raise CheckpointError(f'checkpoint file {name!r} is a zip archive without the data.pkl of a PyTorch '
                              f'checkpoint')
    if data[0].file_size > size:
        raise CheckpointError(f'checkpoint file {name!r}: its data.pkl unpacks to {data[0].file_size} bytes, more '
                              f'than the {size} bytes of the whole file (torch stores it uncompressed; a '
                              f'compressed one is refused unread)')
    return data[0]


def pickle_globals(path: str, source: Optional[str] = None) -> List[str]:
    """Every global the pickles of checkpoint file ``path`` name, in order of appearance (duplicates removed).

    A zip checkpoint (``torch.save`` since 1.6; :func:`is_torch_zip`) has one pickle, ``data.pkl``, read only if
    it unpacks to at most the size of the file (:func:`_data_pickle`); a legacy one a sequence of them (magic
    number, protocol, system info, the object, storage keys) before the raw storages; a plain pickle (detectron2
    ``.pkl``) one. The pickle is streamed, never held whole, and every opcode takes at least one of its bytes, so
    the opcodes read are at most the bytes of the file. Raises :class:`CheckpointError` naming ``source``
    (default ``path``) for a TorchScript archive, a compressed ``data.pkl``, or anything that is not pickle data.
    """
    name = source or path
    found: Dict[str, None] = {}
    try:
        if is_torch_zip(path):
            with zipfile.ZipFile(path) as archive:
                with archive.open(_data_pickle(archive, name, osp.getsize(path))) as stream:
                    _scan_pickle(stream, found)
        else:
            with open(path, 'rb') as f:
                for i in range(5):  # a legacy torch file has 5 pickles; a plain pickle has one, then EOF
                    if not f.peek(1)[:1]:
                        break
                    try:
                        _scan_pickle(f, found)
                    except Exception:  # noqa: BLE001 - after a complete pickle: torch reads (and fails) there too
                        if i == 0:
                            raise
                        break
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - zipfile and pickletools fail in many ways on damaged data
        raise CheckpointError(f'checkpoint file {name!r} could not be read (truncated, corrupt or not a PyTorch '
                              f'checkpoint): {_cause(exc)}') from None
    return list(found)


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
class _StandIn:
    """What a global of :data:`TRUSTED_GLOBALS` stands for while a checkpoint is unpickled: it holds the
    arguments (call) and the state (BUILD) the file gives it, and becomes ``value`` once both are those of plain
    data, else records why not (``refused``); :func:`plain_data` then puts ``value`` in its place, or refuses
    naming the path inside the file. No state from a file ever reaches a real numpy or mmengine object (numpy
    does not check the consistency of dtype state; a ``HistoryBuffer``'s statistics table is process-wide)."""
    value: Any = None
    refused: Optional[str] = None
    what = 'object'

    def __setstate__(self, state: Any) -> None:
        self.refuse(f'a {self.what} with state {state!r:.60} is not allowed')

    def refuse(self, why: str) -> None:
        self.value, self.refused = None, self.refused or why

    @classmethod
    def refusal(cls, why: str) -> '_StandIn':
        stand_in = object.__new__(_StandIn)
        stand_in.refuse(why)
        return stand_in


def _ready(stand_in: Any, cls: type) -> bool:
    """Whether ``stand_in`` is a finished, allowed ``cls`` stand-in."""
    return type(stand_in) is cls and stand_in.value is not None


class _NDArrayType(_StandIn):
    """``numpy.ndarray``: only the array type named in ``_reconstruct(ndarray, (0,), b'b')``; a call (an array of
    a shape alone: uninitialised memory) is refused."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _StandIn:
        return _StandIn.refusal('numpy.ndarray(...) is not allowed (arrays are rebuilt from their bytes only)')


class _PlainDType(_StandIn):
    """``numpy.dtype(spec, align, copy)`` then BUILD: a :data:`PLAIN_DTYPES` spec with exactly the state numpy
    writes for it (its byte order aside)."""
    what = 'numpy dtype'

    def __init__(self, spec: Any, align: Any = False, copy: Any = True):
        self.spec = spec
        if type(spec) is not str or spec not in PLAIN_DTYPES or type(align) is not bool:
            self.refuse(f'numpy dtype {spec!r:.60} is not allowed (plain numeric dtypes only: '
                        f'{", ".join(PLAIN_DTYPES)})')

    def __setstate__(self, state: Any) -> None:
        spec = getattr(self, 'spec', None)
        plain = (self.refused is None and spec is not None and self.value is None and type(state) is tuple
                 and len(state) == 8 and all(type(x) in (int, str, type(None)) for x in state))
        dtype = np.dtype(spec) if plain else None
        if plain and state[1] in ('<', '>') and dtype.itemsize > 1:
            dtype = dtype.newbyteorder(state[1])
        if plain and state == dtype.__reduce__()[2]:
            self.value = dtype
        else:
            self.refuse(f'numpy dtype {spec!r:.30} with the state {state!r:.80} is not allowed (only the state '
                        f'numpy writes for a plain numeric dtype)')


class _PlainArray(_StandIn):
    """``numpy._core.multiarray._reconstruct(ndarray, (0,), b'b')`` then BUILD ``(1, shape, dtype, fortran,
    bytes)``: an array of a :class:`_PlainDType` whose bytes are exactly its shape's, copied."""
    what = 'numpy array'

    def __init__(self, cls: Any, shape: Any, typecode: Any):
        if cls is not _NDArrayType or shape != (0,) or typecode not in (b'b', 'b'):
            self.refuse('a numpy array made by _reconstruct with other arguments than numpy writes is not allowed')

    def __setstate__(self, state: Any) -> None:
        if self.refused or self.value is not None or type(state) is not tuple or len(state) not in (4, 5) or (
                len(state) == 5 and state[0] != 1):
            return self.refuse(f'numpy array state {state!r:.80} is not allowed')
        shape, dtype, fortran, data = state[-4:]
        if not _ready(dtype, _PlainDType):
            return self.refuse(getattr(dtype, 'refused', None) or f'a numpy array of {dtype!r:.60} is not allowed')
        if type(shape) is not tuple or not all(type(n) is int and n >= 0 for n in shape) or fortran not in (0, 1):
            return self.refuse(f'numpy array shape {shape!r:.60} (fortran order {fortran!r:.10}) is not allowed')
        data = data.encode('latin1') if type(data) is str else data  # Python 2 pickles read as latin1 text
        size = math.prod(shape) * dtype.value.itemsize
        if type(data) is not bytes or len(data) != size:
            return self.refuse(f'a numpy array of shape {shape} and dtype {dtype.value} takes {size} bytes, its data '
                               f'is {type(data).__name__} of {len(data) if type(data) is bytes else "?"}')
        order = 'F' if fortran else 'C'
        self.value = (np.frombuffer(data, dtype.value).reshape(shape, order=order).copy(order=order) if size else
                      np.zeros(shape, dtype.value, order=order))


def _plain_scalar(dtype: Any, data: Any) -> Any:
    """``numpy._core.multiarray.scalar(dtype, bytes)``: a scalar of a :class:`_PlainDType` from its exact bytes."""
    data = data.encode('latin1') if type(data) is str else data
    if not _ready(dtype, _PlainDType):
        return _StandIn.refusal(getattr(dtype, 'refused', None) or f'a numpy scalar of {dtype!r:.60} is not allowed')
    if type(data) is not bytes or len(data) != dtype.value.itemsize:
        return _StandIn.refusal(f'a numpy {dtype.value} scalar from {data!r:.40} is not allowed (it takes exactly '
                                f'{dtype.value.itemsize} bytes)')
    return np.frombuffer(data, dtype.value)[0]


class _StatisticsMethod(_StandIn):
    """``getattr(HistoryBuffer, name)`` of a :data:`HISTORY_BUFFER_METHODS` name: allowed, and ignored, in the
    ``statistics_methods`` of a ``HistoryBuffer``'s state only."""
    what = 'HistoryBuffer method'


class _PlainHistoryBuffer(_StandIn):
    """mmengine's ``HistoryBuffer`` (NEWOBJ, then BUILD with its attributes): rebuilt as
    ``HistoryBuffer(log_history, count_history, max_length)`` from two 1-D arrays of numbers. The
    ``statistics_methods`` of its state, which ``HistoryBuffer.__setstate__`` writes into the class-wide table of
    every buffer, are ignored."""
    what = 'HistoryBuffer'
    KEYS = ('max_length', '_log_history', '_count_history', 'statistics_methods')

    def __init__(self) -> None:  # NEWOBJ calls __new__ only
        self.refuse('a HistoryBuffer(...) call is not allowed')

    def __setstate__(self, state: Any) -> None:
        if self.refused or self.value is not None or type(state) is not dict or not set(state) <= set(self.KEYS):
            return self.refuse(f'HistoryBuffer state {state!r:.80} is not allowed (attributes '
                               f'{", ".join(self.KEYS)} only)')
        arrays = [state.get(k) for k in ('_log_history', '_count_history')]
        methods = state.get('statistics_methods', {})  # HistoryBuffer.__setstate__ puts them in the class table
        if not all(_ready(a, _PlainArray) and a.value.ndim == 1 for a in arrays) or len(arrays[0].value) != len(
                arrays[1].value) or type(state.get('max_length')) is not int or not (
                type(methods) is dict and all(type(m) is _StatisticsMethod for m in methods.values())):
            return self.refuse('HistoryBuffer state is not allowed (two 1-D numpy arrays of numbers of one length '
                               'and an int max_length only)')
        self.value = HistoryBuffer(arrays[0].value, arrays[1].value, state['max_length'])


class _PlainNamespace(_StandIn):
    """``argparse.Namespace`` (NEWOBJ, then BUILD with its attributes): a namespace of identifier-named
    attributes, whose values :func:`plain_data` checks."""
    what = 'argparse.Namespace'

    def __new__(cls, *args: Any) -> '_PlainNamespace':
        self = super().__new__(cls)
        self.value = argparse.Namespace()
        return self

    def __init__(self) -> None:  # NEWOBJ calls __new__ only
        self.refuse('an argparse.Namespace(...) call is not allowed')

    def __setstate__(self, state: Any) -> None:
        if self.refused or type(state) is not dict or not all(type(k) is str and k.isidentifier() for k in state) \
                or vars(self.value):
            return self.refuse(f'argparse.Namespace state {state!r:.80} is not allowed')
        self.value = argparse.Namespace(**state)


def _history_buffer_method(obj: Any, name: Any, *default: Any) -> _StandIn:
    """``getattr`` as a checkpoint may call it: one of :data:`HISTORY_BUFFER_METHODS` of ``HistoryBuffer``."""
    if obj is _PlainHistoryBuffer and name in HISTORY_BUFFER_METHODS and not default:
        method = object.__new__(_StatisticsMethod)
        method.refuse(f'getattr(HistoryBuffer, {name!r}) outside the state of a HistoryBuffer is not allowed')
        return method
    shown = 'HistoryBuffer' if obj is _PlainHistoryBuffer else getattr(obj, '__name__', type(obj).__name__)
    return _StandIn.refusal(f'getattr({shown}, {name!r:.60}) is not allowed')


#: What each of :data:`TRUSTED_GLOBALS` stands for while a checkpoint is unpickled.
STAND_INS: Dict[str, Any] = {
    'numpy.ndarray': _NDArrayType, 'numpy.dtype': _PlainDType,
    'numpy._core.multiarray._reconstruct': _PlainArray, 'numpy._core.multiarray.scalar': _plain_scalar,
    'numpy.core.multiarray._reconstruct': _PlainArray, 'numpy.core.multiarray.scalar': _plain_scalar,
    'argparse.Namespace': _PlainNamespace, 'mmengine.logging.history_buffer.HistoryBuffer': _PlainHistoryBuffer,
    'builtins.getattr': _history_buffer_method,
}
assert set(STAND_INS) == set(TRUSTED_GLOBALS)


def _trusted_objects() -> List[Tuple[Any, str]]:
    """(stand-in, qualified name) of :data:`TRUSTED_GLOBALS` for ``torch.serialization.safe_globals``."""
    return [(STAND_INS[name], name) for name in TRUSTED_GLOBALS]


# ------------------------------------------------------------------------------------------- plain data
_LEAVES = (str, bytes, int, float, bool, type(None))
_TORCH_LEAVES = (torch.Size, torch.dtype, torch.device)  # built by torch's own allow-list


def _type_name(obj: Any) -> str:
    if isinstance(obj, np.generic) or type(obj) is np.ndarray:
        return f'a numpy {type(obj).__name__} of dtype {obj.dtype}'
    return f'a {type(obj).__module__}.{type(obj).__qualname__}'


def plain_data(obj: Any, source: str) -> Any:
    """``obj`` (an unpickled checkpoint) with every stand-in replaced by its value, checked to be plain data: a
    tree, at most :data:`MAX_DEPTH` deep, of dict / ``OrderedDict`` / ``Counter`` (str, bytes, int, float, bool or
    None keys) /
    list / tuple / str / bytes / int / float / bool / None, tensors (and torch's sizes, dtypes, devices), numpy
    arrays and scalars of :data:`PLAIN_DTYPES`, mmengine ``HistoryBuffer`` and ``argparse.Namespace``. Shared
    parts are walked once. Raises :class:`CheckpointError` naming ``source`` and the path of the first other
    thing inside the file (e.g. ``meta.epoch``)."""
    done: Dict[int, Any] = {}
    active: set = set()

    def refuse(path: str, why: str) -> None:
        shown = path if len(path) <= 120 else f'{path[:60]}...{path[-40:]}'
        raise CheckpointError(f'checkpoint file {source!r}: {shown or "the checkpoint"}: {why}; refused (a '
                              f'checkpoint holds plain data: tensors, numpy arrays of numbers, dict, list, tuple, '
                              f'str, bytes, int, float, bool, None)')

    def walk(o: Any, path: str, depth: int) -> Any:
        t = type(o)
        if t in _LEAVES or t in _TORCH_LEAVES:
            return o
        if isinstance(o, np.generic) or t is np.ndarray:
            if o.dtype.str[1:] not in PLAIN_DTYPES:
                refuse(path, f'{_type_name(o)} is not allowed')
            return o
        if isinstance(o, _StandIn):
            if o.refused or o.value is None:
                refuse(path, o.refused or f'an unfinished {o.what} is not allowed')
            if t is _PlainNamespace:
                for k, v in vars(o.value).items():
                    setattr(o.value, k, walk(v, f'{path}.{k}', depth + 1))
            return o.value
        key = id(o)
        if key in done:
            return done[key]
        if key in active:
            refuse(path, 'it contains itself (a cycle)')
        if depth > MAX_DEPTH:
            refuse(path, f'nested more than {MAX_DEPTH} levels deep')
        active.add(key)
        if isinstance(o, torch.Tensor):
            if getattr(o, '__dict__', None):
                walk(dict(vars(o)), f'{path}.<attributes>', depth + 1)
            result = o
        elif t in (dict, OrderedDict, Counter):  # Counter: mmengine's MultiStepParamScheduler milestones
            for k in list(o):
                if type(k) not in _LEAVES:
                    refuse(path, f'a key that is {_type_name(k)} is not allowed')
                o[k] = walk(o[k], f'{path}.{k}' if path else str(k), depth + 1)
            if t is OrderedDict and vars(o):  # torch's state dicts carry _metadata (a dict), nothing else
                if set(vars(o)) != {'_metadata'} or type(o._metadata) not in (dict, OrderedDict):
                    refuse(path, f'attributes {sorted(vars(o))[:5]} of an OrderedDict are not allowed (a state '
                                 f'dict has a _metadata dict)')
                walk(o._metadata, f'{path}._metadata', depth + 1)
            result = o
        elif t is list:
            for i, item in enumerate(o):
                o[i] = walk(item, f'{path}[{i}]', depth + 1)
            result = o
        elif t is tuple:
            result = tuple(walk(item, f'{path}[{i}]', depth + 1) for i, item in enumerate(o))
        else:
            refuse(path, f'{_type_name(o)} is not allowed')
        active.discard(key)
        done[key] = result
        return result

    return walk(obj, '', 0)


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
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except CheckpointError as exc:  # raised by a stand-in (STAND_INS)
        raise CheckpointError(f'checkpoint file {name!r}: {exc}') from None
    except Exception as exc:  # noqa: BLE001 - torch.load fails in many ways (KeyError: 101 for a text file)
        raise CheckpointError(f'checkpoint file {name!r} could not be read (truncated, corrupt or not a PyTorch '
                              f'checkpoint): {_cause(exc)}') from None
    return plain_data(ckpt, name)


def _latin1_bytes(text: Any, encoding: Any) -> Any:
    """``_codecs.encode(text, 'latin1')``, how protocol-2 pickles of Python 3 write bytes; any other call is
    refused."""
    if type(text) is str and encoding == 'latin1':
        return text.encode('latin1')
    return _StandIn.refusal(f'_codecs.encode({text!r:.30}, {encoding!r:.30}) is not allowed')


class _WeightsUnpickler(pickle.Unpickler):
    """Unpickler of plain weight pickles (detectron2 ``.pkl``): dicts of numpy arrays and nothing else. Every
    global a pickle names, by any opcode, is looked up through :meth:`find_class`: the numpy ones and
    ``_codecs.encode`` stand-ins (:data:`STAND_INS`, :func:`_latin1_bytes`), ``OrderedDict``."""
    ALLOWED = NUMPY_GLOBALS + ('collections.OrderedDict', '_codecs.encode')

    def __init__(self, file: BinaryIO, source: str):
        super().__init__(file, encoding='latin1')  # detectron2's model zoo pickles were written by Python 2
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        full = _global_name(module, name)
        if full not in self.ALLOWED:
            raise CheckpointError(f'checkpoint file {self.source!r} names {full}: refused (unpickling can run code; '
                                  f'a pickle of weights may name numpy arrays and OrderedDict only)')
        if full == '_codecs.encode':
            return _latin1_bytes
        return STAND_INS.get(full) or OrderedDict


def load_weights_pickle(path: str) -> Any:
    """Read the (first) pickle in file ``path`` as a plain pickle of numpy weights (detectron2's ``.pkl``): it
    may name numpy arrays, scalars, dtypes and ``OrderedDict`` only. Raises :class:`CheckpointError` naming the
    file and the cause, e.g. the first other global it names (before calling anything)."""
    if not osp.isfile(path):
        raise CheckpointError(f'checkpoint file {path!r} does not exist')
    try:
        with open(path, 'rb') as f:
            obj = _WeightsUnpickler(f, path).load()
    except CheckpointError as exc:
        raise exc if path in str(exc) else CheckpointError(f'checkpoint file {path!r}: {exc}') from None
    except Exception as exc:  # noqa: BLE001 - any failure means it is not a weights pickle
        raise CheckpointError(f'checkpoint file {path!r} could not be read (not a PyTorch checkpoint nor a pickle '
                              f'of numpy weights): {_cause(exc)}') from None
    return plain_data(obj, path)


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


#: The most config text :func:`literal_assignments` reads (parsing costs some hundred times the text in memory);
#: mmengine's ``pretty_text`` of a detector or segmentor config is some 10-30 KB.
MAX_CONFIG_TEXT = 256 * 1024


def _literal(node: ast.AST, depth: int = 0) -> Any:
    """The value of a literal expression: constants, tuples, lists, sets, dicts and ``dict(key=value, ...)``,
    nested at most :data:`MAX_DEPTH` deep, with unary +/- on numbers. Raises ``_NotLiteral`` naming the first
    other construct, a deeper nesting or an unhashable key."""
    if depth > MAX_DEPTH:
        raise _NotLiteral(f'nesting deeper than {MAX_DEPTH} levels at line {getattr(node, "lineno", "?")}')
    if isinstance(node, ast.Constant):
        return node.value
    try:
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            items = [_literal(e, depth + 1) for e in node.elts]
            return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](items)
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                raise _NotLiteral(f'a ** expansion at line {node.lineno}')
            return {_literal(k, depth + 1): _literal(v, depth + 1) for k, v in zip(node.keys, node.values)}
    except TypeError as exc:  # an unhashable set item or dict key
        raise _NotLiteral(f'{exc} at line {node.lineno}') from None
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'dict'
            and not node.args and all(kw.arg is not None for kw in node.keywords)):
        return {kw.arg: _literal(kw.value, depth + 1) for kw in node.keywords}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _literal(node.operand, depth + 1)
        if isinstance(value, (int, float, complex)) and not isinstance(value, bool):
            return +value if isinstance(node.op, ast.UAdd) else -value
    what = type(node).__name__ if not isinstance(node, ast.Call) else f'a call of {ast.unparse(node.func)}'
    raise _NotLiteral(f'{what} at line {getattr(node, "lineno", "?")}')


def literal_assignments(text: str, source: str = 'config text') -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Read Python config text (e.g. the ``meta.cfg`` mmengine stores in a checkpoint) without executing it.

    Returns ``(values, refused)``: the top-level ``NAME = <literal>`` assignments (see :func:`_literal`: what
    mmengine's ``Config.pretty_text`` writes for plain configs), and for every other top-level assignment the
    construct that made it not a literal. Nothing in ``text`` runs; imports and other statements are ignored.
    Raises :class:`CheckpointError` naming ``source`` if the text is not Python or longer than
    :data:`MAX_CONFIG_TEXT`."""
    if len(text) > MAX_CONFIG_TEXT:
        raise CheckpointError(f'{source} is {len(text)} characters of config text, more than the '
                              f'{MAX_CONFIG_TEXT} read')
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise CheckpointError(f'{source} is not Python text that can be read: {type(exc).__name__}: '
                              f'{str(exc)[:200]}') from None
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


def _registered(type_name: str) -> bool:
    """Whether ``type_name`` is a name registered in one of mmengine's registries (``Name``, or ``scope.Name`` in
    the registry of that scope): one that ``Registry.get`` finds without importing a module by its dotted name."""
    scope, _, name = type_name.rpartition('.')
    pending = [r for r in vars(mmengine_registry).values() if isinstance(r, Registry)]
    while pending:
        registry = pending.pop()
        if name in registry.module_dict and scope in ('', registry.scope):
            return True
        pending += list(registry._children.values())
    return False


def unregistered_types(value: Any, path: str = '') -> List[str]:
    """``'path: type'`` of every ``type`` (and ``_scope_``) in the literal config ``value`` (nested dicts and
    lists) that is not a :func:`_registered` name: what mmengine's builders would import and call by its dotted
    name, e.g. ``type='subprocess.getoutput'``."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            where = f'{path}.{key}' if path else str(key)
            if key == '_scope_' or (key == 'type' and not (isinstance(item, str) and _registered(item))):
                found.append(f'{where}={item!r:.60}')
            else:
                found += unregistered_types(item, where)
    elif isinstance(value, (list, tuple, set)):
        for i, item in enumerate(value):
            found += unregistered_types(item, f'{path}[{i}]')
    return found


#: Top-level config names mmengine's ``Config`` acts on when it reads a text: other files (``_base_``) and
#: modules to import (``custom_imports``).
CONFIG_ACTIONS = ('_base_', 'custom_imports')


def plain_config_text(text: Any, source: str) -> Tuple[Optional[str], List[str]]:
    """Config text that executing runs nothing: the top-level literal assignments of ``text``
    (:func:`literal_assignments`) written back as Python literals, without :data:`CONFIG_ACTIONS` and without
    any whose value names an unregistered type (:func:`unregistered_types`). Returns (that text, or None if
    nothing is left, ``['name (why)', ...]`` for what was left out)."""
    if not isinstance(text, str):
        return None, [f'not text but {type(text).__name__}']
    try:
        values, refused = literal_assignments(text, source)
    except CheckpointError as exc:
        return None, [str(exc)]
    left_out = [f'{name} ({why})' for name, why in refused.items()]
    kept = []
    for name, value in values.items():
        unknown = unregistered_types(value, name)
        if name in CONFIG_ACTIONS or unknown:
            left_out.append(f'{name} ({"read by mmengine as an action" if name in CONFIG_ACTIONS else "names "}'
                            f'{", ".join(unknown[:3])})')
        else:
            kept.append(f'{name} = {value!r}')
    return ('\n'.join(kept) + '\n' if kept else None), left_out


# ----------------------------------------------------------------------------------- mmengine's loaders
#: Config text in checkpoints that mmengine executes with ``Config.fromstring``: ``meta.config``
#: (``Runner.resume``), ``message_hub.runtime_info.cfg`` and ``meta.cfg`` (inferencers built without a config).
CONFIG_TEXT_PATHS = (('meta', 'config'), ('message_hub', 'runtime_info', 'cfg'), ('meta', 'cfg'))


def _for_mmengine(ckpt: Any, source: str) -> Any:
    """``ckpt`` with the config text of :data:`CONFIG_TEXT_PATHS` replaced by :func:`plain_config_text` (removed if
    nothing is left; ``meta.config`` always removed), each change logged: mmengine executes that text, and
    builds the types it names."""
    for path in CONFIG_TEXT_PATHS:
        parent = ckpt
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or path[-1] not in parent:
            continue
        where = '.'.join(path)
        text, left_out = (None, ['resume reads only its gpu_ids']) if path == ('meta', 'config') else \
            plain_config_text(parent[path[-1]], f'{where} of {source}')
        if text is None:
            del parent[path[-1]]
        else:
            parent[path[-1]] = text
        if left_out or text is None:
            print_log(f'{source}: {where} {"removed" if text is None else "read as literals"}; left out: '
                      f'{"; ".join(left_out)[:500]} (config text in a checkpoint is never executed)',
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
