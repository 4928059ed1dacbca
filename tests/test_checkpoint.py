"""Loading weights through init_cfg from every supported checkpoint format, and the errors for bad files."""
import argparse
import logging

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MMLogger

from convmae_backbone import CheckpointError, ConvMAE, ConvMAEPretrainer, safe_torch_load
from conftest import max_rel_err


@pytest.fixture
def sd(official):
    return official['state_dict']


def _load(path, small_arch, **kw):
    model = ConvMAE(**small_arch, init_cfg=dict(type='Pretrained', checkpoint=str(path)), **kw)
    model.init_weights()
    return model


def _assert_loaded(model, sd):
    for key in ('patch_embed1.proj.weight', 'blocks2.0.attn.weight', 'blocks3.1.mlp.fc2.bias', 'pos_embed'):
        assert torch.equal(model.state_dict()[key], sd[key]), key


def _messages(caplog_records):
    return '\n'.join(r.getMessage() for r in caplog_records)


@pytest.fixture
def log_records():
    logger = MMLogger.get_current_instance()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_official_pretraining_checkpoint(tmp_path, sd, small_arch, log_records):
    path = tmp_path / 'convmae_pretrain.pth'
    torch.save({'model': sd, 'epoch': 1599, 'args': argparse.Namespace(lr=1.5e-4, model='convmae_base')}, path)
    model = _load(path, small_arch)
    _assert_loaded(model, sd)
    text = _messages(log_records)
    assert 'ignored' in text and 'pretraining-only' in text
    assert 'decoder_pred.weight' not in text  # one summary line, not a key dump


def test_official_finetuned_checkpoint(tmp_path, sd, small_arch, log_records):
    encoder = {k: v for k, v in sd.items() if not k.startswith(('decoder', 'mask_token', 'norm.', 'stage'))}
    finetuned = {**encoder, 'fc_norm.weight': torch.ones(96), 'head.weight': torch.zeros(10, 96)}
    path = tmp_path / 'convmae_finetuned.pth'
    torch.save({'model': finetuned}, path)
    _assert_loaded(_load(path, small_arch), sd)
    assert 'head.weight' in _messages(log_records)  # unexpected keys are reported


def test_mmengine_checkpoint_of_the_pretrainer(tmp_path, sd, small_arch, small_decoder):
    pre = ConvMAEPretrainer(**small_arch, **small_decoder)
    pre.load_state_dict(sd)
    buf = HistoryBuffer()
    buf.update(1.5)
    ckpt = {'meta': {'epoch': 3, 'iter': 30, 'seed': np.int64(0)}, 'state_dict': pre.state_dict(),
            'message_hub': {'log_scalars': {'train/loss': buf}, 'runtime_info': {'arr': np.arange(3)}}}
    path = tmp_path / 'epoch_3.pth'
    torch.save(ckpt, path)
    _assert_loaded(_load(path, small_arch), sd)


def test_exported_backbone_weights(tmp_path, sd, small_arch):
    src = ConvMAE(**small_arch)
    src.load_state_dict(sd, strict=False)
    path = tmp_path / 'backbone.pth'
    torch.save(src.state_dict(), path)
    _assert_loaded(_load(path, small_arch), sd)


@pytest.mark.parametrize('wrap', ['mmdet', 'ddp'])
def test_detector_and_segmentor_checkpoints(tmp_path, sd, small_arch, wrap):
    prefix = 'backbone.' if wrap == 'mmdet' else 'module.backbone.'
    state = {prefix + k: v for k, v in sd.items()}
    state.update({'neck.lateral_convs.0.conv.weight': torch.zeros(8, 32, 1, 1),
                  'decode_head.conv_seg.weight': torch.zeros(2, 8, 1, 1)})
    path = tmp_path / 'detector.pth'
    torch.save({'meta': {}, 'state_dict': state}, path)
    _assert_loaded(_load(path, small_arch), sd)


def test_pos_embed_resized_when_grid_differs(tmp_path, sd, small_arch):
    path = tmp_path / 'official.pth'
    torch.save({'model': sd}, path)
    model = _load(path, small_arch, img_size=320)
    assert model.pos_embed.shape == (1, 400, 96)
    grid = sd['pos_embed'].reshape(1, 14, 14, 96).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(20, 20), mode='bicubic', align_corners=False)
    assert max_rel_err(model.pos_embed, expected.permute(0, 2, 3, 1).reshape(1, 400, 96)) < 1e-6


def test_shape_mismatch_names_key_and_shapes(tmp_path, sd, small_arch):
    path = tmp_path / 'official.pth'
    torch.save({'model': sd}, path)
    arch = dict(small_arch, embed_dims=(32, 64, 96))
    with pytest.raises(CheckpointError, match=r'patch_embed2\.proj\.weight.*\(48, 32, 2, 2\).*\(64, 32, 2, 2\)'):
        _load(path, arch)


