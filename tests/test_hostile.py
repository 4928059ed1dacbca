"""Hostile checkpoints through every path that reads a file: nothing in them runs.

The corpus is written at test time: pickles whose unpickling calls a function that reaches ``exec``/``eval`` or a
shell (callables under ``torch.*`` and ``numpy.*``, ``builtins``, ``os``, ``subprocess``), nested in ``meta``, the
optimizer state or the weights, as zip and legacy torch files, hand-written pickle opcodes and ``.pkl`` converter
input, and config text in ``meta``. Each payload only creates a marker file. ``test_the_corpus_is_live`` proves
every payload does create it when unpickled the unsafe way; every other test feeds the corpus to one loading path
and asserts a ``CheckpointError`` naming the file and the global, no advice to load unsafely, and no marker.
"""
import argparse
import collections
import contextlib
import copyreg
import io
import itertools
import logging
import os
import pickle
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import tracemalloc
import zipfile
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import numpy.f2py.crackfortran as crackfortran
import numpy.testing._private.utils as numpy_testing_utils
import pytest
import torch
import torch.fx.graph_module
from helpers import ROOT, TINY_ARCH, load_tool, make_images, serve_folder, write_tiny_config
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.logging import HistoryBuffer, MMLogger
from mmengine.registry import DATA_SAMPLERS, DATASETS
from PIL import Image

from convmae_backbone import ConvMAE, ConvMAEPretrainer
from convmae_backbone.apis import cli, visualization
from convmae_backbone.apis.convert import convert
from convmae_backbone.apis.export import export_backbone
from convmae_backbone.checkpoint import CheckpointError, load_checkpoint, load_weights_pickle, safe_torch_load
from convmae_backbone.datasets.shards import ShardError
from convmae_backbone.engine.hooks import NonFiniteLossHook
from convmae_backbone.models.arch import infer_arch, parameter_floor

ENCODER = {k: TINY_ARCH[k] for k in ('embed_dims', 'depths', 'num_heads')}


class Reduce:
    """Pickles as ``func(*args)``: what unpickling it calls."""

    def __init__(self, func: Callable, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _code(marker: Path) -> str:
    return f'open({str(marker)!r}, "w").write("ran")'


def _numpy_load(marker: Path) -> Reduce:
    inner = marker.parent / f'{marker.name}.npy'  # a pickle, not an .npy: numpy.load unpickles it
    inner.write_bytes(pickle.dumps(Reduce(exec, _code(marker))))
    return Reduce(np.load, str(inner), None, True)  # mmap_mode=None, allow_pickle=True


#: Payload name -> (marker path -> object whose unpickling creates the marker, the global it names).
PAYLOADS: Dict[str, Tuple[Callable[[Path], Reduce], str]] = {
    'torch_exec_with_source': (lambda m: Reduce(torch.fx.graph_module._exec_with_source, _code(m), {}),
                               'torch.fx.graph_module._exec_with_source'),
    'numpy_testing_runstring': (lambda m: Reduce(numpy_testing_utils.runstring, _code(m), {}),
                                'numpy.testing._private.utils.runstring'),
    'numpy_f2py_myeval': (lambda m: Reduce(crackfortran.myeval, _code(m)), 'numpy.f2py.crackfortran.myeval'),
    'numpy_load_allow_pickle': (_numpy_load, 'numpy.load'),
    'builtins_eval': (lambda m: Reduce(eval, _code(m)), 'builtins.eval'),
    'builtins_exec': (lambda m: Reduce(exec, _code(m)), 'builtins.exec'),
    'os_system': (lambda m: Reduce(os.system, f'touch {shlex.quote(str(m))}'), f'{os.system.__module__}.system'),
    'subprocess_run': (lambda m: Reduce(subprocess.run, ['touch', str(m)]), 'subprocess.run'),
}
FAST = ('torch_exec_with_source', 'numpy_load_allow_pickle', 'os_system')  # for the slower paths


def tiny_encoder_state() -> dict:
    torch.manual_seed(0)
    return ConvMAE(img_size=32, **ENCODER).state_dict()


def nest(payload: Reduce, where: str) -> dict:
    """A complete checkpoint of the tiny encoder (it would load without the payload) with ``payload`` in
    ``where``."""
    state = tiny_encoder_state()
    if where == 'meta':
        return {'meta': {'epoch': 1, 'iter': 2, 'note': payload}, 'state_dict': state}
    if where == 'optimizer':
        return {'state_dict': state, 'optimizer': {'state': {0: {'step': payload}},
                                                   'param_groups': [{'lr': 0.1, 'params': [0]}]}}
    if where == 'weights':
        return {'model': {**state, 'blocks1.0.gamma': payload}}
    raise ValueError(where)


def write_hostile(folder: Path, payload: str, where: str = 'meta', legacy: bool = False) -> Tuple[Path, Path, str]:
    """(checkpoint file, marker its payload would create, the global it names)."""
    make, name = PAYLOADS[payload]
    marker = folder / f'marker_{payload}_{where}'
    path = folder / f'hostile_{payload}_{where}{"_legacy" if legacy else ""}.pth'
    torch.save(nest(make(marker), where), path, _use_new_zipfile_serialization=not legacy)
    return path, marker, name


def assert_refused(exc_info, path: Path, name: str, marker: Path) -> None:
    message = str(exc_info.value)
    assert path.name in message and name in message, message
    assert 'weights_only' not in message  # no advice to load it unsafely
    assert not marker.exists(), 'the payload ran'


def opcode_pickle(marker: Path) -> bytes:
    """A weights pickle written opcode by opcode: {'model': {'w': exec(code)}} (protocol 2, GLOBAL)."""
    def text(s: str) -> bytes:  # BINUNICODE
        return b'X' + struct.pack('<I', len(s.encode())) + s.encode()
    return (b'\x80\x02' + b'}' + text('model') + b'}' + text('w') + b'cbuiltins\nexec\n' + text(_code(marker))
            + b'\x85' + b'R' + b's' + b's' + b'.')


# --------------------------------------------------------------------------------------------- the corpus
@pytest.mark.parametrize('payload', PAYLOADS)
def test_the_corpus_is_live(tmp_path, payload):
    """Every payload runs when the file is unpickled without an allow-list: the refusals below are real."""
    path, marker, _ = write_hostile(tmp_path, payload)
    torch.load(path, weights_only=False)
    assert marker.exists()
    raw = tmp_path / 'raw.pkl'
    raw.write_bytes(opcode_pickle(tmp_path / 'raw_marker'))
    pickle.loads(raw.read_bytes())
    assert (tmp_path / 'raw_marker').exists()


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
@pytest.mark.parametrize('where', ['meta', 'optimizer', 'weights'])
@pytest.mark.parametrize('payload', PAYLOADS)
def test_safe_torch_load_refuses(tmp_path, payload, where, legacy):
    path, marker, name = write_hostile(tmp_path, payload, where, legacy)
    with pytest.raises(CheckpointError, match='refused') as exc:
        safe_torch_load(path)
    assert_refused(exc, path, name, marker)


def test_getattr_reaches_only_the_history_buffer_statistics(tmp_path):
    """mmengine pickles ``getattr(HistoryBuffer, 'mean')``: allowed for its four statistics methods only."""
    buf = HistoryBuffer()
    buf.update(1.0)
    ok = tmp_path / 'ok.pth'
    torch.save({'message_hub': {'log_scalars': {'loss': buf}}}, ok)
    assert safe_torch_load(ok)['message_hub']['log_scalars']['loss'].mean() == 1.0
    before = dict(HistoryBuffer._statistics_methods)
    bad = tmp_path / 'escape.pth'
    torch.save({'meta': Reduce(getattr, HistoryBuffer, 'register_statistics')}, bad)
    with pytest.raises(CheckpointError, match=r"escape\.pth.*getattr\(HistoryBuffer, 'register_statistics'\) is "
                                              r"not allowed") as exc:
        safe_torch_load(bad)
    assert 'weights_only' not in str(exc.value) and HistoryBuffer._statistics_methods == before


def test_torchscript_and_junk_are_refused_without_unsafe_advice(tmp_path):
    script = tmp_path / 'scripted.pt'
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), script)
    with pytest.raises(CheckpointError, match=r'scripted\.pt.* TorchScript archive'):
        safe_torch_load(script)
    good = tmp_path / 'good.pth'
    torch.save(tiny_encoder_state(), good)
    for name, data in (('truncated.pth', good.read_bytes()[:2000]), ('text.pth', b'hello\n'),
                       ('empty.pth', b''), ('raw.pth', opcode_pickle(tmp_path / 'm'))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=name.replace('.', r'\.')) as exc:
            safe_torch_load(tmp_path / name)
        assert 'weights_only' not in str(exc.value)
    assert not (tmp_path / 'm').exists()


