"""The ViTDet-style detector config (configs/mmdet/mask-rcnn_convmae-b_simplefpn_lsj-25e_coco.py): the official
recipe value by value, the model it builds, its optimizer groups, the converter of the released detector, and a
few iterations plus evaluation through mmdet's tools/train.py and ours."""
import bisect
import copy
import os
import os.path as osp
import re
import subprocess
import sys
from typing import Dict, Tuple

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope
from torch import nn

import convmae_backbone  # noqa: F401
from convmae_backbone import testing
from convmae_backbone.apis.convert import convert, convert_vitdet
from convmae_backbone.checkpoint import CheckpointError, safe_torch_load
from convmae_backbone.models.arch import model_arch
from convmae_backbone.models.pyramid import LayerNorm2d
from helpers import load_tool, lr_curve

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(REPO, 'configs', 'mmdet', 'mask-rcnn_convmae-b_simplefpn_lsj-25e_coco.py')
FIXTURE = osp.join(REPO, 'tests', 'fixtures', 'official_vitdet_small.pt')
MAX_ITER = 184375  # the official train.max_iter


def _transform(pipeline, type_name):
    return next(t for t in pipeline if t['type'] == type_name)


@pytest.fixture(scope='module')
def cfg() -> Config:
    return Config.fromfile(CONFIG)


@pytest.fixture(scope='module')
def detector(cfg):
    from mmdet.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(copy.deepcopy(cfg.model))
    return model.eval()