def test_checkpoint_without_convmae_keys(tmp_path, small_arch):
    path = tmp_path / 'resnet.pth'
    torch.save({'state_dict': {'conv1.weight': torch.zeros(64, 3, 7, 7), 'fc.bias': torch.zeros(10)}}, path)
    with pytest.raises(CheckpointError, match='no ConvMAE weights'):
        _load(path, small_arch)


def test_missing_and_truncated_files(tmp_path, sd, small_arch):
    with pytest.raises(CheckpointError, match='does not exist'):
        _load(tmp_path / 'nope.pth', small_arch)
    good = tmp_path / 'good.pth'
    torch.save({'model': sd}, good)
    bad = tmp_path / 'truncated.pth'
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match='truncated.pth'):
        _load(bad, small_arch)
    junk = tmp_path / 'notes.pth'
    junk.write_text('not a checkpoint')
    with pytest.raises(CheckpointError, match='notes.pth'):
        _load(junk, small_arch)


class _Evil:
    def __reduce__(self):
        return (print, ('pwned',))


def test_objects_outside_the_allow_list_are_refused(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'model': {}, 'payload': _Evil()}, path)
    with pytest.raises(CheckpointError, match=r'evil\.pth.* names builtins\.print: refused'):
        safe_torch_load(path)


def test_mmengine_runner_loader_reads_its_checkpoints(tmp_path):
    """mmengine's own loader (used by --resume / load_from) goes through the safe loader."""
    from mmengine.runner.checkpoint import _load_checkpoint
    buf = HistoryBuffer()
    buf.update(2.0)
    path = tmp_path / 'iter_1.pth'
    torch.save({'state_dict': {'w': torch.ones(2)}, 'message_hub': {'log_scalars': {'loss': buf}},
                'meta': {'seed': np.int64(3)}}, path)
    ckpt = _load_checkpoint(str(path), map_location='cpu')
    assert ckpt['message_hub']['log_scalars']['loss'].current() == 2.0
    assert ckpt['meta']['seed'] == 3


# ------------------------------------------------------------------------------- init_cfg the mmengine way
def test_init_cfg_list_form_and_other_entries(tmp_path, sd, small_arch):
    path = tmp_path / 'official.pth'
    torch.save({'model': sd}, path)
    model = ConvMAE(**small_arch, init_cfg=[dict(type='Pretrained', checkpoint=str(path))])
    model.init_weights()
    _assert_loaded(model, sd)
    # mmengine's other initialisers apply; a Pretrained entry in the same list loads last
    model = ConvMAE(**small_arch, init_cfg=[dict(type='Constant', layer='Linear', val=0.5, bias=0.0)])
    model.init_weights()
    assert (model.blocks3[0].mlp.fc1.weight == 0.5).all() and (model.blocks3[0].mlp.fc1.bias == 0).all()
    model = ConvMAE(**small_arch, init_cfg=[dict(type='Pretrained', checkpoint=str(path)),
                                            dict(type='Constant', layer='Linear', val=0.5)])
    model.init_weights()
    _assert_loaded(model, sd)
    with pytest.raises(ValueError, match=r"unknown: \['checkpiont'\]"):
        ConvMAE(**small_arch, init_cfg=dict(type='Pretrained', checkpiont=str(path)))
    with pytest.raises(ValueError, match=r'min_loaded is a fraction'):
        ConvMAE(**small_arch, init_cfg=[dict(type='Pretrained', checkpoint=str(path), min_loaded=50)])


def test_init_cfg_prefix_selects_and_strips_keys(tmp_path, sd, small_arch):
    """mmengine's PretrainedInit ``prefix``: the keys under it, stripped; here an EMA teacher that no format
    detection would find."""
    state = {**{f'teacher.{k}': v for k, v in sd.items()},
             **{f'student.{k}': torch.zeros_like(v) for k, v in sd.items()}}
    path = tmp_path / 'distilled.pth'
    torch.save({'state_dict': state}, path)
    for prefix in ('teacher', 'teacher.'):
        model = ConvMAE(**small_arch, init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix=prefix))
        model.init_weights()
        _assert_loaded(model, sd)
    model = ConvMAE(**small_arch, init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='student'))
    model.init_weights()
    assert (model.pos_embed == 0).all()
    with pytest.raises(CheckpointError, match=r"distilled\.pth: no weight key starts with prefix 'backbone\.'"):
        ConvMAE(**small_arch, init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='backbone')).init_weights()