# --------------------------------------------------------------------------------------------- init_cfg
@pytest.mark.parametrize('form', ['dict', 'list', 'arch_auto', 'pretrainer'])
@pytest.mark.parametrize('payload', PAYLOADS)
def test_init_cfg_refuses(tmp_path, payload, form):
    path, marker, name = write_hostile(tmp_path, payload)
    init_cfg = dict(type='Pretrained', checkpoint=str(path))
    with pytest.raises(CheckpointError) as exc:
        if form == 'pretrainer':  # loads in __init__
            ConvMAEPretrainer(img_size=32, **TINY_ARCH, init_cfg=init_cfg)
        elif form == 'arch_auto':  # reads the file in __init__
            ConvMAE(arch='auto', num_heads=4, init_cfg=init_cfg)
        else:
            ConvMAE(img_size=32, **ENCODER, init_cfg=[init_cfg] if form == 'list' else init_cfg).init_weights()
    assert_refused(exc, path, name, marker)


# ------------------------------------------------------------------------------- mmengine Runner: load_from, resume
@pytest.fixture(scope='module')
def pretraining_run(tmp_path_factory):
    """A finished 2-epoch tiny pretraining run: (config file, work dir)."""
    root = tmp_path_factory.mktemp('run')
    cfg = write_tiny_config(root / 'tiny.py', make_images(root / 'data'), max_epochs=2)
    cli.pretrain([str(cfg), '--work-dir', str(root / 'work')])
    return cfg, root / 'work'


@pytest.fixture(scope='module')
def runner(pretraining_run):
    cfg, work = pretraining_run
    return cli.build_runner(cli.load_config(str(cfg), work_dir=str(work.parent / 'other')))


@pytest.mark.parametrize('how', ['load_from', 'resume', 'rollback'])
@pytest.mark.parametrize('payload', PAYLOADS)
def test_runner_refuses(tmp_path, runner, payload, how):
    path, marker, name = write_hostile(tmp_path, payload, 'optimizer')
    with pytest.raises(CheckpointError) as exc:
        if how == 'load_from':
            runner.load_checkpoint(str(path))
        elif how == 'resume':
            runner.resume(str(path))
        else:
            NonFiniteLossHook().rollback(runner, str(path))
    assert_refused(exc, path, name, marker)


@pytest.mark.parametrize('option', ['--resume', 'load_from'])
def test_pretrain_tool_refuses(tmp_path, pretraining_run, option):
    cfg, _ = pretraining_run
    path, marker, name = write_hostile(tmp_path, 'builtins_exec', 'meta')
    args = ['--resume', str(path)] if option == '--resume' else ['--cfg-options', f'load_from={path}']
    with pytest.raises(CheckpointError) as exc:
        cli.pretrain([str(cfg), '--work-dir', str(tmp_path / 'work'), *args])
    assert_refused(exc, path, name, marker)


def test_resume_never_executes_config_text(tmp_path, pretraining_run):
    """mmengine's ``Runner.resume`` executes ``meta['config']``; our loader drops it (mmengine writes ``cfg``)."""
    cfg, work = pretraining_run
    ckpt = safe_torch_load(work / 'epoch_1.pth')
    marker = tmp_path / 'marker_config'
    ckpt['meta']['config'] = f"__import__('os').system('touch {marker}')\ngpu_ids = [0]\n"
    Config.fromstring(ckpt['meta']['config'], '.py')
    assert marker.exists()  # mmengine's Config runs it
    marker.unlink()
    torch.save(ckpt, tmp_path / 'epoch_1.pth')
    runner = cli.pretrain([str(cfg), '--work-dir', str(tmp_path / 'work'), '--resume', str(tmp_path / 'epoch_1.pth')])
    assert runner.epoch == 2 and not marker.exists()


# ----------------------------------------------------------------------------------------- converter
@pytest.mark.parametrize('payload', PAYLOADS)
def test_converter_refuses_checkpoints(tmp_path, payload):
    path, marker, name = write_hostile(tmp_path, payload, 'weights')
    with pytest.raises(CheckpointError) as exc:
        convert('det', str(path), str(tmp_path / 'out.pth'))
    assert_refused(exc, path, name, marker)
    assert not (tmp_path / 'out.pth').exists()


@pytest.mark.parametrize('protocol', ['opcodes', 2, 4])
@pytest.mark.parametrize('payload', ['builtins_exec', 'torch_exec_with_source', 'subprocess_run'])
def test_converter_refuses_pickles(tmp_path, payload, protocol):
    """detectron2 ``.pkl`` input: the payload inside 'model', by GLOBAL (2, hand-written) or STACK_GLOBAL (4)."""
    make, name = PAYLOADS[payload]
    marker = tmp_path / 'marker'
    path = tmp_path / 'model_final.pkl'
    if protocol == 'opcodes':
        path.write_bytes(opcode_pickle(marker))
        name = 'builtins.exec'
    else:
        path.write_bytes(pickle.dumps({'model': {'w': make(marker)}}, protocol=protocol))
    with pytest.raises(CheckpointError) as exc:
        convert('det', str(path), str(tmp_path / 'out.pth'))
    assert_refused(exc, path, name, marker)


# ----------------------------------------------------------------------------------------- other tools
@pytest.mark.parametrize('tool', ['export', 'visualize', 'demo'])
@pytest.mark.parametrize('payload', PAYLOADS)
def test_tools_refuse(tmp_path, payload, tool, image):
    path, marker, name = write_hostile(tmp_path, payload, 'weights' if tool == 'export' else 'meta')
    with pytest.raises(CheckpointError) as exc:
        if tool == 'export':
            export_backbone(str(path), str(tmp_path / 'out.pth'))
        elif tool == 'visualize':
            visualization.visualize(str(path), [str(image)], str(tmp_path / 'out.png'))
        else:
            load_tool('demo').checkpoint_arch(str(path))
    assert_refused(exc, path, name, marker)


@pytest.fixture
def image(tmp_path):
    return next((make_images(tmp_path / 'images', n=1) / 'train').rglob('*.jpg'))


@pytest.mark.parametrize('tool, args', [
    ('convert_official.py', ['det', '{ckpt}', '{out}']),
    ('export_backbone.py', ['{ckpt}', '{out}']),
    ('visualize_reconstruction.py', ['{ckpt}', '{image}', '--out', '{out}']),
])
def test_command_line_tools_print_the_refusal(tmp_path, tool, args, image):
    path, marker, name = write_hostile(tmp_path, 'torch_exec_with_source', 'weights' if 'vis' not in tool else 'meta')
    out = tmp_path / 'out.png'
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / tool),
                           *[a.format(ckpt=path, out=out, image=image) for a in args]],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert last.startswith('error: ') and path.name in last and name in last and 'weights_only' not in last
    assert not marker.exists() and not out.exists()


# ------------------------------------------------------------------------------------- meta.cfg, never run
def _pretraining_checkpoint(path: Path, cfg_text: str) -> None:
    model = ConvMAEPretrainer(img_size=32, **TINY_ARCH)
    torch.save({'meta': {'cfg': cfg_text}, 'state_dict': model.state_dict()}, path)


