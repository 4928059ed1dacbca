"""The backbone and neck of the ViTDet-style detector config reproduce the official ViTDet-style ConvMAE detector.

``fixtures/official_vitdet_small.pt`` (see fixtures/README.md) holds the weights, two inputs (256x256 and the
non-square 192x256), ``last_feat``, the five pyramid maps and the gradients of a loss over them, recorded from
OpenGVLab/Official-ConvMAE-Det's ``ConvViT`` + detectron2's ``SimpleFeaturePyramid`` in float64. The backbone and
neck of ``configs/mmdet/mask-rcnn_convmae-b_simplefpn_lsj-25e_coco.py``, shrunk to the fixture's sizes by setting
only ``img_size``, ``embed_dims``, ``depths``, ``num_heads``, ``window_size``, ``global_attn_indexes``,
``drop_path_rate=0`` and the neck's channels, load the official-key weights through ``init_cfg`` or through the
converter and reproduce every output and gradient within 1e-6 (relative to each tensor's largest magnitude).
"""
import copy
import os.path as osp
from typing import Dict, Tuple

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.runner import load_checkpoint
from torch import Tensor, nn

import convmae_backbone  # noqa: F401
from convmae_backbone.apis.convert import convert
from convmae_backbone.models.reference import with_explicit_attention

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
FIXTURE = osp.join(REPO, 'tests', 'fixtures', 'official_vitdet_small.pt')
CONFIG = osp.join(REPO, 'configs', 'mmdet', 'mask-rcnn_convmae-b_simplefpn_lsj-25e_coco.py')
TOL = 1e-6
LEVELS = ('p2', 'p3', 'p4', 'p5', 'p6')


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope='module')
def official() -> dict:
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope='module')
def shipped() -> Config:
    return Config.fromfile(CONFIG).model


def shrink(official: dict) -> Tuple[dict, dict]:
    """The fixture's sizes: the only settings changed in the config's backbone and neck."""
    net, pyramid = official['config']['net'], official['config']['pyramid']
    backbone = dict(img_size=net['img_size'], embed_dims=tuple(net['embed_dim']), depths=tuple(net['depth']),
                    num_heads=net['num_heads'], window_size=net['window_size'],
                    global_attn_indexes=tuple(net['global_block_indexes']), drop_path_rate=0.0)
    neck = dict(in_channels=net['embed_dim'][2], out_channels=pyramid['out_channels'])
    return backbone, neck


def write_official_detector(path: str, official: dict) -> str:
    """The fixture's weights as the official code saves a detector holding them: ``backbone.net.*`` and
    ``backbone.simfp_*`` under ``{'model': ...}`` (here without heads)."""
    torch.save({'model': {f'backbone.{k}': v for k, v in official['state_dict'].items()}, 'iteration': 184374},
               path)
    return path


def build(shipped: Config, official: dict, backbone_init=None, neck_init=None, **backbone_changes) -> nn.ModuleDict:
    """The shipped config's backbone and neck at the fixture's sizes, in mmdet's scope, initialised (weights
    through the given ``init_cfg`` s), in float64."""
    from mmdet.registry import MODELS
    sizes, neck_sizes = shrink(official)
    backbone_cfg = copy.deepcopy(shipped.backbone)
    backbone_cfg.update(sizes, init_cfg=backbone_init, **backbone_changes)
    neck_cfg = copy.deepcopy(shipped.neck)
    neck_cfg.update(neck_sizes, init_cfg=neck_init)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = nn.ModuleDict(dict(backbone=MODELS.build(backbone_cfg), neck=MODELS.build(neck_cfg)))
    model.backbone.init_weights()
    model.neck.init_weights()
    return model


def official_name(name: str) -> str:
    """Our ``backbone.*`` / ``neck.*`` name -> the fixture's (``net.*``, ``simfp_*``)."""
    return 'net.' + name[len('backbone.'):] if name.startswith('backbone.') else name[len('neck.'):]


def run(model: nn.ModuleDict, entry: dict) -> Tuple[Tensor, Tuple[Tensor, ...], Dict[str, Tensor]]:
    """last_feat, the pyramid and the gradients (by official name) of the fixture's loss."""
    model.train().double()
    model.zero_grad()
    feats = model.backbone(entry['images'].double())
    assert len(feats) == 1  # the H/16 map alone
    pyramid = model.neck(feats)
    loss = sum((p * entry['loss_weights'][k].double()).sum() for k, p in zip(LEVELS, pyramid))
    loss.backward()
    assert loss.item() == pytest.approx(entry['loss'].item(), rel=1e-6)
    grads = {official_name(n): p.grad for n, p in model.named_parameters()}
    return feats[0].detach(), tuple(p.detach() for p in pyramid), {k: grads[k] for k in entry['grads']}


