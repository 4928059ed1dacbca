"""ConvMAE-v2 checkpoint layouts (Alpha-VL/ConvMAE#19, #32) in every downstream model with ``arch='auto'``.

The released v2 files were not opened here (Google Drive downloads); these layouts are synthetic, written from
what the issue threads state: the encoder's keys plus a ``cls_token`` (1, 1, C3), a ``pos_embed`` whose row 0
belongs to the class token (the layout ViTDet reads with ``pretrain_use_cls_token``), no ``mask_token`` and no
stage-1/2 fusion layers, per-stage MLP ratios and other patch sizes. Small dims, not the real sizes.
"""
import copy
import logging

import pytest
import timm
import torch
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.registry import DefaultScope
from torch import nn

import convmae_backbone  # noqa: F401
from convmae_backbone import ConvMAE, ConvViT, testing
from convmae_backbone.models import convvit
from convmae_backbone.models.arch import infer_arch
from convmae_backbone.models.utils import pos_embed_layout, resize_pos_embed
from convmae_backbone.resources import config_path
from helpers import sync_bn_to_bn

#: Two synthetic v2 sizes (patch sizes 4/2/2: the strides the FPN detector's anchors assume) and a third whose
#: patch sizes differ (stage-1/2 strides 2 and 4); per-stage MLP ratios, one giving 15 hidden channels over 11,
#: which ``int(11 * (15 / 11))`` in floats would make 14.
V2_SIZES = {
    'small': dict(img_size=64, patch_sizes=(4, 2, 2), embed_dims=(16, 32, 64), depths=(1, 1, 2), num_heads=2,
                  mlp_ratios=(4, 4, 4)),
    'large': dict(img_size=48, patch_sizes=(4, 2, 2), embed_dims=(11, 24, 96), depths=(2, 1, 3), num_heads=3,
                  mlp_ratios=(1.4, 8, 3)),
    'other_patches': dict(img_size=64, patch_sizes=(2, 2, 4), embed_dims=(8, 16, 64), depths=(1, 2, 2),
                          num_heads=2, mlp_ratios=(8, 8, 2.5)),
}
#: Encoder tensors that no pretraining checkpoint holds, v1 or v2, and the modules outside the encoder: left at
#: their initialisation, by name (relative position tables, layer scale, the seg H/32 branch, fc_norm, heads).
NOT_PRETRAINED = ('rel_pos_h', 'rel_pos_w', 'relative_position_bias_table', 'gamma_1', 'gamma_2')
OUTSIDE_ENCODER = ('windowed_rel_pos_bias', 'global_rel_pos_bias', 'fpn', 'fc_norm', 'head')


def v2_state(arch: dict, seed: int = 0) -> dict:
    """A synthetic ConvMAE-v2 checkpoint's weights for ``arch``: every encoder tensor random, ``cls_token`` and
    a class-token row before the ``pos_embed`` grid."""
    torch.manual_seed(seed)
    state = {k: torch.randn_like(v) for k, v in ConvViT(**arch).state_dict().items()}
    dim = arch['embed_dims'][2]
    state['pos_embed'] = torch.cat([torch.randn(1, 1, dim), state['pos_embed']], dim=1)
    state['cls_token'] = torch.randn(1, 1, dim)
    assert not any(k.startswith(('mask_token', 'stage1_output', 'stage2_output', 'decoder', 'norm.'))
                   for k in state)
    return state


@pytest.fixture(scope='module')
def v2_files(tmp_path_factory):
    """{size: (path of an official-format {'model': ...} file, its weights)}."""
    root = tmp_path_factory.mktemp('v2')
    files = {}
    for i, (name, arch) in enumerate(V2_SIZES.items()):
        state = v2_state(arch, seed=i)
        path = str(root / f'convmae_v2_{name}.pth')
        torch.save({'model': state}, path)
        files[name] = (path, state)
    return files