def _model_literal(**extra) -> str:
    """``model = dict(...)`` as mmengine's ``Config.pretty_text`` writes the tiny pretraining model."""
    model = dict(type='ConvMAEPretrainer', img_size=32, **TINY_ARCH, **extra,
                 data_preprocessor=dict(type='ImgDataPreprocessor', mean=[123.675, 116.28, 103.53],
                                        std=[58.395, 57.12, 57.375]))
    return Config(dict(model=model)).pretty_text


def test_meta_cfg_statements_are_ignored_not_run(tmp_path, image):
    marker = tmp_path / 'marker_cfg'
    text = f"import os\n__import__('os').system('touch {marker}')\n" + _model_literal()
    Config.fromstring(text, '.py')
    assert marker.exists()  # mmengine's Config.fromstring runs it (what the visualiser used to do)
    marker.unlink()
    ckpt = tmp_path / 'run.pth'
    _pretraining_checkpoint(ckpt, text)
    width, _, _ = visualization.visualize(str(ckpt), [str(image)], str(tmp_path / 'out.png'))
    assert width == 4 * 32 and not marker.exists()
    assert load_tool('demo').checkpoint_arch(str(ckpt))['num_heads'] == TINY_ARCH['num_heads']
    assert not marker.exists()


@pytest.mark.parametrize('model_text', [
    "model = dict(type='ConvMAEPretrainer', depths=__import__('os').system('touch {marker}'))\n",
    "model = dict(type='ConvMAEPretrainer', **{{'x': exec('open(\"{marker}\", \"w\")')}})\n",
    "model = [x for x in (open('{marker}', 'w'),)]\n",
])
def test_meta_cfg_with_code_in_the_model_is_refused(tmp_path, image, model_text):
    marker = tmp_path / 'marker_cfg'
    ckpt = tmp_path / 'run.pth'
    _pretraining_checkpoint(ckpt, model_text.format(marker=marker))
    with pytest.raises(CheckpointError, match=r'run\.pth \(meta\.cfg\) is not a literal .*never executed: pass '
                                              r'--config'):
        visualization.visualize(str(ckpt), [str(image)], str(tmp_path / 'out.png'))
    with pytest.raises(CheckpointError, match='is not a literal'):
        load_tool('demo').checkpoint_arch(str(ckpt))
    assert not marker.exists() and not (tmp_path / 'out.png').exists()


def test_meta_cfg_may_not_pick_another_model_class(tmp_path, image):
    """A literal config still builds nothing but a ConvMAEPretrainer, and reads no other file (init_cfg)."""
    ckpt = tmp_path / 'run.pth'
    _pretraining_checkpoint(ckpt, "model = dict(type='ImgDataPreprocessor')\n")
    with pytest.raises(CheckpointError, match=r"builds a 'ImgDataPreprocessor', not a ConvMAEPretrainer"):
        visualization.visualize(str(ckpt), [str(image)], str(tmp_path / 'out.png'))
    path, marker, _ = write_hostile(tmp_path, 'builtins_exec')
    text = _model_literal(init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    assert str(path) in text
    _pretraining_checkpoint(ckpt, text)
    visualization.visualize(str(ckpt), [str(image)], str(tmp_path / 'out.png'))  # init_cfg not followed
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- tools/test.py
@pytest.fixture(scope='module')
def seg_setup(tmp_path_factory):
    """A tiny UperNet config on a tiny ADE20K folder, and the state dict of its model: (config file, state)."""
    from convmae_backbone.testing import tiny_seg_config, write_ade_dataset
    root = tmp_path_factory.mktemp('seg')
    cfg = tiny_seg_config(write_ade_dataset(str(root / 'ade'), num_train=1, num_val=1), str(root / 'work'))
    config = root / 'config.py'
    cfg.dump(str(config))
    state = cli.build_runner(cli.load_config(str(config), work_dir=str(root / 'work'))).model.state_dict()
    return config, state


@pytest.mark.parametrize('payload', FAST)
def test_test_tool_refuses(tmp_path, seg_setup, payload):
    config, _ = seg_setup
    path, marker, name = write_hostile(tmp_path, payload, 'meta')
    with pytest.raises(CheckpointError) as exc:
        cli.evaluate([str(config), str(path), '--work-dir', str(tmp_path / 'work')])
    assert_refused(exc, path, name, marker)


def test_test_tool_refuses_a_checkpoint_that_leaves_most_of_the_model_unloaded(tmp_path, seg_setup):
    """mmengine loads load_from with strict=False and only warns; tools/test.py names what is missing."""
    config, state = seg_setup
    other = tmp_path / 'other_model.pth'  # e.g. a segmentor of another backbone: only the auxiliary head fits
    torch.save({'state_dict': {k: v for k, v in state.items() if k.startswith('auxiliary_head.')}}, other)
    with pytest.raises(CheckpointError, match=r"other_model\.pth' fills only (\d+) of the \d+ tensors of the model "
                                              r"\(fewer than 50%\); loaded per module: backbone 0/\d+, "
                                              r"decode_head 0/\d+, auxiliary_head \1/\1"):
        cli.evaluate([str(config), str(other), '--work-dir', str(tmp_path / 'work')])
    official = tmp_path / 'official_format.pth'
    torch.save({'model': state}, official)
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / 'test.py'), str(config), str(official),
                           '--work-dir', str(tmp_path / 'work')], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith('error: ') and 'backbone 0/' in last, proc.stderr[-3000:]
    assert 'convert it with tools/convert_official.py' in last
    full = tmp_path / 'full.pth'
    trained = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}  # not the built weights
    torch.save({'state_dict': trained}, full)
    runner = cli.evaluate([str(config), str(full), '--work-dir', str(tmp_path / 'work')])
    assert all(torch.equal(v, trained[k]) for k, v in runner.model.state_dict().items())


# ------------------------------------------------------------------- round 2: a checkpoint holds plain data only
class WithState:
    """Pickles as ``func(*args)``, then BUILD with ``state`` (``__setstate__``)."""

    def __init__(self, func: Callable, args: tuple, state):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return self.func, self.args, self.state


def numpy_dtype(spec: str, state: tuple) -> WithState:
    """``numpy.dtype(spec)`` given ``state``: numpy takes any state without checking it."""
    return WithState(np.dtype, (spec, False, True), state)


def numpy_array(dtype, data: bytes, shape: tuple = (1,)) -> WithState:
    """A numpy array as numpy pickles one: ``_reconstruct(ndarray, (0,), b'b')`` then ``(1, shape, dtype, False,
    data)``."""
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy's _reconstruct, under numpy 1.x's or 2.x's module name
    return WithState(reconstruct, (np.ndarray, (0,), b'b'), (1, shape, dtype, False, data))


