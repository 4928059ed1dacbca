"""The full downstream configs: the recipe they encode, and that they build ConvMAE-Base models that run."""
import copy
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope

import convmae_backbone  # noqa: F401
from helpers import lr_curve, sync_bn_to_bn

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DET_CONFIG = osp.join(REPO, 'configs', 'mmdet', 'mask-rcnn_convmae-b_fpn_lsj-25e_coco.py')
SEG_CONFIG = osp.join(REPO, 'configs', 'mmseg', 'upernet_convmae-b_8xb2-160k_ade20k-512x512.py')


def _transform(pipeline, type_name):
    return next(t for t in pipeline if t['type'] == type_name)


# ------------------------------------------------------------------------------------------ detection
@pytest.fixture(scope='module')
def det_cfg():
    return Config.fromfile(DET_CONFIG)


@pytest.fixture(scope='module')
def detector(det_cfg):
    from mmdet.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(sync_bn_to_bn(copy.deepcopy(det_cfg.model)))
    return model.eval()


def test_det_config_recipe(det_cfg):
    """The official DET recipe (DET/configs/convmae/convmae_base_mask_rcnn_FPN_25ep.py), value by value."""
    assert det_cfg.default_scope == 'mmdet'
    assert det_cfg.custom_imports.imports == ['convmae_backbone']
    bb = det_cfg.model.backbone
    assert bb.type == 'ConvMAE' and bb.img_size == 1024  # the 64x64 grid of pos_embed and the global table
    assert bb.arch == 'base' and not {'embed_dims', 'depths', 'num_heads', 'mlp_ratios'} & set(bb)
    assert bb.window_size == 16 and tuple(bb.global_attn_indexes) == (0, 3, 6, 10)
    assert bb.rel_pos_bias == 'shared' and 'use_rel_pos_bias' not in bb
    assert bb.norm_eps == 1e-6 and bb.freeze_pos_embed is True and bb.h32 == 'maxpool'
    assert bb.drop_path_rate == 0.1 and tuple(bb.out_indices) == (0, 1, 2, 3)
    assert bb.init_cfg == dict(type='Pretrained', checkpoint=det_cfg.pretrained)
    assert 'depth' not in bb and 'norm_eval' not in bb  # the ResNet settings of the base are gone
    neck, roi = det_cfg.model.neck, det_cfg.model.roi_head
    assert neck.in_channels == [256, 384, 768, 768] and neck.num_outs == 5
    assert neck.norm_cfg.type == roi.bbox_head.norm_cfg.type == roi.mask_head.norm_cfg.type == 'SyncBN'
    assert det_cfg.model.rpn_head.num_convs == 2
    assert roi.bbox_head.type == 'Shared4Conv1FCBBoxHead'
    assert det_cfg.model.data_preprocessor.batch_augments[0].size == (1024, 1024)
    assert det_cfg.model.data_preprocessor.mean == [123.675, 116.28, 103.53]
    assert det_cfg.model.data_preprocessor.std == [58.395, 57.12, 57.375]
    assert det_cfg.model.data_preprocessor.bgr_to_rgb

    train_pipeline = det_cfg.train_dataloader.dataset.dataset.pipeline
    resize = _transform(train_pipeline, 'RandomResize')
    assert resize.scale == (1024, 1024) and resize.ratio_range == (0.1, 2.0)
    assert _transform(train_pipeline, 'RandomCrop').crop_size == (1024, 1024)
    assert _transform(train_pipeline, 'RandomFlip').prob == 0.5
    assert det_cfg.train_dataloader.dataset.times == 1
    # test: longer side 1024, padded to 1024x1024 (detectron2's ResizeShortestEdge(1024, 1024) + FixedSizeCrop)
    test_pipeline = det_cfg.test_dataloader.dataset.pipeline
    assert _transform(test_pipeline, 'Resize').scale == (1024, 1024) and _transform(test_pipeline, 'Resize').keep_ratio
    assert det_cfg.model.data_preprocessor.pad_size_divisor == 1024

    ow = det_cfg.optim_wrapper
    assert ow.type == 'AmpOptimWrapper' and 'constructor' not in ow  # no layer decay
    assert ow.optimizer == dict(type='AdamW', lr=8e-5, betas=(0.9, 0.999), weight_decay=0.1)
    assert ow.paramwise_cfg == dict(norm_decay_mult=0.0, custom_keys={
        'pos_embed': dict(decay_mult=0.0), 'relative_position_bias_table': dict(decay_mult=0.0)})
    warmup, cosine = det_cfg.param_scheduler
    # 0.5% of the official 92,187 iterations, from 0.001; cosine to 0 over all iterations
    assert (warmup.type, warmup.start_factor, warmup.by_epoch, warmup.begin, warmup.end) == (
        'LinearLR', 0.001, False, 0, 462)
    assert (cosine.type, cosine.eta_min, cosine.begin, cosine.end, cosine.by_epoch, cosine.convert_to_iter_based) == (
        'CosineAnnealingLR', 0.0, 0, 25, True, True)
    assert det_cfg.train_cfg.max_epochs == 25
    assert det_cfg.train_dataloader.batch_size * 8 == det_cfg.auto_scale_lr.base_batch_size == 32