@pytest.fixture
def loads(monkeypatch):
    """The missing keys every encoder's init_weights loads with, and the warnings logged meanwhile."""
    record = dict(missing=[], warnings=[], messages=[])
    original = convvit.load_pretrained

    def spy(*args, **kwargs):
        missing = original(*args, **kwargs)
        record['missing'].append(missing)
        return missing

    monkeypatch.setattr(convvit, 'load_pretrained', spy)
    handler = logging.Handler()

    def emit(log: logging.LogRecord) -> None:
        record['warnings' if log.levelno >= logging.WARNING else 'messages'].append(log.getMessage())

    handler.emit = emit
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    yield record
    logger.removeHandler(handler)


def _explained(key: str) -> bool:
    return key.split('.', 1)[0] in OUTSIDE_ENCODER or key.rsplit('.', 1)[-1] in NOT_PRETRAINED


def _check_loaded(encoder: ConvMAE, state: dict, arch: dict, loads: dict) -> None:
    """The encoder has the checkpoint's architecture and tensors, its class-token row dropped; nothing missing
    but what no pretraining checkpoint holds; no unexpected key."""
    assert (encoder.patch_sizes, encoder.embed_dims, encoder.depths) == (
        arch['patch_sizes'], arch['embed_dims'], arch['depths'])
    hidden = [int(d * r) for d, r in zip(arch['embed_dims'], arch['mlp_ratios'])]
    assert [encoder.blocks1[0].mlp.fc1.out_channels, encoder.blocks2[0].mlp.fc1.out_channels,
            encoder.blocks3[0].mlp.fc1.out_features] == hidden
    own = encoder.state_dict()
    for key in ('patch_embed1.proj.weight', 'blocks1.0.attn.weight', 'blocks2.0.mlp.fc1.weight',
                f'blocks3.{arch["depths"][2] - 1}.mlp.fc2.bias', 'patch_embed4.weight'):
        assert torch.equal(own[key], state[key]), key
    if encoder.pos_grid == (arch['img_size'] // 16,) * 2:
        assert torch.equal(own['pos_embed'], state['pos_embed'][:, 1:])  # row 0 was the class token's
    assert 'cls_token' not in own
    assert len(loads['missing']) == 1
    unexplained = [k for k in loads['missing'][0] if not _explained(k)]
    assert unexplained == [], unexplained
    assert not [w for w in loads['warnings'] if 'unexpected keys' in w], loads['warnings']
    assert 'ignored cls_token (ConvMAE-v2): the model uses the patch tokens only' in loads['messages']
    assert 'dropped the class-token row of pos_embed (ConvMAE-v2 layout)' in loads['messages']


# ------------------------------------------------------------------------------------------- reading
@pytest.mark.parametrize('size', list(V2_SIZES))
def test_infer_arch_reads_v2_layouts(size):
    arch = V2_SIZES[size]
    inferred = infer_arch(v2_state(arch), num_heads=arch['num_heads'])
    assert {k: inferred[k] for k in arch if k != 'mlp_ratios'} == {k: v for k, v in arch.items()
                                                                  if k != 'mlp_ratios'}
    assert [int(d * r) for d, r in zip(inferred['embed_dims'], inferred['mlp_ratios'])] == [
        int(d * r) for d, r in zip(arch['embed_dims'], arch['mlp_ratios'])]


def test_pos_embed_layout():
    assert pos_embed_layout(196) == (14, 0) and pos_embed_layout(197) == (14, 1) and pos_embed_layout(1) == (1, 0)
    with pytest.raises(ValueError, match='pos_embed has 198 tokens, not a square grid'):
        pos_embed_layout(198)


def test_class_token_row_dropped_then_resized(v2_files, loads):
    """A v2 file into a backbone of another grid: the class-token row dropped, the 4x4 grid resized to 6x6."""
    path, state = v2_files['small']
    model = ConvMAE(arch='auto', img_size=96, num_heads=2, init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    assert model.pos_embed.shape == (1, 36, 64)
    assert torch.allclose(model.pos_embed, resize_pos_embed(state['pos_embed'][:, 1:], (4, 4), (6, 6)))
    assert loads['missing'] == [[]]
    assert 'resized pos_embed from grid (4, 4) to (6, 6)' in loads['messages']


# ---------------------------------------------------------------------------------- downstream models
def _backbone(arch: dict) -> dict:
    """Backbone keywords of a downstream config for a v2 file: ``arch='auto'`` with the fields the config's
    necks and heads need spelt out (checked against the file); patch sizes and MLP ratios read from it."""
    return dict(arch='auto', img_size=arch['img_size'], embed_dims=arch['embed_dims'], depths=arch['depths'],
                num_heads=arch['num_heads'])


def _build(scope: str, model_cfg):
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    with DefaultScope.overwrite_default_scope(scope):
        model = registry.build(sync_bn_to_bn(copy.deepcopy(model_cfg)))
    model.init_weights()
    return model.eval()


def _tiny_downstream(scope: str, tiny_config, size: str, v2_files, tmp_path, loads) -> nn.Module:
    """The model of ``tiny_config`` (:mod:`convmae_backbone.testing`) built with the v2 file of ``size``, its
    backbone checked (:func:`_check_loaded`)."""
    path, state = v2_files[size]
    model = _build(scope, tiny_config(str(tmp_path), str(tmp_path), _backbone(V2_SIZES[size]), checkpoint=path).model)
    _check_loaded(model.backbone, state, V2_SIZES[size], loads)
    return model


@pytest.mark.parametrize('size', ['small', 'large'])
def test_fpn_detector(size, v2_files, tmp_path, loads):
    model = _tiny_downstream('mmdet', testing.tiny_det_config, size, v2_files, tmp_path, loads)
    with torch.no_grad():
        maps = model.backbone(torch.randn(1, 3, 64, 64))
    assert [m.shape[2] for m in maps] == [16, 8, 4, 2] and model.backbone.out_strides == (4, 8, 16, 32)
    assert [m.shape[1] for m in model.neck(maps)] == [testing.TINY_DET_CHANNELS] * 5


@pytest.mark.parametrize('size', list(V2_SIZES))
def test_vitdet_style_detector(size, v2_files, tmp_path, loads):
    """The ViTDet-style detector keeps the pretraining grid (pos_embed_grid) and reads the v2 table without its
    class-token row, as the official ViTDet backbone with pretrain_use_cls_token=True does."""
    arch = V2_SIZES[size]
    model = _tiny_downstream('mmdet', testing.tiny_vitdet_config, size, v2_files, tmp_path, loads)
    assert model.backbone.pos_grid == (arch['img_size'] // 16,) * 2
    with torch.no_grad():
        (h16,) = model.backbone(torch.randn(1, 3, 96, 96))
    assert h16.shape == (1, arch['embed_dims'][2], 6, 6)
    assert len(model.neck((h16,))) == 5


@pytest.mark.parametrize('size', list(V2_SIZES))
def test_segmentor(size, v2_files, tmp_path, loads):
    model = _tiny_downstream('mmseg', testing.tiny_seg_config, size, v2_files, tmp_path, loads)
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 64, 64), mode='tensor')
    assert logits.shape[:2] == (1, len(testing.SEG_CLASSES))


@pytest.mark.parametrize('size', list(V2_SIZES))
def test_classifier(size, v2_files, loads):
    path, state = v2_files[size]
    arch = V2_SIZES[size]
    cfg = Config.fromfile(config_path('mmpretrain/convmae-b_8xb128-100e_in1k.py'))
    cfg.model.backbone.update(_backbone(arch), drop_path_rate=0.0,
                              init_cfg=dict(type='Pretrained', checkpoint=path))
    cfg.model.head.update(num_classes=5, in_channels=arch['embed_dims'][2])
    model = _build('mmpretrain', cfg.model)
    _check_loaded(model.backbone, state, arch, loads)
    assert loads['missing'][0] == ['fc_norm.weight', 'fc_norm.bias']
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64), mode='tensor').shape == (2, 5)


@pytest.mark.parametrize('size', list(V2_SIZES))
def test_timm_model(size, v2_files, loads):
    path, state = v2_files[size]
    arch = V2_SIZES[size]
    model = timm.create_model('convmae_base', num_classes=3, arch='auto', num_heads=arch['num_heads'],
                              init_cfg=dict(type='Pretrained', checkpoint=path)).eval()
    _check_loaded(model, state, arch, loads)
    assert loads['missing'][0] == ['fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias']
    assert [f['reduction'] for f in model.feature_info] == [arch['patch_sizes'][0],
                                                           arch['patch_sizes'][0] * arch['patch_sizes'][1], 16]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