def run_unsafe(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh Python (what an unsafe load does to a process is kept out of this one)."""
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=cwd)


#: A subarray dtype of 65536 bytes whose state claims 4 (numpy reads past the 4-byte buffer), and a structured
#: one whose state hides an object field (numpy takes the bytes for a pointer).
SUBARRAY = numpy_dtype('V4', (3, '|', (np.dtype('u1'), (65536,)), None, None, 4, 1, 0))
HIDDEN_OBJECT = numpy_dtype('V8', (3, '|', None, ('a',), {'a': (np.dtype('O'), 0)}, 8, 1, 0))


@pytest.mark.parametrize('fmt', ['zip', 'legacy', 'pkl'])
def test_numpy_state_that_reads_the_heap_is_refused(tmp_path, fmt):
    """The converter copied 64 KB of process memory into its output from a 4-byte array."""
    path = tmp_path / f'model_final.{"pkl" if fmt == "pkl" else "pth"}'
    ckpt = {'model': {'backbone.bottom_up.pos_embed': numpy_array(SUBARRAY, b'\0' * 4)}}
    if fmt == 'pkl':
        path.write_bytes(pickle.dumps(ckpt, protocol=2))
    else:
        torch.save(ckpt, path, _use_new_zipfile_serialization=fmt == 'zip')
    load = 'pickle.load(open(p, "rb"))' if fmt == 'pkl' else 'torch.load(p, weights_only=False)'
    proc = run_unsafe(f'import pickle, torch; p = {str(path)!r}\n'
                      f'a = {load}["model"]["backbone.bottom_up.pos_embed"]\nprint(len(a.copy().tobytes()))', tmp_path)
    assert proc.stdout.split() == ['65536'], proc.stderr  # 64 KB out of a 4-byte buffer
    with pytest.raises(CheckpointError, match=r"model_final\.\w+'?: model\.backbone\.bottom_up\.pos_embed: numpy "
                                              r"dtype 'V4' is not allowed") as exc:
        convert('det', str(path), str(tmp_path / 'out.pth'))
    assert 'weights_only' not in str(exc.value) and not (tmp_path / 'out.pth').exists()


def test_numpy_state_that_hides_an_object_is_refused(tmp_path, image):
    """A structured dtype whose state hides an object field: numpy dereferences the array's bytes (SIGSEGV)."""
    path = tmp_path / 'run.pth'
    torch.save({'meta': {'note': numpy_array(HIDDEN_OBJECT, b'\x10' * 8)}, 'state_dict': tiny_encoder_state()}, path)
    proc = run_unsafe(f'import torch\nprint(torch.load({str(path)!r}, weights_only=False)["meta"]["note"]["a"])',
                      tmp_path)
    assert proc.returncode < 0, (proc.returncode, proc.stderr[-500:])  # killed by a signal
    for load in (lambda: safe_torch_load(path),
                 lambda: visualization.visualize(str(path), [str(image)], str(tmp_path / 'out.png'))):
        with pytest.raises(CheckpointError, match=r"run\.pth'?: meta\.note: numpy dtype 'V8' is not allowed"):
            load()


@pytest.mark.parametrize('state', [
    (3, '<', None, None, None, 4, 1, 0),  # float64 claiming 4 bytes
    (3, '|', (np.dtype('f8'), (2,)), None, None, -1, -1, 0),  # a subarray under a plain name
    (3, '<', None, ('a',), {'a': (np.dtype('f4'), 0)}, -1, -1, 0),  # fields under a plain name
])
def test_plain_dtype_names_with_other_state_are_refused(tmp_path, state):
    path = tmp_path / 'ckpt.pth'
    torch.save({'w': numpy_array(numpy_dtype('f8', state), b'\0' * 8)}, path)
    with pytest.raises(CheckpointError, match=r"ckpt\.pth'?: w: numpy dtype 'f8' with the state .* is not allowed"):
        safe_torch_load(path)


def test_structured_meta_runs_code_through_resume_when_unsafe_and_is_refused(tmp_path, pretraining_run):
    """``meta`` as a numpy structured scalar (epoch, iter, config) passed the old loader; mmengine's
    ``Runner.resume`` executes its ``config``."""
    cfg, work = pretraining_run
    marker = tmp_path / 'marker_meta'
    ckpt = safe_torch_load(work / 'epoch_1.pth')
    code = f"__import__('os').system('touch {marker}')\n"
    ckpt['meta'] = np.array((1, 2, code), dtype=[('epoch', 'i8'), ('iter', 'i8'), ('config', 'U200')])[()]
    path = tmp_path / 'epoch_1.pth'
    torch.save(ckpt, path)
    proc = run_unsafe(f'import torch\nfrom mmengine.config import Config\n'
                      f'meta = torch.load({str(path)!r}, weights_only=False)["meta"]\n'
                      f'Config.fromstring(str(meta["config"]), ".py")', tmp_path)
    assert marker.exists(), proc.stderr[-500:]  # the text in meta runs
    marker.unlink()
    with pytest.raises(CheckpointError, match=r"epoch_1\.pth'?: meta: numpy dtype 'V\d+' is not allowed") as exc:
        cli.pretrain([str(cfg), '--work-dir', str(tmp_path / 'work'), '--resume', str(path)])
    assert 'weights_only' not in str(exc.value) and not marker.exists()


def test_history_buffer_state_never_reaches_the_class_table(tmp_path):
    """``HistoryBuffer.__setstate__`` writes the ``statistics_methods`` of any checkpoint into the table of every
    buffer of the process: 'mean' made 'max'."""
    buf = HistoryBuffer([1, 9], [1, 1])
    state = dict(max_length=10, _log_history=np.array([1., 9.]), _count_history=np.array([1., 1.]),
                 statistics_methods={'mean': HistoryBuffer.max})
    buf.__reduce_ex__ = lambda protocol: (copyreg.__newobj__, (HistoryBuffer,), state)
    path = tmp_path / 'hub.pth'
    torch.save({'message_hub': {'log_scalars': {'loss': buf}}}, path)
    proc = run_unsafe(f'import torch\nfrom mmengine.logging import HistoryBuffer\n'
                      f'torch.load({str(path)!r}, weights_only=False)\n'
                      f'print(float(HistoryBuffer([1, 9], [1, 1]).statistics("mean")))', tmp_path)
    assert proc.stdout.split() == ['9.0'], proc.stderr[-500:]
    before = dict(HistoryBuffer._statistics_methods)
    loaded = safe_torch_load(path)['message_hub']['log_scalars']['loss']
    assert type(loaded) is HistoryBuffer and loaded.max_length == 10
    assert loaded.statistics('mean') == 5.0 and HistoryBuffer([1, 9], [1, 1]).statistics('mean') == 5.0
    assert HistoryBuffer._statistics_methods == before
    buf.__reduce_ex__ = lambda protocol: (copyreg.__newobj__, (HistoryBuffer,), {**state, 'max_length': 'x'})
    torch.save({'message_hub': {'log_scalars': {'loss': buf}}}, path)
    with pytest.raises(CheckpointError, match=r"message_hub\.log_scalars\.loss: HistoryBuffer state is not allowed"):
        safe_torch_load(path)


@pytest.mark.parametrize('value, refusal', [
    ({1, 2}, r'meta\.note: a builtins\.set is not allowed'),
    (collections.Counter({(1, 2): 1}), r"meta\.note: a key that is a builtins\.tuple is not allowed"),
    (complex(1, 2), r'meta\.note: a builtins\.complex is not allowed'),
    (np.array(['a', 'b'], dtype='U3'), r"meta\.note: numpy dtype 'U3' is not allowed"),
    (np.datetime64('2020-01-01'), r"meta\.note: numpy dtype 'M8' is not allowed"),
])
def test_anything_but_plain_data_is_refused_naming_its_path(tmp_path, value, refusal):
    path = tmp_path / 'ckpt.pth'
    torch.save({'meta': {'epoch': 1, 'note': value}, 'state_dict': {}}, path)
    with pytest.raises(CheckpointError, match=r"ckpt\.pth'?: " + refusal):
        safe_torch_load(path)


def test_scheduler_milestones_counter_is_plain_data(tmp_path):
    """mmengine's MultiStepParamScheduler keeps its milestones in a ``collections.Counter`` (torch's own
    allow-list has it): a resumable checkpoint, read back as the same Counter."""
    path = tmp_path / 'ckpt.pth'
    milestones = collections.Counter({8: 1, 11: 1})
    torch.save({'param_schedulers': [{'milestones': milestones, 'gamma': 0.1}], 'state_dict': {}}, path)
    loaded = safe_torch_load(path)['param_schedulers'][0]['milestones']
    assert type(loaded) is collections.Counter and loaded == milestones


def test_cycles_and_deep_nesting_are_refused(tmp_path):
    cycle: list = []
    cycle.append(cycle)
    deep: dict = {}
    inner = deep
    for _ in range(200):
        inner['a'] = {}
        inner = inner['a']
    for name, value, refusal in (('cycle', cycle, r'meta\[0\]: it contains itself'),
                                 ('deep', deep, r'meta\.a\.a\.a.*: nested more than 64 levels deep')):
        torch.save({'meta': value}, tmp_path / f'{name}.pth')
        with pytest.raises(CheckpointError, match=refusal):
            safe_torch_load(tmp_path / f'{name}.pth')
    shared = [list(range(3))] * 2  # shared, not cyclic: allowed, walked once
    torch.save({'meta': {'a': shared}}, tmp_path / 'shared.pth')
    assert safe_torch_load(tmp_path / 'shared.pth')['meta']['a'] == [[0, 1, 2], [0, 1, 2]]


def test_plain_checkpoint_contents_still_load(tmp_path):
    """What mmengine, the official code and detectron2 write: numpy arrays and scalars, Namespace, torch sizes."""
    ckpt = {'meta': {'epoch': 1, 'arr': np.arange(4.).reshape(2, 2).T, 'f32': np.float32(2), 'flags': np.array([True]),
                     'big_endian': np.arange(3, dtype='>i4'), 'size': torch.Size([2, 3]), 'dtype': torch.float16},
            'args': argparse.Namespace(lr=0.1, input_size=224, betas=(0.9, 0.95)), 'state_dict': tiny_encoder_state()}
    path = tmp_path / 'ok.pth'
    torch.save(ckpt, path)
    loaded = safe_torch_load(path)
    assert np.array_equal(loaded['meta']['arr'], ckpt['meta']['arr']) and loaded['meta']['arr'].flags.f_contiguous
    assert loaded['meta']['f32'] == np.float32(2) and loaded['meta']['big_endian'].dtype == np.dtype('>i4')
    assert vars(loaded['args']) == vars(ckpt['args']) and loaded['meta']['size'] == torch.Size([2, 3])
    assert loaded['state_dict']._metadata == ckpt['state_dict']._metadata
    path.write_bytes(pickle.dumps({'model': {'w': np.arange(3.)}}, protocol=2))  # detectron2 .pkl, Python 3
    assert np.array_equal(load_weights_pickle(str(path))['model']['w'], np.arange(3.))


# ------------------------------------------------------------------------------ round 2: config text, inferencers
def _cfg_checkpoint(path: Path, text: str, where: str = 'meta') -> None:
    model = ConvMAEPretrainer(img_size=32, **TINY_ARCH)
    extra = ({'meta': {'cfg': text}} if where == 'meta' else
             {'meta': {}, 'message_hub': {'runtime_info': {'cfg': text}}})
    torch.save({**extra, 'state_dict': model.state_dict()}, path)


@pytest.mark.parametrize('where', ['meta', 'message_hub'])
@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_inferencers_without_a_config_never_run_the_stored_one(tmp_path, scope, where):
    """``DetInferencer(model=None, weights=F)`` and ``MMSegInferencer(None, weights=F)`` execute the config text of
    F, then build the types it names (a dotted name is imported and called)."""
    marker, built = tmp_path / 'marker_text', tmp_path / 'marker_type'
    text = (f"__import__('os').system('touch {marker}')\n"
            f"model = dict(type='subprocess.getoutput', cmd='touch {built}')\n")
    Config.fromstring(text, '.py')
    assert marker.exists()
    from mmengine.registry import MODELS
    MODELS.build(Config.fromstring(text, '.py').model)
    assert built.exists()  # both run when read the mmengine way
    marker.unlink(), built.unlink()
    path = tmp_path / 'weights.pth'
    _cfg_checkpoint(path, text, where)
    if scope == 'mmdet':
        from mmdet.apis import DetInferencer as Inferencer
    else:
        from mmseg.apis import MMSegInferencer as Inferencer
    with pytest.raises((ValueError, AssertionError, KeyError)):  # mmengine finds no config to use
        Inferencer(None, weights=str(path), device='cpu')
    assert not marker.exists() and not built.exists()


def test_stored_config_text_reaches_mmengine_as_literals_of_registered_types(tmp_path):
    text = (f"import os\nx = os.getcwd()\n_base_ = ['/elsewhere/base.py']\ncustom_imports = dict(imports=['os'])\n"
            + _model_literal())
    path = tmp_path / 'run.pth'
    _cfg_checkpoint(path, text)
    stored = load_checkpoint(str(path))['meta']['cfg']
    cfg = Config.fromstring(stored, '.py')
    assert set(cfg.keys()) == {'model'} and cfg.model == Config.fromstring(_model_literal(), '.py').model


@pytest.mark.parametrize('model_text, refusal', [
    ("model = dict(type='ConvMAEPretrainer', data_preprocessor=dict(type='subprocess.getoutput', "
     "cmd='touch {marker}'))\n", r"names types no registry holds.*subprocess\.getoutput"),
    ("model = dict(type='ConvMAEPretrainer', _scope_='os')\n", r'names types no registry holds.*_scope_'),
    ('model = ' + '[' * 100 + ']' * 100 + '\n', r'not a literal \(nesting deeper than 64 levels'),
    ("model = {[1]: 2}\n", r"not a literal \(unhashable type: 'list'"),
    (_model_literal(bogus=1), r"does not build a ConvMAEPretrainer: TypeError: .*\['bogus'\]"),
    ("model = 'x' + " + "'" + 'x' * 300_000 + "'\n", r'more than the 262144 read'),
])
def test_odd_meta_cfg_ends_the_visualiser_with_one_error_line(tmp_path, image, capsys, monkeypatch, model_text,
                                                             refusal):
    marker = tmp_path / 'marker'
    ckpt = tmp_path / 'run.pth'
    _cfg_checkpoint(ckpt, model_text.replace('{marker}', str(marker)))
    tool = load_tool('visualize_reconstruction')
    monkeypatch.setattr(sys, 'argv', ['visualize_reconstruction.py', str(ckpt), str(image), '--out',
                                      str(tmp_path / 'out.png')])
    with pytest.raises(SystemExit) as exc:
        cli.run_tool(tool.main)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and len(err) == 1 and err[0].startswith('error: '), err
    assert re.search(refusal, err[0]) and 'run.pth' in err[0], err[0]
    assert not marker.exists() and not (tmp_path / 'out.png').exists()


@pytest.mark.parametrize('extra, refusal', [
    (dict(decoder_embed_dim=4096), r'decoder_embed_dim: config 4096, checkpoint \d+'),
    (dict(decoder_depth=5000), r'decoder_depth: config 5000, checkpoint \d+'),
    (dict(img_size=32 * 64), r'position grid: config 2048'),
    (dict(embed_dims=[256, 384, 768]), r'embed_dims: config'),
])
def test_meta_cfg_sizes_are_checked_against_the_weights_before_building(tmp_path, image, monkeypatch, extra,
                                                                       refusal):
    """The visualiser built what meta.cfg claims before checking the weights (+1.5 GB for a large decoder)."""
    ckpt = tmp_path / 'run.pth'
    _cfg_checkpoint(ckpt, Config(dict(model={**dict(type='ConvMAEPretrainer', img_size=32, **TINY_ARCH),
                                             **extra})).pretty_text)

    def build(*args, **kwargs):
        raise AssertionError('a model was built')
    monkeypatch.setattr(visualization.MODELS, 'build', build)
    with pytest.raises(CheckpointError, match=r'run\.pth \(meta\.cfg\) does not fit its weights.*' + refusal):
        visualization.visualize(str(ckpt), [str(image)], str(tmp_path / 'out.png'))


# ------------------------------------------------------------------------------------- round 2: small files, bounds
def _zip_with_data_pickle(path: Path, payload: bytes, compression: int = zipfile.ZIP_DEFLATED) -> None:
    """A torch zip checkpoint of ``{'a': 1}`` whose data.pkl has ``payload`` (opcodes) before its STOP."""
    buf = io.BytesIO()
    torch.save({'a': 1}, buf)
    good = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, 'w', compression) as out:
        for info in good.infolist():
            data = good.read(info.filename)
            out.writestr(info.filename, data[:-1] + payload + b'.' if info.filename.endswith('data.pkl') else data)


