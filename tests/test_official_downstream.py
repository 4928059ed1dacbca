"""The shipped mmdet and mmseg configs build the official ConvMAE detection and segmentation backbones.

``fixtures/official_downstream_small.pt`` (see fixtures/README.md) holds the weights, inputs, four output maps and
gradients of the official ``ConvViTDet`` (DET/models/convmae.py) and ``ConvMAE`` (SEG/backbone/convmae.py) at
small sizes, computed in float64. The backbone of each shipped config, shrunk to those sizes by setting only
``img_size``, ``embed_dims``, ``depths``, ``num_heads``, ``window_size`` (det) and ``drop_path_rate=0``, loads the
weights through ``init_cfg`` from the three checkpoint layouts the weights come in, and reproduces the maps and
the gradients within 1e-6 (relative to each tensor's largest magnitude).
"""
import copy
import functools
import os.path as osp
from typing import Dict, List, Tuple

import pytest
import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import DefaultScope
from torch import Tensor, nn

import convmae_backbone  # noqa: F401
from convmae_backbone import ConvMAE
from convmae_backbone.models.reference import with_explicit_attention

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
FIXTURE = osp.join(REPO, 'tests', 'fixtures', 'official_downstream_small.pt')
CONFIGS = {
    'det': ('mmdet', osp.join(REPO, 'configs', 'mmdet', 'mask-rcnn_convmae-b_fpn_lsj-25e_coco.py')),
    'seg': ('mmseg', osp.join(REPO, 'configs', 'mmseg', 'upernet_convmae-b_8xb2-160k_ade20k-512x512.py')),
}
TOL = 1e-6


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope='module')
def official() -> Dict[str, dict]:
    return torch.load(FIXTURE, weights_only=True)


def write_checkpoint(path: str, layout: str, state: Dict[str, Tensor]) -> str:
    """The official backbone weights ``state`` saved as ``{'model': state}``, as a detectron2 detector or as an
    mmseg segmentor (other modules' keys beside the backbone's, as in the released files)."""
    g = torch.Generator().manual_seed(0)
    if layout == 'model':
        ckpt = {'model': state}
    elif layout == 'detectron2':
        others = {'backbone.fpn_lateral2.weight': (256, 16, 1, 1), 'backbone.fpn_output2.norm.weight': (256,),
                  'proposal_generator.rpn_head.conv.conv0.weight': (256, 256, 3, 3),
                  'roi_heads.box_predictor.cls_score.weight': (81, 1024)}
        ckpt = {'model': {**{f'backbone.bottom_up.{k}': v for k, v in state.items()},
                          **{k: torch.randn(s, generator=g) for k, s in others.items()}},
                'iteration': 92186}
    elif layout == 'mmseg':
        others = {'decode_head.conv_seg.weight': (150, 768, 1, 1), 'auxiliary_head.conv_seg.weight': (150, 256, 1, 1),
                  'decode_head.psp_modules.0.1.bn.running_mean': (768,)}
        ckpt = {'meta': {'iter': 160000},
                'state_dict': {**{f'backbone.{k}': v for k, v in state.items()},
                               **{k: torch.randn(s, generator=g) for k, s in others.items()}}}
    else:
        raise ValueError(layout)
    torch.save(ckpt, path)
    return path


def shrink(kind: str, config: dict) -> dict:
    """The fixture's sizes: the only settings changed in the config's backbone."""
    sizes = dict(img_size=config['img_size'], embed_dims=tuple(config['embed_dims']),
                 depths=tuple(config['depths']), num_heads=config['num_heads'], drop_path_rate=0.0)
    if kind == 'det':
        sizes['window_size'] = config['window_size']
    return sizes


@functools.lru_cache(maxsize=None)
def shipped_backbone_cfg(kind: str):
    return Config.fromfile(CONFIGS[kind][1]).model.backbone


def config_backbone(kind: str, checkpoint: str, **overrides) -> ConvMAE:
    """The backbone of the shipped config, shrunk to the fixture's sizes, weights loaded through init_cfg, in
    float64; SyncBN (meaningless without a process group) becomes BN."""
    scope = CONFIGS[kind][0]
    cfg = copy.deepcopy(shipped_backbone_cfg(kind))
    cfg.update(overrides, init_cfg=dict(type='Pretrained', checkpoint=checkpoint))
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    with DefaultScope.overwrite_default_scope(scope):
        model = registry.build(cfg)
    model.init_weights()
    return revert_sync_batchnorm(model).double()