def test_init_cfg_over_http_and_open_mmlab(tmp_path, sd, small_arch, monkeypatch):
    """URLs go through mmengine's CheckpointLoader (into torch hub's cache), read by our safe loader."""
    from helpers import serve_folder
    from test_hostile import write_hostile
    served = tmp_path / 'served'
    served.mkdir()
    torch.save({'model': sd}, served / 'convmae_small.pth')
    hostile, marker, name = write_hostile(served, 'torch_exec_with_source', 'weights')
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.setenv('MMENGINE_HOME', str(tmp_path / 'mmengine_home'))
    with serve_folder(served) as url:
        model = ConvMAE(**small_arch, init_cfg=dict(type='Pretrained', checkpoint=f'{url}/convmae_small.pth'))
        model.init_weights()
        _assert_loaded(model, sd)
        assert (tmp_path / 'torch_home' / 'hub' / 'checkpoints' / 'convmae_small.pth').is_file()
        with pytest.raises(CheckpointError, match=rf"{url}/{hostile.name}.* names {name}: refused") as exc:
            ConvMAE(**small_arch, init_cfg=dict(type='Pretrained', checkpoint=f'{url}/{hostile.name}')).init_weights()
        assert 'weights_only' not in str(exc.value) and not marker.exists()
        # open-mmlab:// names resolved through mmengine's tables (user entries in MMENGINE_HOME/open_mmlab.json)
        (tmp_path / 'mmengine_home').mkdir()
        (tmp_path / 'mmengine_home' / 'open_mmlab.json').write_text(
            f'{{"convmae_small": "{url}/convmae_small.pth", "hostile": "{url}/{hostile.name}"}}')
        model = ConvMAE(**small_arch, init_cfg=dict(type='Pretrained', checkpoint='open-mmlab://convmae_small'))
        model.init_weights()
        _assert_loaded(model, sd)
        with pytest.raises(CheckpointError, match=f'names {name}: refused'):
            ConvMAE(**small_arch, init_cfg=dict(type='Pretrained', checkpoint='open-mmlab://hostile')).init_weights()
        with pytest.raises(CheckpointError, match=r'could not be downloaded: HTTPError'):
            ConvMAE(**small_arch, init_cfg=dict(type='Pretrained', checkpoint=f'{url}/missing.pth')).init_weights()
    assert not marker.exists()


def test_every_mmengine_scheme_is_read_by_the_safe_loader(tmp_path, sd, monkeypatch):
    """After the downstream libraries are imported too, each CheckpointLoader prefix maps to our loaders; the
    s3/petrel and pavi ones (services not reachable here) read what the service returns with safe_torch_load."""
    import importlib
    import sys
    import types

    from mmengine.runner.checkpoint import CheckpointLoader

    from convmae_backbone import checkpoint
    for scope in ('mmdet', 'mmseg', 'mmpretrain'):
        importlib.import_module(f'{scope}.models')
    assert {p for ps in checkpoint.SAFE_LOADERS for p in ps} <= set(CheckpointLoader._schemes)
    assert all(loader.__module__ == checkpoint.__name__ for loader in CheckpointLoader._schemes.values())

    good = tmp_path / 'good.pth'
    torch.save({'model': sd}, good)
    from test_hostile import write_hostile
    hostile, marker, name = write_hostile(tmp_path, 'builtins_eval', 'meta')

    class Backend:
        def get(self, filename):
            return (hostile if 'hostile' in filename else good).read_bytes()

    monkeypatch.setattr(checkpoint, 'get_file_backend', lambda *args, **kwargs: Backend())
    assert torch.equal(checkpoint.load_checkpoint('s3://bucket/good.pth')['model']['pos_embed'], sd['pos_embed'])
    with pytest.raises(CheckpointError, match=rf"'s3://bucket/hostile\.pth' names {name}: refused"):
        checkpoint.load_checkpoint('s3://bucket/hostile.pth')

    class Model:
        def __init__(self, path):
            self.path, self.name = path, path.name

        def download(self, dst):
            with open(dst, 'wb') as f:
                f.write(self.path.read_bytes())

    pavi = types.ModuleType('pavi')
    pavi.modelcloud = types.SimpleNamespace(get=lambda p: Model(hostile if 'hostile' in p else good))
    monkeypatch.setitem(sys.modules, 'pavi', pavi)
    assert torch.equal(checkpoint.load_checkpoint('pavi://good')['model']['pos_embed'], sd['pos_embed'])
    with pytest.raises(CheckpointError, match=f"'pavi://hostile' names {name}: refused"):
        checkpoint.load_checkpoint('pavi://hostile')
    assert not marker.exists()