def test_a_zip_bomb_is_refused_before_it_unpacks(tmp_path):
    path = tmp_path / 'bomb.pth'
    _zip_with_data_pickle(path, b'N0' * (32 << 20))  # 64 MB of no-op opcodes in some 66 KB
    assert path.stat().st_size < 200_000
    proc = run_unsafe('import torch\n'
                      'def kib(key):\n'
                      '    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key)))\n'
                      'open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS\n'
                      'before = kib("VmRSS:")\n'
                      f'torch.load({str(path)!r}, weights_only=False)\n'
                      'print(kib("VmHWM:") - before)', tmp_path)
    assert int(proc.stdout.split()[-1]) > 60_000, proc.stderr[-500:]  # KiB: torch unpacks and runs it all
    tracemalloc.start()
    with pytest.raises(CheckpointError, match=r"bomb\.pth'?: its data\.pkl unpacks to 67108\d\d\d bytes, more "
                                              r"than the \d+ bytes of the whole file"):
        safe_torch_load(path)
    assert tracemalloc.get_traced_memory()[1] < 5 * 2 ** 20
    tracemalloc.stop()


@pytest.mark.parametrize('fmt', ['zip', 'plain'])
def test_no_op_opcodes_cost_time_in_proportion_to_the_file(tmp_path, fmt):
    path = tmp_path / 'noops.pth'
    noops = b'(0' * 8192 + b'N0' * 8192  # 32 KB of MARK, POP, NONE, POP
    if fmt == 'zip':
        _zip_with_data_pickle(path, noops, zipfile.ZIP_STORED)
    else:
        path.write_bytes(b'\x80\x02' + noops + b'N.')
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r'noops\.pth'):
        safe_torch_load(path)
    assert time.perf_counter() - start < 2.0