def test_det_lr_schedule_follows_detectron2(det_cfg):
    """Warm-up and cosine as detectron2's WarmupParamScheduler(CosineParamScheduler(1, 0), warmup_length=0.005,
    warmup_factor=0.001) over the official 92,187 iterations (here 25 epochs of 3687.48 iterations: 25 x 3687)."""
    import math
    max_iter = 25 * 3687
    lrs = lr_curve(det_cfg.param_scheduler, 1200, iters_per_epoch=3687)

    def official(t):
        cosine = lambda x: 0.5 * (1 + math.cos(math.pi * x))  # noqa: E731
        where, warm = t / max_iter, 0.005
        if where < warm:
            return 0.001 + (cosine(warm) - 0.001) * where / warm
        return cosine(where)

    assert max(abs(lr - official(t)) / official(t) for t, lr in enumerate(lrs)) < 3e-4
    assert lrs[500:] == pytest.approx([official(t) for t in range(500, 1200)], rel=1e-9)


def test_det_checkpoint_override(det_cfg):
    cfg = Config.fromfile(DET_CONFIG)
    cfg.merge_from_dict({'model.backbone.init_cfg.checkpoint': '/weights/convmae.pth'})
    assert cfg.model.backbone.init_cfg.checkpoint == '/weights/convmae.pth'
    assert det_cfg.model.backbone.init_cfg.checkpoint == 'checkpoints/convmae-b_8xb128-1600e_in1k.pth'


def test_detector_features_and_prediction(detector):
    from mmdet.structures import DetDataSample
    assert type(detector.backbone).__name__ == 'ConvMAE'
    assert len(detector.backbone.blocks3) == 11
    assert not any(b.attn.use_rel_pos for b in detector.backbone.blocks3)  # the tables are shared
    assert detector.backbone.windowed_rel_pos_bias.relative_position_bias_table.shape == (31 * 31, 12)
    assert detector.backbone.global_rel_pos_bias.relative_position_bias_table.shape == (127 * 127, 12)
    assert detector.backbone.pos_embed.shape == (1, 64 * 64, 768) and not detector.backbone.pos_embed.requires_grad
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        maps = detector.backbone(x)
        feats = detector.extract_feat(x)
    assert [tuple(m.shape) for m in maps] == [(1, 256, 32, 24), (1, 384, 16, 12), (1, 768, 8, 6), (1, 768, 4, 3)]
    assert [tuple(f.shape) for f in feats] == [(1, 256, 32, 24), (1, 256, 16, 12), (1, 256, 8, 6),
                                                (1, 256, 4, 3), (1, 256, 2, 2)]
    sample = DetDataSample(metainfo=dict(img_shape=(128, 96), ori_shape=(128, 96), scale_factor=(1.0, 1.0),
                                         pad_shape=(128, 96), batch_input_shape=(128, 96)))
    with torch.no_grad():
        result = detector.predict(x, [sample])[0]
    inst = result.pred_instances
    assert inst.bboxes.shape[1] == 4 and len(inst.bboxes) == len(inst.scores) == len(inst.masks)
    assert len(inst.bboxes) <= 100
    if len(inst.bboxes):
        assert float(inst.bboxes[:, 2].max()) <= 96 + 1e-3 and tuple(inst.masks.shape[1:]) == (128, 96)


