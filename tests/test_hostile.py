"""Hostile checkpoints through every path that reads a file: nothing in them runs.

The corpus is written at test time: pickles whose unpickling calls a function that reaches ``exec``/``eval`` or a
shell (callables under ``torch.*`` and ``numpy.*``, ``builtins``, ``os``, ``subprocess``), nested in ``meta``, the
optimizer state or the weights, as zip and legacy torch files, hand-written pickle opcodes and ``.pkl`` converter
input, and config text in ``meta``. Each payload only creates a marker file. ``test_the_corpus_is_live`` proves
every payload does create it when unpickled the unsafe way; every other test feeds the corpus to one loading path
and asserts a ``CheckpointError`` naming the file and the global, no advice to load unsafely, and no marker.
"""
import contextlib
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
from convmae_backbone.checkpoint import CheckpointError, load_checkpoint, safe_torch_load
from convmae_backbone.datasets.shards import ShardError
from convmae_backbone.engine.hooks import NonFiniteLossHook

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
    paths double at every level (cut off here after 2000 folders); listed in a subprocess (60 s limit), each
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
                          timeout=60, env=this_checkout_env())
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