def test_a_pickle_in_front_of_a_zip_is_read_as_torch_reads_it(tmp_path):
    """torch reads a file as a zip only if it starts as one; zipfile finds the zip at the end of the file."""
    marker = tmp_path / 'marker_prefix'
    buf = io.BytesIO()
    torch.save(tiny_encoder_state(), buf)
    path = tmp_path / 'prefixed.pth'
    path.write_bytes(pickle.dumps(Reduce(exec, _code(marker)), protocol=2) + buf.getvalue())
    assert zipfile.is_zipfile(path)
    with pytest.raises(Exception):
        torch.load(path, weights_only=False)
    assert marker.exists()  # torch ran the pickle in front
    marker.unlink()
    with pytest.raises(CheckpointError, match=r'prefixed\.pth.* names builtins\.exec'):
        safe_torch_load(path)
    with pytest.raises(CheckpointError, match=r'prefixed\.pth.* names builtins\.exec'):
        convert('det', str(path), str(tmp_path / 'out.pth'))
    assert not marker.exists()


@pytest.mark.parametrize('claim', ['expanded', 'depth'])
def test_arch_auto_builds_no_more_than_the_weights_store(tmp_path, claim):
    """``arch='auto'`` built whatever the shapes claim: 105 M parameters from one-element expanded tensors."""
    if claim == 'expanded':
        shapes = {k: v.shape for k, v in ConvMAE(arch='base').state_dict().items()}
        state = {k: torch.zeros(()).expand(shape) for k, shape in shapes.items()}
        refusal = r'.+ is stored in 4 bytes \(an expanded view\)'
    else:
        state = {**tiny_encoder_state(), **{f'blocks3.{i}.gamma': torch.zeros(1) for i in range(3, 1000)}}
        refusal = (r'the encoder its shapes claim \(.*depths=\(1, 1, 999\).*\) needs at least \d+ weights, its tensors '
                   r'store \d+; refused before building it')
    path = tmp_path / 'claims.pth'
    torch.save(state, path)
    assert path.stat().st_size < 2_000_000
    claimed = infer_arch(safe_torch_load(path))  # what would be built: at least parameter_floor weights
    assert parameter_floor(claimed) > 20_000_000 > 10 * path.stat().st_size
    with pytest.raises(CheckpointError, match=r'claims\.pth: ' + refusal):
        ConvMAE(arch='auto', init_cfg=dict(type='Pretrained', checkpoint=str(path)))


# ------------------------------------------------------------------------------------ round 2: one error line
def test_test_tool_refuses_a_list_checkpoint_with_one_error_line(tmp_path, seg_setup, capsys):
    config, _ = seg_setup
    path = tmp_path / 'list.pth'
    torch.save([1, 2], path)
    with pytest.raises(SystemExit):
        cli.run_tool(lambda: cli.evaluate([str(config), str(path), '--work-dir', str(tmp_path / 'work')]))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and "list.pth' holds a list" in err[0], err


@pytest.mark.parametrize('case', ['list', 'no_meta', 'deep_dataset_meta'])
def test_resume_refuses_what_it_cannot_resume_with_one_error_line(tmp_path, pretraining_run, capsys, case):
    cfg, work = pretraining_run
    ckpt = safe_torch_load(work / 'epoch_1.pth')
    if case == 'list':
        ckpt, refusal = [ckpt], r"holds a list, not a dict: it cannot be resumed"
    elif case == 'no_meta':
        ckpt, refusal = {k: v for k, v in ckpt.items() if k != 'meta'}, r'has no meta dict: it cannot be resumed'
    else:
        deep = inner = {}
        for _ in range(150):  # torch.save itself recurses
            inner['a'] = inner = {}
        ckpt['meta']['dataset_meta'], refusal = deep, r'meta\.dataset_meta\.a\.a.*nested more than 64 levels'
    path = tmp_path / 'bad.pth'
    torch.save(ckpt, path)
    with pytest.raises(SystemExit):
        cli.run_tool(lambda: cli.pretrain([str(cfg), '--work-dir', str(tmp_path / 'work'), '--resume', str(path)]))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and 'bad.pth' in err[0], err
    assert re.search(refusal, err[0]), err[0]
# ------------------------------------------------------------------------------------------ detectron2's face
def _d2_model():
    """A tiny detectron2 backbone with a ConvMAE encoder (the yacs builder), and the detectron2 module."""
    d2 = pytest.importorskip('detectron2')  # built by `make install` (tools/install_detectron2.sh)
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone

    from convmae_backbone.detectron2 import add_convmae_config
    cfg = add_convmae_config(get_cfg())
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    cfg.MODEL.CONVMAE.merge_from_list(['IMG_SIZE', 32, 'EMBED_DIM', list(ENCODER['embed_dims']),
                                       'DEPTH', list(ENCODER['depths']), 'NUM_HEADS', ENCODER['num_heads'],
                                       'WINDOW_SIZE', 0])
    return build_backbone(cfg), d2


@pytest.mark.parametrize('payload', PAYLOADS)
@pytest.mark.parametrize('form', ['pth-meta', 'pth-weights', 'legacy', 'pkl-opcodes', 'pkl-4'])
def test_detection_checkpointer_refuses(tmp_path, payload, form):
    """``DetectionCheckpointer(model).load`` (behind ``train.init_checkpoint`` and ``resume_or_load``) reads
    ``.pth`` through safe_torch_load and ``.pkl`` through the numpy-weights unpickler: nothing runs."""
    model, _ = _d2_model()
    from detectron2.checkpoint import DetectionCheckpointer
    if form.startswith('pkl'):
        make, name = PAYLOADS[payload]
        marker, path = tmp_path / 'marker', tmp_path / 'model_final.pkl'
        if form == 'pkl-opcodes':
            path.write_bytes(opcode_pickle(marker))
            name = 'builtins.exec'
        else:
            path.write_bytes(pickle.dumps({'model': {'w': make(marker)}, '__author__': 'x'}, protocol=4))
    else:
        path, marker, name = write_hostile(tmp_path, payload, 'weights' if form == 'pth-weights' else 'meta',
                                           legacy=form == 'legacy')
    with pytest.raises(CheckpointError) as exc:
        DetectionCheckpointer(model).load(str(path))
    assert_refused(exc, path, name, marker)