def test_det_test_inputs_are_padded_to_1024(detector):
    """Every test image (longer side 1024) reaches the backbone as 1024x1024, the grid of its position embedding
    and global table; img_shape keeps the real extent, so boxes are clipped to the image, not to the padding."""
    from mmdet.structures import DetDataSample
    sample = DetDataSample(metainfo=dict(img_shape=(683, 1024), ori_shape=(480, 720), scale_factor=(1.42, 1.42)))
    data = dict(inputs=[torch.randint(0, 256, (3, 683, 1024), dtype=torch.uint8)], data_samples=[sample])
    out = detector.data_preprocessor(data, training=False)
    assert tuple(out['inputs'].shape) == (1, 3, 1024, 1024)
    assert out['data_samples'][0].img_shape == (683, 1024)
    assert torch.all(out['inputs'][0, :, 683:] == 0)  # padded with the mean colour


def test_det_weight_decay_groups(det_cfg, detector):
    optim_cfg = det_cfg.optim_wrapper.copy()
    optim_cfg.type = 'OptimWrapper'
    optim_wrapper = build_optim_wrapper(detector, optim_cfg)
    ids = {id(p): n for n, p in detector.named_parameters()}
    wd = {ids[id(p)]: g['weight_decay'] for g in optim_wrapper.optimizer.param_groups for p in g['params']}
    assert set(wd) == {n for n, p in detector.named_parameters() if p.requires_grad}
    # as detectron2's get_default_optimizer_params(weight_decay_norm=0, overrides={pos_embed, tables: 0})
    for name in ('backbone.windowed_rel_pos_bias.relative_position_bias_table',
                 'backbone.global_rel_pos_bias.relative_position_bias_table',
                 'backbone.blocks3.1.norm1.weight', 'backbone.patch_embed2.norm.weight',
                 'backbone.blocks1.0.norm2.bias', 'neck.fpn_convs.0.bn.weight',
                 'roi_head.bbox_head.shared_convs.0.bn.weight'):
        assert wd[name] == 0.0, name
    # biases of linear and conv layers are decayed (detectron2's weight_decay_bias defaults to weight_decay)
    for name in ('backbone.blocks3.1.attn.qkv.weight', 'backbone.blocks3.1.attn.qkv.bias',
                 'backbone.patch_embed1.proj.weight', 'backbone.patch_embed1.proj.bias',
                 'neck.lateral_convs.0.conv.weight', 'rpn_head.rpn_conv.0.conv.weight',
                 'roi_head.bbox_head.fc_cls.weight', 'roi_head.bbox_head.fc_cls.bias'):
        assert wd[name] == 0.1, name
    frozen = [n for n, p in detector.named_parameters() if not p.requires_grad]
    assert frozen == ['backbone.pos_embed']  # the official detection backbone freezes it
    lrs = {g['lr'] for g in optim_wrapper.optimizer.param_groups}
    assert lrs == {8e-5}  # no layer decay


# --------------------------------------------------------------------------------------- segmentation
@pytest.fixture(scope='module')
def seg_cfg():
    return Config.fromfile(SEG_CONFIG)