def test_foreign_checkpoint_is_refused_with_what_matched(tmp_path, sd, small_arch, log_records):
    """A checkpoint of another model that shares a few key names fills less than half of the encoder."""
    state = {'pos_embed': sd['pos_embed'], 'patch_embed1.proj.weight': sd['patch_embed1.proj.weight'],
             'layer1.0.conv1.weight': torch.zeros(64, 64, 3, 3), 'fc.weight': torch.zeros(10, 96)}
    path = tmp_path / 'other_model.pth'
    torch.save({'state_dict': state}, path)
    with pytest.raises(CheckpointError, match=r"other_model\.pth' fills only 2 of the 67 tensors of the encoder "
                                              r"\(fewer than 50%\); loaded per module: pos_embed 1/1, "
                                              r"patch_embed1 1/4, patch_embed2 0/4, .* blocks1 0/14, blocks2 0/14, "
                                              r"blocks3 0/24\. .*"
                                              r"set min_loaded=0\.0"):
        _load(path, small_arch)
    init_cfg = dict(type='Pretrained', checkpoint=str(path), min_loaded=0.0)
    model = ConvMAE(**small_arch, init_cfg=init_cfg)
    model.init_weights()
    assert torch.equal(model.pos_embed, sd['pos_embed'])
    assert 'missing keys (left at their initialisation)' in _messages(log_records)
    half = {k: v for i, (k, v) in enumerate(ConvMAE(**small_arch).state_dict().items()) if i % 2 == 0}
    torch.save(half, path)
    _load(path, small_arch)  # at least half: loads


def test_arch_auto_reads_the_checkpoint_once(tmp_path, sd, small_arch, monkeypatch):
    from convmae_backbone import checkpoint
    path = tmp_path / 'official.pth'
    torch.save({'model': sd}, path)
    reads = []
    real = checkpoint.safe_torch_load
    monkeypatch.setattr(checkpoint, 'safe_torch_load', lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    model = ConvMAE(arch='auto', num_heads=small_arch['num_heads'],
                    init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    _assert_loaded(model, sd)
    assert reads == [str(path)]
    model.init_weights()  # a second initialisation reads it again (nothing is kept)
    assert reads == [str(path)] * 2


@pytest.mark.parametrize('how', ['load_state_dict', 'mmengine'])
def test_every_load_resizes_pos_embed_and_tables(sd, small_arch, how):
    """The resizing is a load_state_dict pre-hook: a plain load_state_dict and mmengine's load_from resize too."""
    from mmengine.runner.checkpoint import load_state_dict

    from convmae_backbone.models.attention import resize_relative_position_table
    detector = torch.nn.Module()
    detector.backbone = ConvMAE(**small_arch, img_size=320, rel_pos_bias='per_block')
    table = torch.randn(27 * 27, small_arch['num_heads'])  # a 14x14 grid's table
    state = {f'backbone.{k}': v for k, v in sd.items()}
    state['backbone.blocks3.0.attn.relative_position_bias_table'] = table
    state['backbone.blocks3.0.attn.relative_position_index'] = torch.zeros(196, 196, dtype=torch.long)  # dropped
    if how == 'load_state_dict':
        detector.load_state_dict(state, strict=False)
    else:
        load_state_dict(detector, state, strict=False)
    grid = sd['pos_embed'].reshape(1, 14, 14, 96).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(20, 20), mode='bicubic', align_corners=False)
    assert max_rel_err(detector.backbone.pos_embed, expected.permute(0, 2, 3, 1).reshape(1, 400, 96)) < 1e-6
    expected = torch.nn.functional.interpolate(table.double().t().reshape(1, -1, 27, 27), size=(39, 39), mode='bicubic',
                                               align_corners=False).reshape(-1, 39 * 39).t()
    loaded = detector.backbone.blocks3[0].attn.relative_position_bias_table
    assert max_rel_err(loaded, expected) < 1e-5  # float32 bicubic against float64
    assert torch.equal(loaded, resize_relative_position_table(table, (14, 14), (20, 20)))


def test_readme_states_the_allow_list_and_the_schemes():
    """README's "Loading checkpoints" names exactly TRUSTED_GLOBALS and the schemes the safe loader reads."""
    import re
    from pathlib import Path

    from convmae_backbone.checkpoint import SAFE_LOADERS, TRUSTED_GLOBALS
    readme = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
    section = readme[readme.index('### Loading checkpoints'):readme.index('## Pretraining')]
    table = section[section.index('| name | written by |'):section.index('Anything else')]
    assert set(re.findall(r'`((?:numpy|argparse|mmengine|builtins)[\w.]*)`', table)) == set(TRUSTED_GLOBALS)
    schemes = set(re.findall(r'`([\w-]+://)`', section))
    ours = {p for ps in SAFE_LOADERS for p in ps}
    assert schemes == {p.replace(r'(\S+\:)?', '') for p in ours if p}