@pytest.mark.parametrize('how', ['init_checkpoint', 'resume', 'eval-only'])
def test_d2_train_refuses(tmp_path, how):
    """tools/d2_train.py: ``train.init_checkpoint=`` (train and --eval-only) and ``--resume`` from a hostile
    last checkpoint end with one ``error:`` line naming the file, and nothing runs."""
    pytest.importorskip('detectron2')
    from convmae_backbone.testing import child_env, write_coco_dataset, write_tiny_detectron2_config
    data = write_coco_dataset(str(tmp_path / 'coco'), num_train=2, num_val=1, size=(64, 64))
    config = write_tiny_detectron2_config(str(tmp_path / 'tiny.py'), 'hostile_train', 'hostile_val')
    path, marker, name = write_hostile(tmp_path, 'torch_exec_with_source', 'meta')
    out = tmp_path / 'out'
    opts = [f'train.output_dir={out}']
    if how == 'resume':
        out.mkdir()
        (out / 'last_checkpoint').write_text(path.name)
        (out / path.name).write_bytes(path.read_bytes())
        path = out / path.name
    else:
        opts.append(f'train.init_checkpoint={path}')
    args = {'init_checkpoint': [], 'resume': ['--resume'], 'eval-only': ['--eval-only']}[how]
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / 'd2_train.py'), '--config-file', config, *args,
                           '--register-coco', 'hostile_train', f'{data}/annotations/instances_train.json',
                           f'{data}/train', '--register-coco', 'hostile_val',
                           f'{data}/annotations/instances_val.json', f'{data}/val', *opts],
                          capture_output=True, text=True, env=child_env(), timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and path.name in last and name in last, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr
    assert not marker.exists()


# =====================================================================================================================
# Hostile data (issue 28, data part): tar shards, image folders, images and download URLs made here. Each is shown
# live (what the unguarded way does), then skipped with a warning while the iteration goes on, or refused naming
# the file; nothing hangs, crashes or exceeds its stated memory bound.
# =====================================================================================================================
DATA_PIPELINE = [dict(type='DecodeRandomResizedCrop', size=32, scale=(0.2, 1.0)),
                 dict(type='RandomBlockMask', input_size=32, patch_size=16, mask_ratio=0.75),
                 dict(type='PackMAEInputs')]


@contextlib.contextmanager
def logged_warnings() -> Iterator[List[str]]:
    """The warnings logged through mmengine's current logger while in the context."""
    messages: List[str] = []

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Handler(logging.WARNING)
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def tar_member(name: str, data: bytes, claimed: Optional[int] = None, sparse: bool = False) -> bytes:
    """One tar member (GNU header, then ``data`` padded to 512-byte blocks) whose header states ``claimed`` bytes
    instead of ``len(data)``; ``sparse``: an old-GNU sparse header mapping ``data`` into a file of ``claimed``
    bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data) if claimed is None or sparse else claimed, 0o644
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    if sparse:
        header[156:157] = tarfile.GNUTYPE_SPARSE
        header[386:410] = tarfile.itn(0, 12, tarfile.GNU_FORMAT) + tarfile.itn(len(data), 12, tarfile.GNU_FORMAT)
        header[483:495] = tarfile.itn(claimed, 12, tarfile.GNU_FORMAT)
        header[148:155] = b'%06o\0' % tarfile.calc_chksums(bytes(header))[0]
    return bytes(header) + data + b'\0' * (-len(data) % tarfile.BLOCKSIZE)


def this_checkout_env() -> Dict[str, str]:
    """The environment of a subprocess that imports this checkout's package."""
    return {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}


def jpegs(tmp_path: Path, n: int) -> List[bytes]:
    return [p.read_bytes() for p in sorted((make_images(tmp_path / 'jpegs', n=n) / 'train').rglob('*.jpg'))]


def iterate(dataset, epochs: int = 2) -> List[torch.Tensor]:
    """The inputs of every sample of ``epochs`` epochs (SeededSampler, a DataLoader without workers)."""
    sampler = DATA_SAMPLERS.build(dict(type='SeededSampler', shuffle=True, seed=3), default_args=dict(dataset=dataset))
    inputs = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(dataset, sampler=list(sampler), batch_size=2, collate_fn=pseudo_collate)
        inputs += [x for batch in loader for x in batch['inputs']]
    return inputs


def test_sparse_and_oversize_tar_members_are_skipped_with_a_warning(tmp_path):
    """Members whose headers claim 10^13 bytes (a sparse one, and a plain one the shard ends inside): reading
    what they claim raises MemoryError; indexed as any member, each is skipped with a warning naming it when it is
    read, and every sample of two epochs comes back (another image in their place)."""
    good = jpegs(tmp_path, 3)
    shard = tmp_path / 'hostile.tar'
    shard.write_bytes(tar_member('0.jpg', good[0]) + tar_member('1.jpg', good[1][:100], 10 ** 13, sparse=True)
                      + tar_member('2.jpg', good[2]) + tar_member('3.jpg', good[0][:1000], 10 ** 13))
    with tarfile.open(shard) as tar:  # live: what a plain reader is told, and what reading it costs
        members = [tar.next() for _ in range(4)]
        assert members[1].issparse() and members[1].size == members[3].size == 10 ** 13
        with pytest.raises(tarfile.ReadError, match='unexpected end of data'):
            tar.next()
    with open(shard, 'rb') as f, pytest.raises(MemoryError):
        os.pread(f.fileno(), members[1].size, members[1].offset_data)
    with logged_warnings() as warned:
        dataset = DATASETS.build(dict(type='TarShardDataset', shards=str(shard), pipeline=DATA_PIPELINE))
        assert len(dataset) == 4
        inputs = iterate(dataset)
    assert len(inputs) == 8 and all(x.shape == (3, 32, 32) for x in inputs)
    assert any(f"shard {str(shard)!r} is damaged after 4 image member(s)" in m for m in warned), warned
    skipped = [m for m in warned if m.startswith('skipped unreadable image')]
    assert len(skipped) == 2, warned
    assert f'{shard}/1.jpg' in skipped[0] + skipped[1] and 'sparse tar member' in skipped[0] + skipped[1]
    assert f'{shard}/3.jpg' in skipped[0] + skipped[1] and 'run past the end of the shard' in skipped[0] + skipped[1]