def test_seg_config_recipe(seg_cfg):
    """The official SEG recipe (SEG/configs/convmae/upernet_convmae_base_512_slide_160k_ade20k.py), value by
    value."""
    assert seg_cfg.default_scope == 'mmseg'
    assert seg_cfg.custom_imports.imports == ['convmae_backbone']
    bb = seg_cfg.model.backbone
    assert bb.type == 'ConvMAE' and bb.img_size == 512 and bb.arch == 'base'
    assert not {'embed_dims', 'depths', 'num_heads', 'mlp_ratios'} & set(bb)
    assert bb.rel_pos_bias == 'per_block' and 'use_rel_pos_bias' not in bb and 'window_size' not in bb
    assert bb.layer_scale_init_value == 1.0 and bb.drop_path_rate == 0.2 and bb.norm_eps == 1e-5
    assert bb.h32 == 'fpn' and bb.fpn_norm_cfg.type == 'SyncBN' and not bb.get('freeze_pos_embed', False)
    assert tuple(bb.out_indices) == (0, 1, 2, 3) and bb.init_cfg.checkpoint == seg_cfg.pretrained
    assert seg_cfg.model.pretrained is None and 'depth' not in bb
    assert seg_cfg.model.decode_head.type == 'UPerHead'
    assert seg_cfg.model.decode_head.in_channels == [256, 384, 768, 768]
    assert seg_cfg.model.decode_head.channels == 768 and seg_cfg.model.decode_head.pool_scales == (1, 2, 3, 6)
    assert seg_cfg.model.auxiliary_head.in_channels == 768 and seg_cfg.model.auxiliary_head.channels == 256
    assert seg_cfg.model.auxiliary_head.loss_decode.loss_weight == 0.4
    assert seg_cfg.model.auxiliary_head.type == 'FCNHead' and seg_cfg.model.auxiliary_head.in_index == 2
    assert seg_cfg.model.decode_head.num_classes == seg_cfg.model.auxiliary_head.num_classes == 150
    assert seg_cfg.model.test_cfg == dict(mode='slide', crop_size=(512, 512), stride=(341, 341))
    assert _transform(seg_cfg.train_dataloader.dataset.pipeline, 'RandomCrop').crop_size == (512, 512)
    assert seg_cfg.train_dataloader.batch_size * 8 == 16

    ow = seg_cfg.optim_wrapper
    assert ow.type == 'AmpOptimWrapper' and ow.constructor == 'ConvMAELayerDecayOptimWrapperConstructor'
    assert ow.optimizer == dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
    assert ow.paramwise_cfg == dict(num_layers=11, layer_decay_rate=0.75, decay_position=True)
    warmup, poly = seg_cfg.param_scheduler
    # mmcv 1.x: linear warm-up from 1e-6 multiplies the poly schedule, which runs over all iterations
    assert (warmup.type, warmup.start_factor, warmup.by_epoch, warmup.begin, warmup.end) == (
        'LinearLR', 1e-6, False, 0, 1501)
    assert (poly.type, poly.power, poly.eta_min, poly.by_epoch, poly.begin, poly.end) == (
        'PolyLR', 1.0, 0.0, False, 0, 160001)
    assert seg_cfg.train_cfg.max_iters == 160000


def test_seg_lr_schedule_follows_mmcv(seg_cfg):
    """As mmcv 1.x's PolyLrUpdaterHook(power=1, min_lr=0) with warmup='linear', warmup_iters=1500,
    warmup_ratio=1e-6 over 160k iterations: lr(t) = poly(t) * (1 - (1 - t / 1500) * (1 - 1e-6)) while warming up."""
    lrs = lr_curve(seg_cfg.param_scheduler, 1700)

    def official(t):
        poly = 1 - t / 160000
        return poly * (1 - (1 - t / 1500) * (1 - 1e-6)) if t < 1500 else poly

    assert lrs == pytest.approx([official(t) for t in range(1700)], rel=1e-9)


def test_segmentor_forward(seg_cfg):
    from mmseg.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(sync_bn_to_bn(copy.deepcopy(seg_cfg.model))).eval()
    assert all(b.gamma_1 is not None and b.attn.rel_pos == 'table' for b in model.backbone.blocks3)
    assert model.backbone.blocks3[0].attn.relative_position_bias_table.shape == (63 * 63, 12)
    assert model.backbone.blocks3[0].norm1.eps == 1e-5 and model.backbone.pos_embed.requires_grad
    assert [type(m).__name__ for m in model.backbone.fpn] == ['Conv2d', 'BatchNorm2d', 'GELU']
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        maps = model.backbone(x)
        logits = model(x, mode='tensor')
    # the fpn branch: (8 - 3) // 2 + 1 = 3 at H/32
    assert [tuple(m.shape) for m in maps] == [(1, 256, 32, 32), (1, 384, 16, 16), (1, 768, 8, 8), (1, 768, 3, 3)]
    assert tuple(logits.shape) == (1, 150, 32, 32)
    assert torch.isfinite(logits).all()