# ------------------------------------------------------------------------------------------------- recipe
def test_vitdet_config_recipe(cfg):
    """mask_rcnn_vitdet_convmae_b_25ep.py on configs/common/models/mask_rcnn_vitdet.py (Official-ConvMAE-Det),
    value by value."""
    assert cfg.default_scope == 'mmdet' and cfg.custom_imports.imports == ['convmae_backbone']
    bb = cfg.model.backbone
    assert bb.type == 'ConvMAE' and bb.img_size == 1024 and bb.pos_embed_grid == 14  # pretrain_img_size 224
    arch = model_arch(bb)  # arch='base'
    assert (tuple(arch['embed_dims']), tuple(arch['depths']), arch['num_heads'], tuple(arch['mlp_ratios'])) == (
        (256, 384, 768), (2, 2, 11), 12, (4, 4, 4))
    assert bb.drop_path_rate == 0.1 and bb.window_size == 14
    # window_block_indexes 0, 2, 3, 5, 6, 8, 9: the others are global
    assert tuple(bb.global_attn_indexes) == (1, 4, 7, 10)
    assert bb.window_padding == 'zeros' and bb.rel_pos_bias == 'decomposed'  # use_rel_pos=True
    assert bb.norm_eps == bb.conv_norm_eps == 1e-6  # norm_layer=partial(nn.LayerNorm, eps=1e-6)
    assert bb.freeze_pos_embed is False and tuple(bb.out_indices) == (2,)  # out_feature='last_feat'
    assert bb.init_cfg == dict(type='Pretrained', checkpoint=cfg.pretrained)
    assert 'depth' not in bb and 'norm_eval' not in bb
    neck = cfg.model.neck
    assert neck == dict(type='SimpleFeaturePyramid', in_channels=768, out_channels=256,
                        scale_factors=(4.0, 2.0, 1.0, 0.5), num_outs=5, norm_eps=1e-6)  # + LastLevelMaxPool
    assert 'add_extra_convs' not in neck
    # model.proposal_generator.head.conv_dims = [-1, -1]; 3 anchors per place, sizes 32-512, strides 4-64
    rpn = cfg.model.rpn_head
    assert rpn.num_convs == 2 and rpn.in_channels == rpn.feat_channels == 256
    assert rpn.anchor_generator.scales == [8] and rpn.anchor_generator.ratios == [0.5, 1.0, 2.0]
    assert rpn.anchor_generator.strides == [4, 8, 16, 32, 64]
    roi = cfg.model.roi_head
    # box_head.conv_dims [256] * 4, fc_dims [1024], conv_norm 'LN'; mask_head conv_dims [256] * 5, conv_norm 'LN'
    assert roi.bbox_head.type == 'Shared4Conv1FCBBoxHead' and roi.bbox_head.conv_out_channels == 256
    assert roi.bbox_head.fc_out_channels == 1024 and roi.bbox_head.num_classes == 80
    assert roi.bbox_head.norm_cfg == roi.mask_head.norm_cfg == dict(type='ConvMAELN2d', eps=1e-6)
    assert roi.mask_head.num_convs == 4 and roi.mask_head.conv_out_channels == 256
    assert roi.bbox_head.bbox_coder.target_stds == [0.1, 0.1, 0.2, 0.2]  # Box2BoxTransform (10, 10, 5, 5)
    assert roi.bbox_roi_extractor.roi_layer == dict(type='RoIAlign', output_size=7, sampling_ratio=0)
    assert roi.mask_roi_extractor.roi_layer == dict(type='RoIAlign', output_size=14, sampling_ratio=0)
    assert cfg.model.test_cfg.rcnn.score_thr == 0.05 and cfg.model.test_cfg.rcnn.nms.iou_threshold == 0.5
    assert cfg.model.test_cfg.rcnn.max_per_img == 100 and cfg.model.test_cfg.rpn.max_per_img == 1000
    assert cfg.model.train_cfg.rpn.sampler.num == 256 and cfg.model.train_cfg.rcnn.sampler.num == 512
    assert cfg.model.train_cfg.rcnn.sampler.pos_fraction == 0.25

    pre = cfg.model.data_preprocessor  # constants.imagenet_rgb256_mean / std, input_format 'RGB'
    assert pre.mean == [123.675, 116.28, 103.53] and pre.std == [58.395, 57.12, 57.375] and pre.bgr_to_rgb
    assert pre.pad_size_divisor == 1024 and pre.batch_augments[0].size == (1024, 1024)  # square_pad=1024

    train_pipeline = cfg.train_dataloader.dataset.dataset.pipeline  # coco_loader_lsj.py
    resize = _transform(train_pipeline, 'RandomResize')
    assert resize.scale == (1024, 1024) and resize.ratio_range == (0.1, 2.0) and resize.keep_ratio
    crop = _transform(train_pipeline, 'RandomCrop')
    assert crop.crop_size == (1024, 1024) and crop.recompute_bbox  # FixedSizeCrop(pad=False); recompute_boxes
    assert _transform(train_pipeline, 'RandomFlip').prob == 0.5
    test_resize = _transform(cfg.test_dataloader.dataset.pipeline, 'Resize')  # ResizeShortestEdge(1024, 1024)
    assert test_resize.scale == (1024, 1024) and test_resize.keep_ratio

    assert cfg.train_dataloader.batch_size * 8 == cfg.auto_scale_lr.base_batch_size == 16  # total_batch_size
    assert cfg.train_dataloader.dataset.times == 1
    assert cfg.train_cfg == dict(type='IterBasedTrainLoop', max_iters=MAX_ITER, val_interval=7500)  # eval_period
    assert cfg.default_hooks.checkpoint.interval == 2500 and cfg.default_hooks.checkpoint.max_keep_ckpts == 2
    assert cfg.default_hooks.checkpoint.by_epoch is False

    ow = cfg.optim_wrapper
    assert ow.type == 'AmpOptimWrapper'  # train.amp.enabled
    assert ow.constructor == 'ConvMAELayerDecayOptimWrapperConstructor'
    assert ow.optimizer == dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1)
    assert ow.paramwise_cfg == dict(num_layers=11, layer_decay_rate=0.8, rules='vitdet')
    warmup, steps = cfg.param_scheduler
    assert (warmup.type, warmup.start_factor, warmup.by_epoch, warmup.begin, warmup.end) == (
        'LinearLR', 0.001, False, 0, 251)
    assert (steps.type, steps.by_epoch, steps.milestones, steps.gamma, steps.end) == (
        'MultiStepLR', False, [163889, 177546], 0.1, MAX_ITER)


