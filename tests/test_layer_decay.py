"""Layer-wise lr decay constructor: lr scales and weight decays of concrete parameters, on the full UperNet
config (ConvMAE-Base, 11 stage-3 blocks, rate 0.75: the official SEG values of LayerDecayOptimizerConstructor)
and on a bare ConvMAE."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope

import convmae_backbone  # noqa: F401
from convmae_backbone import ConvMAE, ConvMAELayerDecayOptimWrapperConstructor

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
SEG_CONFIG = osp.join(REPO, 'configs', 'mmseg', 'upernet_convmae-b_8xb2-160k_ade20k-512x512.py')


def _groups_by_name(optim_wrapper, model):
    ids = {id(p): n for n, p in model.named_parameters()}
    by_name = {}
    for group in optim_wrapper.optimizer.param_groups:
        for p in group['params']:
            name = ids[id(p)]
            assert name not in by_name, f'{name} is in two param groups'
            by_name[name] = group
    return by_name


@pytest.fixture(scope='module')
def upernet():
    from mmseg.registry import MODELS
    cfg = Config.fromfile(SEG_CONFIG)
    optim_cfg = cfg.optim_wrapper.copy()
    optim_cfg.type = 'OptimWrapper'  # AMP needs a GPU; the param groups are the same
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(cfg.model)
        optim_wrapper = build_optim_wrapper(model, optim_cfg)
    return cfg, model, optim_wrapper


def test_full_config_lr_scales_and_weight_decay(upernet):
    cfg, model, optim_wrapper = upernet
    base_lr = cfg.optim_wrapper.optimizer.lr
    base_wd = cfg.optim_wrapper.optimizer.weight_decay
    assert (base_lr, base_wd) == (1e-4, 0.05)
    groups = _groups_by_name(optim_wrapper, model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(groups) == sorted(trainable)

    def check(name, scale, wd):
        g = groups[name]
        assert g['lr'] == pytest.approx(base_lr * scale, rel=1e-9), name
        assert g['weight_decay'] == wd, name

    r = 0.75
    # layer 0: patch embeddings, position embedding, conv stages 1-2 -> 0.75 ** 12
    check('backbone.patch_embed1.proj.weight', r ** 12, base_wd)
    check('backbone.patch_embed4.weight', r ** 12, base_wd)
    check('backbone.blocks1.0.conv1.weight', r ** 12, base_wd)
    check('backbone.blocks2.1.mlp.fc2.weight', r ** 12, base_wd)
    check('backbone.patch_embed1.norm.weight', r ** 12, 0.0)
    check('backbone.patch_embed1.proj.bias', r ** 12, 0.0)
    # official accident: 'backbone.pos_embed' is not the no-decay name 'pos_embed', so it is decayed
    check('backbone.pos_embed', r ** 12, base_wd)
    # stage-3 block i -> layer i + 1; its relative position table is 2-D and decayed, as officially
    check('backbone.blocks3.0.attn.qkv.weight', r ** 11, base_wd)
    check('backbone.blocks3.0.attn.relative_position_bias_table', r ** 11, base_wd)
    check('backbone.blocks3.5.mlp.fc1.weight', r ** 6, base_wd)
    check('backbone.blocks3.5.gamma_1', r ** 6, 0.0)
    check('backbone.blocks3.10.mlp.fc1.weight', r ** 1, base_wd)
    check('backbone.blocks3.10.norm2.weight', r ** 1, 0.0)
    check('backbone.blocks3.10.attn.relative_position_bias_table', r ** 1, base_wd)
    # the fpn branch is no encoder layer: layer 12, full lr
    check('backbone.fpn.0.weight', 1.0, base_wd)
    check('backbone.fpn.0.bias', 1.0, 0.0)
    check('backbone.fpn.1.weight', 1.0, 0.0)
    # heads: full lr, decay on weights only
    check('decode_head.conv_seg.weight', 1.0, base_wd)
    check('decode_head.conv_seg.bias', 1.0, 0.0)
    check('auxiliary_head.conv_seg.weight', 1.0, base_wd)
    check('decode_head.bottleneck.bn.weight', 1.0, 0.0)
    # every group: lr = base_lr * 0.75 ** (12 - layer id), layer ids 0..12
    assert sorted({g['layer_id'] for g in optim_wrapper.optimizer.param_groups}) == list(range(13))
    for g in optim_wrapper.optimizer.param_groups:
        assert g['lr'] == pytest.approx(base_lr * r ** (12 - g['layer_id']), rel=1e-12)


def test_clean_weight_decay_switch(upernet):
    """decay_position=False: no decay on the position embedding and the relative position tables either; all else
    as officially."""
    cfg, model, _ = upernet
    optim_cfg = cfg.optim_wrapper.copy()
    optim_cfg.type = 'OptimWrapper'
    optim_cfg.paramwise_cfg = dict(cfg.optim_wrapper.paramwise_cfg, decay_position=False)
    with DefaultScope.overwrite_default_scope('mmseg'):
        groups = _groups_by_name(build_optim_wrapper(model, optim_cfg), model)
    for name in ('backbone.pos_embed', 'backbone.blocks3.0.attn.relative_position_bias_table',
                 'backbone.blocks3.0.norm1.weight', 'backbone.fpn.0.bias'):
        assert groups[name]['weight_decay'] == 0.0, name
    for name in ('backbone.blocks3.0.attn.qkv.weight', 'backbone.fpn.0.weight', 'decode_head.conv_seg.weight'):
        assert groups[name]['weight_decay'] == 0.05, name
    assert groups['backbone.pos_embed']['lr'] == pytest.approx(1e-4 * 0.75 ** 12)


def test_warmup_keeps_layer_ratios(upernet):
    """mmengine's schedulers scale every group alike, so the layer ratios survive warm-up and poly decay."""
    cfg, model, optim_wrapper = upernet
    from mmengine.optim.scheduler import LinearLR, PolyLR
    optimizer = optim_wrapper.optimizer
    saved = [g['lr'] for g in optimizer.param_groups]
    groups = _groups_by_name(optim_wrapper, model)
    head, first = groups['decode_head.conv_seg.weight'], groups['backbone.blocks3.0.attn.qkv.weight']
    warmup, poly = cfg.param_scheduler
    assert (warmup.type, poly.type) == ('LinearLR', 'PolyLR')
    warmup = LinearLR(optimizer, **{k: v for k, v in warmup.items() if k != 'type'})
    poly = PolyLR(optimizer, **{k: v for k, v in poly.items() if k != 'type'})
    try:
        for _ in range(20):
            warmup.step()
            poly.step()
        assert head['lr'] < 1e-4 * 0.02  # still warming up
        assert first['lr'] / head['lr'] == pytest.approx(0.75 ** 11, rel=1e-6)
        # as mmcv 1.x's poly with linear warm-up (the official schedule): poly(t) * (1e-6 + (1 - 1e-6) * t / 1500)
        t = 20
        assert head['lr'] == pytest.approx(1e-4 * (1 - t / 160000) * (1e-6 + (1 - 1e-6) * t / 1500), rel=1e-9)
    finally:
        for g, lr in zip(optimizer.param_groups, saved):
            g['lr'] = lr


