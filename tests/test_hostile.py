"""Hostile checkpoints through every path that reads a file: nothing in them runs.

The corpus is written at test time: pickles whose unpickling calls a function that reaches ``exec``/``eval`` or a
shell (callables under ``torch.*`` and ``numpy.*``, ``builtins``, ``os``, ``subprocess``), nested in ``meta``, the
optimizer state or the weights, as zip and legacy torch files, hand-written pickle opcodes and ``.pkl`` converter
input, and config text in ``meta``. Each payload only creates a marker file. ``test_the_corpus_is_live`` proves
every payload does create it when unpickled the unsafe way; every other test feeds the corpus to one loading path
and asserts a ``CheckpointError`` naming the file and the global, no advice to load unsafely, and no marker.
"""
import os
import pickle
import shlex
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Tuple

import numpy as np
import numpy.f2py.crackfortran as crackfortran
import numpy.testing._private.utils as numpy_testing_utils
import pytest
import torch
import torch.fx.graph_module
from helpers import ROOT, TINY_ARCH, load_tool, make_images, write_tiny_config
from mmengine.config import Config
from mmengine.logging import HistoryBuffer

from convmae_backbone import ConvMAE, ConvMAEPretrainer
from convmae_backbone.apis import cli, visualization
from convmae_backbone.apis.convert import convert
from convmae_backbone.apis.export import export_backbone
from convmae_backbone.checkpoint import CheckpointError, safe_torch_load
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