def test_vitdet_lr_schedule_follows_detectron2(cfg):
    """lr multiplier of detectron2's WarmupParamScheduler(MultiStepParamScheduler([1, 0.1, 0.01], [163889,
    177546]), warmup_length=250 / max_iter, warmup_factor=0.001) at every iteration: linear from 0.001 to the
    schedule's 1.0 over 250 iterations, then the steps."""
    milestones = [163889, 177546]

    def official(t: int) -> float:
        if t / MAX_ITER < 250 / MAX_ITER:
            return 0.001 + (1.0 - 0.001) * t / 250
        return [1.0, 0.1, 0.01][bisect.bisect_right(milestones, t)]

    # the whole schedule on a scaled copy (the same code paths, 1/1000 of the steps) ...
    scale = 1000
    scaled = copy.deepcopy(cfg.param_scheduler)
    scaled[1].update(end=MAX_ITER // scale, milestones=[m // scale for m in milestones])
    lrs = lr_curve(scaled[1:], MAX_ITER // scale)
    assert lrs == pytest.approx([[1.0, 0.1, 0.01][bisect.bisect_right([m // scale for m in milestones], t)]
                                 for t in range(MAX_ITER // scale)], rel=1e-12)
    # ... and the real warm-up
    lrs = lr_curve(cfg.param_scheduler, 400)
    assert lrs == pytest.approx([official(t) for t in range(400)], rel=1e-9)


# -------------------------------------------------------------------------------------------------- model
def test_vitdet_detector_structure_and_features(detector):
    """The ConvMAE-B detector of the config (its heads run in the training test, at tiny sizes)."""
    bb = detector.backbone
    assert [b.window_size for b in bb.blocks3] == [14, 0, 14, 14, 0, 14, 14, 0, 14, 14, 0]
    assert all(b.window_padding == 'zeros' and b.attn.rel_pos == 'decomposed' for b in bb.blocks3)
    assert bb.blocks3[1].attn.rel_pos_h.shape == (127, 64) and bb.blocks3[0].attn.rel_pos_h.shape == (27, 64)
    assert bb.pos_embed.shape == (1, 196, 768) and bb.pos_embed.requires_grad
    assert all(p.requires_grad for p in detector.parameters())  # officially nothing is frozen
    box_convs = detector.roi_head.bbox_head.shared_convs
    assert len(box_convs) == 4 and all(type(c.ln) is LayerNorm2d and c.conv.bias is None for c in box_convs)
    assert all(type(c.ln) is LayerNorm2d and c.ln.eps == 1e-6 for c in detector.roi_head.mask_head.convs)
    assert type(detector.neck.simfp_2[1]) is LayerNorm2d and detector.neck.simfp_4[0].bias is None
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        maps = detector.backbone(x)
        feats = detector.neck(maps)
    assert [tuple(m.shape) for m in maps] == [(1, 768, 8, 6)]
    assert [tuple(f.shape) for f in feats] == [(1, 256, 32, 24), (1, 256, 16, 12), (1, 256, 8, 6),
                                                (1, 256, 4, 3), (1, 256, 2, 2)]


def test_vitdet_optimizer_groups(cfg, detector):
    """detectron2's get_default_optimizer_params(weight_decay_norm=0, overrides={'pos_embed': wd 0}) with the
    fork's get_vit_lr_decay_rate(num_layers=11, lr_decay_rate=0.8), parameter by parameter."""
    optim_cfg = cfg.optim_wrapper.copy()
    optim_cfg.type = 'OptimWrapper'
    optimizer = build_optim_wrapper(detector, optim_cfg).optimizer
    names = {id(p): n for n, p in detector.named_parameters()}
    got = {names[id(p)]: (g['lr'], g['weight_decay']) for g in optimizer.param_groups for p in g['params']}
    assert set(got) == set(names.values())

    def official_lr(name: str) -> float:  # the fork's rule on detectron2 names (backbone.net.* is the encoder)
        layer_id = 12
        if name.startswith('backbone'):
            if '.patch_embed' in name or '.blocks1.' in name or '.blocks2.' in name:
                layer_id = 0
            elif '.blocks3.' in name:
                layer_id = int(name[name.find('.blocks3.'):].split('.')[2]) + 1
        return 1e-4 * 0.8 ** (12 - layer_id)

    for name, (lr, wd) in got.items():
        d2_name = 'backbone.net.' + name[len('backbone.'):] if name.startswith('backbone.') else name
        assert lr == pytest.approx(official_lr(d2_name), rel=1e-12), name
    assert got['backbone.pos_embed'] == (pytest.approx(1e-4), 0.0)  # full lr (not layer 0), no decay
    assert got['backbone.patch_embed4.weight'][0] == pytest.approx(1e-4 * 0.8 ** 12)
    assert got['backbone.blocks3.10.attn.rel_pos_h'][0] == pytest.approx(1e-4 * 0.8)
    # no decay: torch LayerNorms (encoder) and pos_embed; decay: biases, rel-pos tables, detectron2-LN params
    for name in ('backbone.blocks3.1.norm1.weight', 'backbone.blocks3.1.norm2.bias', 'backbone.blocks1.0.norm1.bias',
                 'backbone.patch_embed1.norm.weight', 'backbone.pos_embed'):
        assert got[name][1] == 0.0, name
    for name in ('backbone.blocks3.1.attn.qkv.bias', 'backbone.blocks3.1.attn.rel_pos_w',
                 'backbone.patch_embed1.proj.bias', 'neck.simfp_2.1.weight', 'neck.simfp_2.4.norm.bias',
                 'neck.simfp_3.0.bias', 'rpn_head.rpn_conv.0.conv.bias', 'roi_head.bbox_head.shared_convs.0.ln.weight',
                 'roi_head.mask_head.convs.3.ln.bias', 'roi_head.bbox_head.fc_cls.bias'):
        assert got[name][1] == 0.1, name
    # 33 LayerNorms: 3 patch embeddings, 2 per block (2 + 2 + 11 blocks); and pos_embed
    assert sum(wd == 0.0 for _, wd in got.values()) == 2 * (3 + 2 * (2 + 2 + 11)) + 1


def test_vitdet_rules_refuse_bad_settings():
    from convmae_backbone.engine.optim import ConvMAELayerDecayOptimWrapperConstructor as Constructor
    optimizer = dict(type='AdamW', lr=1e-4, weight_decay=0.1)
    with pytest.raises(ValueError, match="rules must be one of \\('convmae', 'vitdet'\\), got 'detectron2'"):
        Constructor(dict(optimizer=optimizer), dict(rules='detectron2'))
    with pytest.raises(ValueError, match='decay_position does not apply'):
        Constructor(dict(optimizer=optimizer), dict(rules='vitdet', decay_position=False))


# --------------------------------------------------------------------------------------------- converter
def official_detector_shapes(embed_dims=(256, 384, 768), depths=(2, 2, 11), num_heads=12, window=14,
                             global_blocks=(1, 4, 7, 10), img_size=1024, out_channels=256, head_channels=256,
                             fc=1024, num_classes=80) -> Dict[str, Tuple[int, ...]]:
    """Keys and shapes of the state dict of the official GeneralizedRCNN (mask_rcnn_vitdet_convmae_b_25ep.py),
    written from reading its code: ConvViT at ``backbone.net``, SimpleFeaturePyramid ``simfp_*``, StandardRPNHead
    with two convs, FastRCNNConvFCHead / MaskRCNNConvUpsampleHead with LN (convs without bias), predictors.
    (``pixel_mean``/``pixel_std`` and the anchors are non-persistent buffers: not in the file.)"""
    c1, c2, c3 = embed_dims
    d = c3 // num_heads
    s = {}
    for i, (cin, cout, p) in enumerate([(3, c1, 4), (c1, c2, 2), (c2, c3, 2)], 1):
        s.update({f'backbone.net.patch_embed{i}.proj.weight': (cout, cin, p, p),
                  f'backbone.net.patch_embed{i}.proj.bias': (cout,),
                  f'backbone.net.patch_embed{i}.norm.weight': (cout,), f'backbone.net.patch_embed{i}.norm.bias': (cout,)})
    s.update({'backbone.net.patch_embed4.weight': (c3, c3), 'backbone.net.patch_embed4.bias': (c3,),
              'backbone.net.pos_embed': (1, 196, c3)})
    for stage, c in ((1, c1), (2, c2)):
        for i in range(depths[stage - 1]):
            b = f'backbone.net.blocks{stage}.{i}.'
            s.update({b + 'norm1.weight': (c,), b + 'norm1.bias': (c,), b + 'conv1.weight': (c, c, 1, 1),
                      b + 'conv1.bias': (c,), b + 'conv2.weight': (c, c, 1, 1), b + 'conv2.bias': (c,),
                      b + 'attn.weight': (c, 1, 5, 5), b + 'attn.bias': (c,), b + 'norm2.weight': (c,),
                      b + 'norm2.bias': (c,), b + 'mlp.fc1.weight': (4 * c, c, 1, 1), b + 'mlp.fc1.bias': (4 * c,),
                      b + 'mlp.fc2.weight': (c, 4 * c, 1, 1), b + 'mlp.fc2.bias': (c,)})
    for i in range(depths[2]):
        b, size = f'backbone.net.blocks3.{i}.', img_size // 16 if i in global_blocks else window
        s.update({b + 'norm1.weight': (c3,), b + 'norm1.bias': (c3,), b + 'attn.rel_pos_h': (2 * size - 1, d),
                  b + 'attn.rel_pos_w': (2 * size - 1, d), b + 'attn.qkv.weight': (3 * c3, c3),
                  b + 'attn.qkv.bias': (3 * c3,), b + 'attn.proj.weight': (c3, c3), b + 'attn.proj.bias': (c3,),
                  b + 'norm2.weight': (c3,), b + 'norm2.bias': (c3,), b + 'mlp.fc1.weight': (4 * c3, c3),
                  b + 'mlp.fc1.bias': (4 * c3,), b + 'mlp.fc2.weight': (c3, 4 * c3), b + 'mlp.fc2.bias': (c3,)})
    o = out_channels

    def conv_ln(key, cin):
        return {f'{key}.weight': (o, cin, 1, 1), f'{key}.norm.weight': (o,), f'{key}.norm.bias': (o,)}

    def conv3_ln(key):
        return {f'{key}.weight': (o, o, 3, 3), f'{key}.norm.weight': (o,), f'{key}.norm.bias': (o,)}

    p = 'backbone.simfp_'
    s.update({f'{p}2.0.weight': (c3, c3 // 2, 2, 2), f'{p}2.0.bias': (c3 // 2,), f'{p}2.1.weight': (c3 // 2,),
              f'{p}2.1.bias': (c3 // 2,), f'{p}2.3.weight': (c3 // 2, c3 // 4, 2, 2), f'{p}2.3.bias': (c3 // 4,),
              **conv_ln(f'{p}2.4', c3 // 4), **conv3_ln(f'{p}2.5'),
              f'{p}3.0.weight': (c3, c3 // 2, 2, 2), f'{p}3.0.bias': (c3 // 2,),
              **conv_ln(f'{p}3.1', c3 // 2), **conv3_ln(f'{p}3.2'),
              **conv_ln(f'{p}4.0', c3), **conv3_ln(f'{p}4.1'),
              **conv_ln(f'{p}5.1', c3), **conv3_ln(f'{p}5.2')})
    r, h = 'proposal_generator.rpn_head.', head_channels
    s.update({r + 'conv.conv0.weight': (o, o, 3, 3), r + 'conv.conv0.bias': (o,), r + 'conv.conv1.weight': (o, o, 3, 3),
              r + 'conv.conv1.bias': (o,), r + 'objectness_logits.weight': (3, o, 1, 1),
              r + 'objectness_logits.bias': (3,), r + 'anchor_deltas.weight': (12, o, 1, 1),
              r + 'anchor_deltas.bias': (12,)})
    for k in range(1, 5):
        s.update({f'roi_heads.box_head.conv{k}.weight': (h, o if k == 1 else h, 3, 3),
                  f'roi_heads.box_head.conv{k}.norm.weight': (h,), f'roi_heads.box_head.conv{k}.norm.bias': (h,),
                  f'roi_heads.mask_head.mask_fcn{k}.weight': (h, o if k == 1 else h, 3, 3),
                  f'roi_heads.mask_head.mask_fcn{k}.norm.weight': (h,),
                  f'roi_heads.mask_head.mask_fcn{k}.norm.bias': (h,)})
    s.update({'roi_heads.box_head.fc1.weight': (fc, h * 7 * 7), 'roi_heads.box_head.fc1.bias': (fc,),
              'roi_heads.box_predictor.cls_score.weight': (num_classes + 1, fc),
              'roi_heads.box_predictor.cls_score.bias': (num_classes + 1,),
              'roi_heads.box_predictor.bbox_pred.weight': (4 * num_classes, fc),
              'roi_heads.box_predictor.bbox_pred.bias': (4 * num_classes,),
              'roi_heads.mask_head.deconv.weight': (h, h, 2, 2), 'roi_heads.mask_head.deconv.bias': (h,),
              'roi_heads.mask_head.predictor.weight': (num_classes, h, 1, 1),
              'roi_heads.mask_head.predictor.bias': (num_classes,)})
    return s


FIXTURE_SIZES = dict(embed_dims=(32, 48, 96), depths=(1, 1, 4), num_heads=4, window=7, global_blocks=(1, 3),
                     img_size=256, out_channels=64)


def test_official_layout_agrees_with_the_fixture():
    """The written-out official layout, at the fixture's sizes, has exactly the fixture's backbone and pyramid
    keys and shapes (the heads' part cannot be checked against a released file)."""
    official = torch.load(FIXTURE, weights_only=True)['state_dict']
    shapes = official_detector_shapes(**FIXTURE_SIZES)
    backbone = {k[len('backbone.'):]: v for k, v in shapes.items() if k.startswith('backbone.')}
    assert backbone == {k: tuple(v.shape) for k, v in official.items()}


def test_convert_released_layout_matches_the_config_model(detector):
    """Every key of the official ConvMAE-B detector maps to a parameter of the config's model with its shape, and
    every parameter and buffer of the model gets one: a strict load (compared on shapes, meta tensors)."""
    official = {k: torch.empty(s, device='meta') for k, s in official_detector_shapes().items()}
    converted, dropped = convert_vitdet(official, 'official')
    assert dropped == []
    model = {k: tuple(v.shape) for k, v in detector.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == model


def convert_tool(capsys, *argv: str) -> str:
    """stdout of ``tools/convert_official.py ARGV``."""
    capsys.readouterr()
    load_tool('convert_official').main(list(argv))
    return capsys.readouterr().out


def test_convert_tool_strict_load_and_refusals(tmp_path, capsys):
    """tools/convert_official.py vitdet on a full official-layout detector of the tiny config: the result loads
    strictly, every tensor where the rules say; unknown keys and other kinds are refused."""
    from mmdet.registry import MODELS
    cfg = testing.tiny_vitdet_config(str(tmp_path / 'coco'), str(tmp_path / 'work'))
    tiny = cfg.model.backbone
    shapes = official_detector_shapes(
        embed_dims=tiny.embed_dims, depths=tiny.depths, num_heads=tiny.num_heads, window=tiny.window_size,
        global_blocks=tiny.global_attn_indexes, img_size=tiny.img_size, out_channels=testing.TINY_DET_CHANNELS,
        head_channels=testing.TINY_DET_CHANNELS, fc=128, num_classes=len(testing.DET_CLASSES))
    shapes['backbone.net.pos_embed'] = (1, (tiny.pos_embed_grid) ** 2, tiny.embed_dims[2])
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    src, dst = str(tmp_path / 'model_final.pth'), str(tmp_path / 'converted.pth')
    torch.save({'model': state, 'iteration': 184374}, src)
    assert convert_tool(capsys, 'vitdet', src, dst) == f'wrote {len(state)} tensors to {dst}\n'  # no missing part

    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    converted = safe_torch_load(dst)
    assert converted['meta']['dataset_meta']['classes'][0] == 'person'
    model.load_state_dict(converted['state_dict'], strict=True)
    ours = model.state_dict()
    for src_key, dst_key in [('backbone.net.blocks3.1.attn.rel_pos_h', 'backbone.blocks3.1.attn.rel_pos_h'),
                             ('backbone.simfp_2.4.norm.weight', 'neck.simfp_2.4.norm.weight'),
                             ('proposal_generator.rpn_head.conv.conv1.weight', 'rpn_head.rpn_conv.1.conv.weight'),
                             ('roi_heads.box_head.conv4.norm.bias', 'roi_head.bbox_head.shared_convs.3.ln.bias'),
                             ('roi_heads.box_head.fc1.weight', 'roi_head.bbox_head.shared_fcs.0.weight'),
                             ('roi_heads.mask_head.mask_fcn1.weight', 'roi_head.mask_head.convs.0.conv.weight'),
                             ('roi_heads.mask_head.deconv.weight', 'roi_head.mask_head.upsample.weight'),
                             ('roi_heads.mask_head.predictor.bias', 'roi_head.mask_head.conv_logits.bias')]:
        assert torch.equal(ours[dst_key], state[src_key]), src_key

    # a key the official model does not have (BN statistics in an LN head) is refused, naming it
    bad = dict(state, **{'roi_heads.box_head.conv1.norm.running_mean': torch.zeros(64)})
    with pytest.raises(CheckpointError, match=re.escape('roi_heads.box_head.conv1.norm.running_mean')):
        convert_vitdet(bad, 'bad.pth')
    # the other detector format is told apart, both ways
    torch.save({'model': state}, src)
    with pytest.raises(CheckpointError, match="looks like a 'vitdet' checkpoint"):
        convert('det', src, dst)
    det_like = {'backbone.bottom_up.patch_embed1.proj.weight': torch.zeros(1)}
    with pytest.raises(CheckpointError, match='missing expected keys'):
        convert_vitdet(det_like, 'det.pth')


def test_convert_backbone_and_pyramid_only(tmp_path, capsys):
    """A checkpoint with only backbone.net.* and backbone.simfp_* converts, with one line naming what it lacks."""
    official = torch.load(FIXTURE, weights_only=True)['state_dict']
    src, dst = str(tmp_path / 'backbone.pth'), str(tmp_path / 'out.pth')
    torch.save({'model': {f'backbone.{k}': v for k, v in official.items()}}, src)
    lines = convert_tool(capsys, 'vitdet', src, dst).splitlines()
    assert lines == [f'wrote {len(official)} tensors to {dst}',
                     f'{src} holds no RPN head, box head, mask head weights: {dst} has the rest only (the missing '
                     'parts keep their initialisation when loaded)']
    converted = safe_torch_load(dst)['state_dict']
    assert {k.split('.')[0] for k in converted} == {'backbone', 'neck'}


# ------------------------------------------------------------------------------------------------ training
def test_vitdet_config_trains_and_evaluates(tmp_path):
    """The tiny config through mmdet's own tools/train.py (4 iterations, evaluation) from a pretraining
    checkpoint, then 2 more iterations through ours resumed from it; the layer-decay groups reach the optimizer."""
    from convmae_backbone import ConvMAEPretrainer
    torch.manual_seed(0)
    pre = ConvMAEPretrainer(**testing.TINY_BACKBONE, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
    pre.init_weights()
    ckpt = str(tmp_path / 'pretrain.pth')
    torch.save(dict(meta=dict(epoch=1), state_dict=pre.state_dict()), ckpt)
    data = testing.write_coco_dataset(str(tmp_path / 'coco'), num_train=4, num_val=2, size=(96, 96))
    work = str(tmp_path / 'work')
    os.makedirs(work)
    cfg = testing.tiny_vitdet_config(data, work, checkpoint=ckpt, max_iters=4)
    config = osp.join(work, 'vitdet_tiny.py')
    cfg.dump(config)
    proc = testing.run_train_tool('mmdet', config, work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f'ConvMAE weights from {ckpt}' in proc.stdout + proc.stderr
    metrics = testing.read_val_metrics(work)
    for key in ('coco/bbox_mAP', 'coco/segm_mAP'):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics)
    state = safe_torch_load(osp.join(work, 'iter_4.pth'))
    groups = state['optimizer']['param_groups']
    by_layer = {(g['layer_id'], g['weight_decay']): g for g in groups}
    assert {layer for layer, _ in by_layer} == {0, 1, 2, 3}  # 2 stage-3 blocks
    for (layer, _), g in by_layer.items():
        assert g['initial_lr'] == pytest.approx(2e-4 * 0.8 ** (3 - layer), rel=1e-9)
    assert 'backbone.pos_embed' in by_layer[(3, 0.0)]['param_names']
    assert not torch.equal(state['state_dict']['backbone.pos_embed'], pre.state_dict()['pos_embed'])  # trained

    # this project's tools/train.py continues the run (iterations 5-6) and evaluates again
    proc = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'train.py'), config, '--work-dir', work,
                           '--resume', '--cfg-options', 'train_cfg.max_iters=6', 'train_cfg.val_interval=6',
                           'default_hooks.checkpoint.interval=6'],
                          capture_output=True, text=True, timeout=600, cwd=work, env=testing.child_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'resumed epoch: 0, iter: 4' in proc.stdout + proc.stderr
    assert safe_torch_load(osp.join(work, 'iter_6.pth'))['meta']['iter'] == 6
    assert 'coco/segm_mAP' in testing.read_val_metrics(work)
