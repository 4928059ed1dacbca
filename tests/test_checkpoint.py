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