def official_loss(outputs: Tuple[Tensor, ...], seed: int) -> Tensor:
    """L = sum over outputs o of (o * w_o).sum(), w_o drawn in output order from a generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outputs)


def run_official_protocol(model: nn.Module, entry: dict) -> Tuple[List[Tensor], Dict[str, Tensor]]:
    """Train mode, BatchNorm in eval mode; the four maps and the gradients of L."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    model.zero_grad()
    outputs = model(entry['images'].double())
    official_loss(outputs, entry['grad_seed']).backward()
    params = dict(model.named_parameters())
    return [o.detach() for o in outputs], {k: params[k].grad for k in entry['grads'] if k in params}


@pytest.mark.parametrize('layout', ['model', 'detectron2', 'mmseg'])
@pytest.mark.parametrize('kind', ['det', 'seg'])
def test_config_backbone_reproduces_official(kind, layout, official, tmp_path):
    entry = official[kind]
    ckpt = write_checkpoint(str(tmp_path / 'official.pth'), layout, entry['state_dict'])
    model = config_backbone(kind, ckpt, **shrink(kind, entry['config']))

    # Same parameter and buffer names as the official model (its relative_position_index buffers are recomputed,
    # not stored), and every weight loaded.
    official_state = {k: v for k, v in entry['state_dict'].items() if not k.endswith('relative_position_index')}
    state = model.state_dict()
    assert sorted(state) == sorted(official_state)
    for k, v in official_state.items():
        assert torch.equal(state[k], v.double() if v.is_floating_point() else v), k
    if kind == 'det':
        assert {n: p.requires_grad for n, p in model.named_parameters()} == entry['requires_grad']
        assert not model.pos_embed.requires_grad
    else:
        assert all(p.requires_grad for p in model.parameters())
    for name, buf in model.named_buffers():
        if name.endswith('relative_position_index'):
            assert torch.equal(buf, entry['state_dict'][name]), name

    outputs, grads = run_official_protocol(model, entry)
    assert [tuple(o.shape) for o in outputs] == [tuple(f.shape) for f in entry['features']]
    for i, (out, ref) in enumerate(zip(outputs, entry['features'])):
        assert rel_err(out, ref) < TOL, f'map {i}: {rel_err(out, ref):.2e}'
    for name, ref in entry['grads'].items():
        assert rel_err(grads[name], ref) < TOL, f'grad {name}: {rel_err(grads[name], ref):.2e}'


@pytest.mark.parametrize('kind', ['det', 'seg'])
def test_explicit_attention_reproduces_official(kind, official, tmp_path):
    """The explicit softmax(QK^T)V reference (models/reference.py) handles every relative position variant."""
    entry = official[kind]
    ckpt = write_checkpoint(str(tmp_path / 'official.pth'), 'model', entry['state_dict'])
    model = with_explicit_attention(config_backbone(kind, ckpt, **shrink(kind, entry['config'])))
    outputs, grads = run_official_protocol(model, entry)
    for out, ref in zip(outputs, entry['features']):
        assert rel_err(out, ref) < TOL
    for name, ref in entry['grads'].items():
        assert rel_err(grads[name], ref) < TOL, name


@pytest.mark.parametrize('kind, change', [
    ('det', dict(rel_pos_bias='per_block')),   # per-block tables start at zero: the shared ones are not used
    ('det', dict(norm_eps=1e-5)),
    ('seg', dict(norm_eps=1e-6)),
    ('seg', dict(rel_pos_bias='none')),
], ids=['det-tables', 'det-eps', 'seg-eps', 'seg-tables'])
def test_fixture_tells_the_options_apart(kind, change, official, tmp_path):
    """Each official option matters for the fixture: with another value the maps are off by far more than the
    tolerance."""
    entry = official[kind]
    ckpt = write_checkpoint(str(tmp_path / 'official.pth'), 'model', entry['state_dict'])
    model = config_backbone(kind, ckpt, **shrink(kind, entry['config']), **change)
    outputs, _ = run_official_protocol(model, entry)
    assert max(rel_err(o, f) for o, f in zip(outputs, entry['features'])) > 50 * TOL