def test_bare_convmae_and_layer_ids():
    model = ConvMAE(embed_dims=(32, 48, 96), depths=(1, 1, 3), num_heads=4, rel_pos_bias='decomposed',
                    layer_scale_init_value=0.1)
    ctor = ConvMAELayerDecayOptimWrapperConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.1)),
        dict(layer_decay_rate=0.5, decay_position=False))  # num_layers inferred: 3
    optim_wrapper = ctor(model)
    groups = _groups_by_name(optim_wrapper, model)
    assert groups['patch_embed2.proj.weight']['lr'] == pytest.approx(1e-3 * 0.5 ** 4)
    assert groups['blocks3.2.attn.proj.weight']['lr'] == pytest.approx(1e-3 * 0.5)
    assert groups['blocks3.2.attn.proj.weight']['weight_decay'] == 0.1
    assert groups['blocks3.1.gamma_2']['weight_decay'] == 0.0
    assert groups['pos_embed']['weight_decay'] == 0.0
    assert groups['blocks3.0.attn.rel_pos_h']['weight_decay'] == 0.0
    # the optimizer steps with these groups
    model(torch.randn(1, 3, 64, 64))[2].mean().backward()  # the stage-3 map
    before = model.blocks3[2].attn.proj.weight.detach().clone()
    optim_wrapper.step()
    assert not torch.equal(before, model.blocks3[2].attn.proj.weight)

    assert model.get_layer_id('blocks3.2.attn.qkv.weight') == 3
    assert model.get_layer_id('blocks2.0.attn.weight') == 0
    assert model.get_layer_id('patch_embed4.weight') == model.get_layer_id('pos_embed') == 0
    assert model.get_layer_id('fc_norm.weight') == 4  # outside the encoder: num_layers + 1
    assert model.get_layer_id('blocks3.0.norm1.weight') == 1
    assert model.get_layer_id('blocks3.0.attn.relative_position_bias_table') == 1
    # as the official get_num_layer_for_vit: the fpn branch and shared tables are 'the rest'
    assert model.get_layer_id('fpn.0.weight') == 4
    assert model.get_layer_id('global_rel_pos_bias.relative_position_bias_table') == 4
    assert model.get_layer_id('windowed_rel_pos_bias.relative_position_bias_table') == 4


def test_frozen_params_are_left_out_and_bad_configs_fail():
    model = ConvMAE(embed_dims=(32, 48, 96), depths=(1, 1, 2), num_heads=4, frozen_stages=1)
    optim_cfg = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.1))
    ctor = ConvMAELayerDecayOptimWrapperConstructor(optim_cfg, dict(num_layers=2, layer_decay_rate=0.9))
    optim_wrapper = ctor(model)
    names = set(_groups_by_name(optim_wrapper, model))
    assert 'blocks1.0.conv1.weight' not in names and 'blocks2.0.conv1.weight' in names
    with pytest.raises(ValueError, match='num_layers=11'):
        ConvMAELayerDecayOptimWrapperConstructor(optim_cfg, dict(num_layers=11, layer_decay_rate=0.9))(model)
    with pytest.raises(ValueError, match='layer_decay_rate'):
        ConvMAELayerDecayOptimWrapperConstructor(optim_cfg, dict(layer_decay_rate=1.5))
    with pytest.raises(ValueError, match='unsupported'):
        ConvMAELayerDecayOptimWrapperConstructor(optim_cfg, dict(decay_rate=0.9))