def test_damaged_shards_are_skipped_or_refused_naming_the_shard(tmp_path, capsys):
    """Garbage is refused naming the shard (tarfile's own error names nothing); a truncated shard keeps the
    members before the cut with a warning; a pax header claiming 10^12 bytes (MemoryError in tarfile) costs no
    memory; a shard cut after it was indexed skips the member it cuts; ``tools/pretrain.py`` on garbage ends with
    one ``error:`` line naming the shard."""
    good = jpegs(tmp_path, 3)
    garbage = tmp_path / 'garbage.tar'
    garbage.write_bytes(np.random.default_rng(0).bytes(20000))
    with pytest.raises(tarfile.ReadError) as raw:  # live: names no file
        tarfile.open(garbage)
    assert 'garbage' not in str(raw.value)
    with pytest.raises(ShardError, match=re.escape(f'shard {str(garbage)!r} could not be read as a tar file')):
        DATASETS.build(dict(type='TarShardDataset', shards=str(garbage), pipeline=DATA_PIPELINE))

    whole = b''.join(tar_member(f'{i}.jpg', data) for i, data in enumerate(good)) + b'\0' * 1024
    cut = tmp_path / 'cut.tar'
    cut.write_bytes(whole[:len(tar_member('0.jpg', good[0])) + 700])  # inside the second member's data
    pax = tarfile.TarInfo('././@PaxHeader')
    pax.type, pax.size = tarfile.XHDTYPE, 10 ** 12
    bomb = tmp_path / 'pax_bomb.tar'
    bomb.write_bytes(tar_member('0.jpg', good[0]) + pax.tobuf(format=tarfile.GNU_FORMAT) + b'30 path=1.jpg\n'
                     + b'\0' * 1000)
    with pytest.raises(MemoryError), tarfile.open(bomb) as tar:  # live
        tar.getmembers()
    for shard, count in ((cut, 2), (bomb, 1)):
        with logged_warnings() as warned:
            dataset = DATASETS.build(dict(type='TarShardDataset', shards=str(shard), pipeline=DATA_PIPELINE))
            assert len(dataset) == count
            assert len(iterate(dataset, epochs=1)) == count
        assert any(f'shard {str(shard)!r} is damaged after {count} image member(s)' in m for m in warned), warned
    later = tmp_path / 'cut_later.tar'  # whole when indexed, cut inside its last member afterwards
    later.write_bytes(whole)
    with logged_warnings() as warned:
        dataset = DATASETS.build(dict(type='TarShardDataset', shards=str(later), pipeline=DATA_PIPELINE))
        later.write_bytes(whole[:len(whole) - 1024 - (-len(good[2]) % 512) - 100])  # its last 100 bytes cut
        assert len(iterate(dataset, epochs=1)) == 3
    assert [m for m in warned if f'{later}/2.jpg' in m
            and f'only {len(good[2]) - 100} of its {len(good[2])} bytes are in the shard' in m], warned

    extra = (f"train_dataloader['dataset'] = dict(_delete_=True, type='TarShardDataset', shards={str(garbage)!r}, "
             f"pipeline=train_pipeline)\n")
    config = write_tiny_config(tmp_path / 'shards.py', tmp_path, extra=extra)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.run_tool(lambda: cli.pretrain([str(config), '--work-dir', str(tmp_path / 'work')]))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1 and 'Traceback' not in err[0], err
    assert err[0].startswith(f'error: shard {str(garbage)!r} could not be read as a tar file')


def test_symlink_loops_in_an_image_folder_end_with_a_warning(tmp_path):
    """A folder holding a link to itself and a sub-folder linking back to it: walked without a visited set, the
    paths double at every level (cut off here after 2000 folders); listed in a subprocess (600 s limit), each
    folder once with a warning naming each loop, and a dataset on it iterates."""
    root = tmp_path / 'loop' / 'train'
    (root / 'a').mkdir(parents=True)
    Image.fromarray(np.full((40, 40, 3), 100, np.uint8)).save(root / 'a' / 'x.jpg')
    os.symlink(root, root / 'self')
    os.symlink('..', root / 'a' / 'up')
    walked = sum(1 for _ in itertools.islice(os.walk(root, followlinks=True), 2000))  # live: no end in sight
    assert walked == 2000
    proc = subprocess.run([sys.executable, '-c', 'import sys; from convmae_backbone.datasets import list_images; '
                           'print("listed", list_images(sys.argv[1]))', str(root)], capture_output=True, text=True,
                          timeout=600, env=this_checkout_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and f"listed [{str(root / 'a' / 'x.jpg')!r}]" in out, out[-3000:]
    for link in (root / 'self', root / 'a' / 'up'):
        assert f'skipped {str(link)!r}: it leads to {os.path.realpath(root)!r}, a folder already walked' in out, \
            out[-3000:]
    with logged_warnings() as warned:
        dataset = DATASETS.build(dict(type='ImageFolderDataset', data_root=str(root.parent), pipeline=DATA_PIPELINE))
        assert len(dataset) == 1 and len(iterate(dataset, epochs=1)) == 1
    assert sum('a folder already walked' in m for m in warned) == 2, warned


#: Bound on the memory of decoding an image to 8-bit RGB, in units of the 8-bit RGB array (H x W x 3 bytes):
#: PIL's decoded source, the conversion and the array (the figures measured are in the README).
DECODE_MEMORY_BOUND = 5.0

_DECODE_MEMORY = '''
import sys
import numpy as np
from PIL import Image
sys.path.insert(0, sys.argv[3])
from benchmark import cpu_live_step_mb  # the peak RSS of one call over the RSS before it, freed memory returned
from convmae_backbone.datasets.decode import EncodedImage

def old_way():  # the float64 conversion of before
    with Image.open(sys.argv[1]) as img:
        gray = np.clip(np.rint(np.asarray(img, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        np.array(Image.fromarray(gray).convert('RGB'))

data = open(sys.argv[1], 'rb').read()
EncodedImage(open(sys.argv[2], 'rb').read()).decode()  # warm-up: the PNG plugin, numpy's paths
rgb = EncodedImage(data).decode()
ours, old = cpu_live_step_mb(lambda: EncodedImage(data).decode()), cpu_live_step_mb(old_way)
print(rgb.shape, rgb.dtype, ours / (rgb.nbytes / 2 ** 20), old / (rgb.nbytes / 2 ** 20))
'''


def test_sixteen_bit_png_decodes_within_a_small_multiple_of_the_8bit_image(tmp_path):
    """A 2500 x 2500 16-bit PNG of ~100 KB: the memory decoding it to 8-bit RGB needs (peak RSS over the RSS
    before, ``tools/benchmark.py``'s ``cpu_live_step_mb``, in a fresh process) stays within DECODE_MEMORY_BOUND
    times the RGB array; the float64 conversion it replaces exceeds it."""
    side = np.arange(2500, dtype=np.uint32)
    Image.fromarray(((side[None, :] * 7 + side[:, None] * 13) % 65536).astype(np.uint16)).save(tmp_path / 'big16.png')
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp_path / 'small16.png')
    assert (tmp_path / 'big16.png').stat().st_size < 200_000
    proc = subprocess.run([sys.executable, '-c', _DECODE_MEMORY, str(tmp_path / 'big16.png'),
                           str(tmp_path / 'small16.png'), str(ROOT / 'tools')], capture_output=True, text=True,
                          timeout=120, env=this_checkout_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    shape, dtype, ours, old = proc.stdout.strip().splitlines()[-1].rsplit(' ', 3)
    assert shape + dtype == '(2500, 2500, 3)uint8'
    assert float(ours) <= DECODE_MEMORY_BOUND < float(old), proc.stdout


def test_a_checkpoint_url_ending_in_dotdot_writes_nothing_outside_the_cache(tmp_path, monkeypatch):
    """torch's download to ``<cache>/..`` leaves its ``.partial`` file in the folder above (live); our download
    refuses a URL that ends in no file name, before any request."""
    served = tmp_path / 'served'
    (served / 'x').mkdir(parents=True)
    torch.save({'state_dict': tiny_encoder_state()}, served / 'x' / 'w.pth')
    hub = tmp_path / 'torch_home' / 'hub'
    monkeypatch.setenv('TORCH_HOME', str(hub.parent))
    with serve_folder(served) as url:
        (hub / 'checkpoints').mkdir(parents=True)
        torch.hub.download_url_to_file(f'{url}/x/w.pth', str(hub / 'checkpoints' / '..'), progress=False)
        assert [p.name.endswith('.partial') for p in hub.iterdir() if p.is_file()] == [True]  # live
        shutil.rmtree(hub)
        for tail in ('x/..', 'x/.', 'x/'):
            with pytest.raises(CheckpointError, match=re.escape(f"checkpoint URL '{url}/{tail}' does not end in a "
                                                                f"file name")):
                load_checkpoint(f'{url}/{tail}')
        assert not hub.exists()
        assert set(load_checkpoint(f'{url}/x/w.pth')['state_dict']) == set(tiny_encoder_state())
    assert [p.relative_to(hub).as_posix() for p in hub.rglob('*') if p.is_file()] == ['checkpoints/w.pth']