@pytest.mark.parametrize('kind', ['det', 'seg'])
def test_other_input_sizes_resize_tables_as_at_load(kind, official, tmp_path):
    """Any input size works: a model built for the fixture's grid on a larger input (position embedding and
    relative position tables resized at forward) equals a model built for that input size whose weights were
    resized once at load."""
    entry = official[kind]
    state = {k: v.double() if v.is_floating_point() else v for k, v in entry['state_dict'].items()}
    ckpt = write_checkpoint(str(tmp_path / 'official.pth'), 'model', state)  # float64: resized in float64
    sizes = shrink(kind, entry['config'])
    small = config_backbone(kind, ckpt, **sizes).eval()
    size = sizes['img_size'] + 32
    large = config_backbone(kind, ckpt, **dict(sizes, img_size=size)).eval()
    tables = {n: p for n, p in large.named_parameters() if n.endswith('relative_position_bias_table')}
    assert tables and all(p.shape != entry['state_dict'][n].shape for n, p in tables.items()
                          if not n.startswith('windowed'))
    x = torch.randn(1, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a, b in zip(small(x), large(x)):
            assert rel_err(a, b) < 1e-8  # the models hold float32 weights: resized at load, rounded to float32 once


def test_relative_position_index_is_recomputed_not_stored(official):
    """``relative_position_index`` is no part of the state dict; the recomputed one is the official one."""
    entry = official['seg']
    model = ConvMAE(**shrink('seg', entry['config']), rel_pos_bias='per_block', h32='fpn', out_indices=(0, 1, 2, 3))
    assert not any(k.endswith('relative_position_index') for k in model.state_dict())
    assert torch.equal(model.blocks3[0].attn.relative_position_index,
                       entry['state_dict']['blocks3.0.attn.relative_position_index'])


def test_bad_options_fail_clearly():
    with pytest.raises(ValueError, match='rel_pos_bias must be one of'):
        ConvMAE(rel_pos_bias='beit')
    with pytest.raises(ValueError, match='contradicts'):
        ConvMAE(rel_pos_bias='shared', use_rel_pos_bias=True)
    with pytest.raises(ValueError, match='out_indices'):
        ConvMAE(h32='fpn', out_indices=(0, 1, 2))
    with pytest.raises(ValueError, match="h32 must be 'maxpool' or 'fpn'"):
        ConvMAE(h32='conv')
    model = ConvMAE(img_size=64, embed_dims=(16, 32, 64), depths=(1, 1, 1), num_heads=4, h32='fpn',
                    out_indices=(0, 1, 2, 3))
    with pytest.raises(ValueError, match='at least 48 pixels'):
        model(torch.randn(1, 3, 40, 64))


def test_table_of_another_grid_is_resized_at_load_and_bad_tables_fail(official, tmp_path):
    """A checkpoint table for another square grid is resized bicubically over its offsets (the official SEG
    loader's rule) when loaded; one that belongs to no square grid is an error naming the key."""
    from convmae_backbone.checkpoint import CheckpointError
    from convmae_backbone.models.attention import resize_relative_position_table
    entry = official['seg']
    table = entry['state_dict']['blocks3.0.attn.relative_position_bias_table']  # 6x6 grid: (11 * 11, 4)
    model = ConvMAE(img_size=128, embed_dims=(16, 32, 64), depths=(1, 1, 2), num_heads=4,
                    rel_pos_bias='per_block', h32='fpn', out_indices=(0, 1, 2, 3),
                    init_cfg=dict(type='Pretrained', checkpoint=write_checkpoint(
                        str(tmp_path / 'seg.pth'), 'mmseg', entry['state_dict'])))
    model.init_weights()
    loaded = model.blocks3[0].attn.relative_position_bias_table
    assert loaded.shape == (15 * 15, 4)
    # the official rule, written out: heads as channels of an (11, 11) image, bicubic to (15, 15)
    expected = torch.nn.functional.interpolate(table.t().reshape(1, 4, 11, 11), size=(15, 15), mode='bicubic',
                                               align_corners=False).reshape(4, 225).t()
    assert torch.allclose(loaded, expected, atol=1e-6)
    assert torch.equal(resize_relative_position_table(table, (6, 6), (6, 6)), table)

    bad = dict(entry['state_dict'], **{'blocks3.0.attn.relative_position_bias_table': torch.zeros(120, 4)})
    model = ConvMAE(img_size=96, embed_dims=(16, 32, 64), depths=(1, 1, 2), num_heads=4, rel_pos_bias='per_block',
                    init_cfg=dict(type='Pretrained', checkpoint=write_checkpoint(str(tmp_path / 'bad.pth'),
                                                                                 'model', bad)))
    with pytest.raises(CheckpointError, match='relative_position_bias_table with 120 offsets'):
        model.init_weights()