def check(model: nn.ModuleDict, entry: dict) -> None:
    last_feat, pyramid, grads = run(model, entry)
    assert last_feat.shape == entry['last_feat'].shape
    assert rel_err(last_feat, entry['last_feat']) < TOL, f'last_feat: {rel_err(last_feat, entry["last_feat"]):.2e}'
    for level, out in zip(LEVELS, pyramid):
        ref = entry['pyramid'][level]
        assert out.shape == ref.shape, level
        assert rel_err(out, ref) < TOL, f'{level}: {rel_err(out, ref):.2e}'
    for name, ref in entry['grads'].items():
        assert rel_err(grads[name], ref) < TOL, f'grad {name}: {rel_err(grads[name], ref):.2e}'


@pytest.fixture(scope='module')
def official_files(official, tmp_path_factory) -> Tuple[str, str]:
    """The official-layout detector file and its conversion (``tools/convert_official.py vitdet``)."""
    root = tmp_path_factory.mktemp('vitdet')
    src = write_official_detector(str(root / 'official.pth'), official)
    dst = str(root / 'converted.pth')
    report = convert('vitdet', src, dst)
    assert report['missing_parts'] == ['RPN head', 'box head', 'mask head']
    return src, dst


@pytest.mark.parametrize('entry', ['native', 'second'])
@pytest.mark.parametrize('loading', ['init_cfg', 'converter'])
def test_config_backbone_and_neck_reproduce_official(loading, entry, official, shipped, official_files):
    src, converted = official_files
    if loading == 'init_cfg':  # the backbone reads the detector's backbone.net.*, the neck the converted file
        model = build(shipped, official, backbone_init=dict(type='Pretrained', checkpoint=src),
                      neck_init=dict(type='Pretrained', checkpoint=converted, prefix='neck.'))
    else:  # the converted file holds exactly the backbone's and the neck's weights
        model = build(shipped, official)
        load_checkpoint(model, converted, strict=True)
    # every weight is the official one, under the official name; everything trains (pos_embed included)
    state = {official_name(k): v for k, v in model.state_dict().items()}
    assert sorted(state) == sorted(official['state_dict'])
    for k, v in official['state_dict'].items():
        assert torch.equal(state[k], v), k
    assert {official_name(n): p.requires_grad for n, p in model.named_parameters()} == official['requires_grad']
    check(model, official[entry])


@pytest.mark.parametrize('entry', ['native', 'second'])
def test_explicit_attention_reproduces_official(entry, official, shipped, official_files):
    """The explicit softmax(QK^T)V reference (models/reference.py) with zero-padded windows."""
    model = build(shipped, official)
    load_checkpoint(model, official_files[1], strict=True)
    with_explicit_attention(model.backbone)
    check(model, official[entry])


@pytest.mark.parametrize('change', [
    dict(window_padding='masked'),  # pad keys masked out of attention
    dict(pos_embed_grid=None),      # pos_embed on the img_size grid: resized once at load, not at every forward
    dict(conv_norm_eps=1e-5),       # the conv blocks' LayerNorms
    dict(rel_pos_bias='shared'),    # another relative position scheme (its tables are not in the fixture)
], ids=['masked-padding', 'pos-embed-grid', 'conv-eps', 'rel-pos'])
def test_fixture_tells_the_options_apart(change, official, shipped, official_files):
    """Each official option matters for the fixture: with another value the outputs are off by far more than the
    tolerance."""
    src, converted = official_files
    model = build(shipped, official, backbone_init=dict(type='Pretrained', checkpoint=src),
                  neck_init=dict(type='Pretrained', checkpoint=converted, prefix='neck.'), **change).eval().double()
    entry = official['second']
    with torch.no_grad():
        feats = model.backbone(entry['images'].double())
        pyramid = model.neck(feats)
    errors = [rel_err(feats[0], entry['last_feat'])] + [rel_err(p, entry['pyramid'][k])
                                                        for k, p in zip(LEVELS, pyramid)]
    assert max(errors) > 10 * TOL  # conv eps: 1.6e-5; the others 1e-3 and more


def test_position_embedding_and_global_tables_have_their_own_grids(official, shipped):
    """pos_embed keeps the 14x14 grid of the 224 pretraining while img_size sizes the global blocks' tables;
    windowed blocks' tables are sized by the window."""
    model = build(shipped, official).backbone
    assert model.pos_embed.shape == (1, 14 * 14, 96) and model.pos_embed.requires_grad
    assert model.blocks3[1].attn.rel_pos_h.shape == (2 * 256 // 16 - 1, 24)
    assert model.blocks3[0].attn.rel_pos_h.shape == (2 * 7 - 1, 24)
    assert [b.window_size for b in model.blocks3] == [7, 0, 7, 0]
    assert model.blocks1[0].norm1.eps == 1e-6 and model.patch_embed1.norm.eps == 1e-5
