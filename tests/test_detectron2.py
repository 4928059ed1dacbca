"""The detectron2 face (``convmae_backbone.detectron2``): both official detectors' configs build detectron2 models
that load the released checkpoint layout through ``DetectionCheckpointer`` and reproduce the official backbones.

Parity: ``fixtures/official_vitdet_small.pt`` (OpenGVLab/Official-ConvMAE-Det ``ConvViT`` + detectron2's
``SimpleFeaturePyramid``, at 256x256 and 192x256) and the ``det`` entry of ``fixtures/official_downstream_small.pt``
(Alpha-VL/ConvMAE ``ConvViTDet``) (see fixtures/README.md). The detectron2 models are the shipped
``configs/detectron2`` files with only the backbone sizes (and, for the ViTDet one, the pyramid and head channels)
changed, loaded from a detector checkpoint in the official layout; outputs and gradients within 1e-6 (relative to
each tensor's largest magnitude) in float64.
"""
import logging
import pickle
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, TINY_ARCH, rel_err
from torch import Tensor, nn

pytest.importorskip('detectron2')  # built by `make install` (tools/install_detectron2.sh)
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import LazyConfig, get_cfg, instantiate  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import FPN, build_backbone  # noqa: E402
from detectron2.modeling.backbone.vit import SimpleFeaturePyramid  # noqa: E402
from detectron2.structures import BitMasks, Boxes, ImageList, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from convmae_backbone import ConvMAEPretrainer  # noqa: E402
from convmae_backbone.detectron2 import (ConvViT, ConvViTDet, add_convmae_config, get_vit_lr_decay_rate,  # noqa: E402
                                         lsj_postprocess)
from convmae_backbone.models.utils import resize_pos_embed  # noqa: E402

CONFIGS = ROOT / 'configs' / 'detectron2'
VITDET = CONFIGS / 'mask_rcnn_vitdet_convmae_b_25ep.py'
DET = CONFIGS / 'mask_rcnn_convmae_b_fpn_25ep.py'
FIXTURES = ROOT / 'tests' / 'fixtures'
TOL = 1e-6
LEVELS = ('p2', 'p3', 'p4', 'p5', 'p6')
#: What fvcore's checkpointer logs for missing, unexpected or shape-mismatched (dropped) keys.
LOAD_PROBLEMS = ('not found in the checkpoint', 'not used by the model', 'Skip loading')


@pytest.fixture(scope='module')
def vitdet_fixture() -> dict:
    return torch.load(FIXTURES / 'official_vitdet_small.pt', weights_only=True)


@pytest.fixture(scope='module')
def det_fixture() -> dict:
    return torch.load(FIXTURES / 'official_downstream_small.pt', weights_only=True)['det']


def vitdet_model(fixture: dict, **net_changes) -> nn.Module:
    """The shipped ViTDet-style config's Mask R-CNN with the fixture's backbone sizes and pyramid channels."""
    cfg = LazyConfig.load(str(VITDET))
    net = {k: v for k, v in fixture['config']['net'].items()
           if k not in ('norm_layer', 'act_layer', 'global_block_indexes')}
    cfg.model.backbone.net.update(dict(net, **net_changes))
    channels = fixture['config']['pyramid']['out_channels']
    cfg.model.backbone.out_channels = channels
    cfg.model.proposal_generator.head.in_channels = channels
    cfg.model.roi_heads.box_head.input_shape = ShapeSpec(channels=channels, height=7, width=7)
    cfg.model.roi_heads.mask_head.input_shape = ShapeSpec(channels=channels, width=14, height=14)
    return instantiate(cfg.model)


def det_model(fixture: dict, **bottom_up_changes) -> nn.Module:
    """The shipped FPN config's Mask R-CNN with the fixture's backbone sizes (three numbers per size)."""
    cfg = LazyConfig.load(str(DET))
    c = fixture['config']
    cfg.model.backbone.bottom_up.update(dict(
        img_size=c['img_size'], patch_size=(4, 2, 2), embed_dim=c['embed_dims'], depth=c['depths'],
        num_heads=c['num_heads'], window_size=c['window_size'], drop_path_rate=0.0), **bottom_up_changes)
    return instantiate(cfg.model)


def official_detector_file(path: Path, model: nn.Module, backbone_prefix: str, backbone: Dict[str, Tensor]) -> Path:
    """A detector checkpoint in the official layout: ``{'model': ..., 'iteration': ...}``, the backbone's official
    keys under ``backbone_prefix`` and the heads' weights beside them."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(backbone_prefix)}
    state.update({backbone_prefix + k: v for k, v in backbone.items()})
    torch.save({'model': state, 'iteration': 184374}, path)
    return path


def load(model: nn.Module, path: Path, caplog) -> None:
    """``DetectionCheckpointer(model).load(path)``, asserting that no key was missing, unexpected or dropped."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        DetectionCheckpointer(model).load(str(path))
    problems = [r.getMessage() for r in caplog.records if any(p in r.getMessage() for p in LOAD_PROBLEMS)]
    assert not problems, problems


@pytest.fixture(scope='module')
def vitdet_file(vitdet_fixture, tmp_path_factory) -> Path:
    model = vitdet_model(vitdet_fixture)
    return official_detector_file(tmp_path_factory.mktemp('vitdet') / 'model_final.pth', model, 'backbone.',
                                  vitdet_fixture['state_dict'])


@pytest.fixture(scope='module')
def det_file(det_fixture, tmp_path_factory) -> Path:
    model = det_model(det_fixture)
    return official_detector_file(tmp_path_factory.mktemp('det') / 'model_final.pth', model, 'backbone.bottom_up.',
                                  det_fixture['state_dict'])


# ------------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize('entry', ['native', 'second'])
def test_vitdet_config_reproduces_official(entry, vitdet_fixture, vitdet_file, caplog):
    model = vitdet_model(vitdet_fixture)
    load(model, vitdet_file, caplog)
    pyramid = model.backbone
    assert isinstance(pyramid, SimpleFeaturePyramid) and isinstance(pyramid.net, ConvViT)
    state = pyramid.state_dict()
    assert sorted(state) == sorted(vitdet_fixture['state_dict'])
    assert all(torch.equal(state[k], v) for k, v in vitdet_fixture['state_dict'].items())
    assert {n: p.requires_grad for n, p in pyramid.named_parameters()} == vitdet_fixture['requires_grad']

    ref = vitdet_fixture[entry]
    pyramid.double().train().zero_grad()
    captured = {}
    pyramid.net.register_forward_hook(lambda m, args, out: captured.update(out))
    maps = pyramid(ref['images'].double())
    loss = sum((maps[k] * ref['loss_weights'][k].double()).sum() for k in LEVELS)
    loss.backward()
    assert loss.item() == pytest.approx(ref['loss'].item(), rel=TOL)
    assert captured['last_feat'].shape == ref['last_feat'].shape
    assert rel_err(captured['last_feat'], ref['last_feat']) < TOL
    for k in LEVELS:
        assert maps[k].shape == ref['pyramid'][k].shape, k
        assert rel_err(maps[k], ref['pyramid'][k]) < TOL, k
    params = dict(pyramid.named_parameters())
    for name, grad in ref['grads'].items():
        assert rel_err(params[name].grad, grad) < TOL, name


def official_loss(outputs: List[Tensor], seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outputs)


def test_fpn_config_reproduces_official(det_fixture, det_file, caplog):
    model = det_model(det_fixture)
    load(model, det_file, caplog)  # relative_position_index buffers dropped silently (recomputed)
    assert isinstance(model.backbone, FPN) and isinstance(model.backbone.bottom_up, ConvViTDet)
    bottom_up = model.backbone.bottom_up
    official = {k: v for k, v in det_fixture['state_dict'].items() if not k.endswith('relative_position_index')}
    state = bottom_up.state_dict()
    assert sorted(state) == sorted(official)
    assert all(torch.equal(state[k], v) for k, v in official.items())
    for name, buf in bottom_up.named_buffers():
        if name.endswith('relative_position_index'):
            assert torch.equal(buf, det_fixture['state_dict'][name]), name
    assert {n: p.requires_grad for n, p in bottom_up.named_parameters()} == det_fixture['requires_grad']

    bottom_up.double().train().zero_grad()
    images = det_fixture['images'].double()
    out = bottom_up(ImageList(images, [images.shape[-2:]] * len(images)))  # as the official meta-arch passes
    maps = [out[k] for k in ('s0', 's1', 's2', 's3')]
    official_loss(maps, det_fixture['grad_seed']).backward()
    for mine, ref in zip(maps, det_fixture['features']):
        assert mine.shape == ref.shape and rel_err(mine, ref) < TOL
    params = dict(bottom_up.named_parameters())
    for name, grad in det_fixture['grads'].items():
        assert rel_err(params[name].grad, grad) < TOL, name


def test_fpn_backbone_at_another_input_size_resizes_at_load(det_fixture, det_file, caplog):
    """The official ConvViTDet runs at its img_size only; ours at any size. Built for 160 and loaded from the
    128 checkpoint, the position table and the global table are resized by the checkpointer (detectron2 would
    drop them as shape mismatches), and the result equals the 128 model resizing them at forward."""
    small, large = det_model(det_fixture), det_model(det_fixture, img_size=160)
    load(small, det_file, caplog)
    load(large, det_file, caplog)
    pos = det_fixture['state_dict']['pos_embed']
    assert torch.allclose(large.backbone.bottom_up.pos_embed, resize_pos_embed(pos, (8, 8), (10, 10)), atol=1e-7)
    assert large.backbone.bottom_up.global_rel_pos_bias.relative_position_bias_table.shape == (19 * 19, 4)
    x = torch.randn(1, 3, 160, 160, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = small.backbone.bottom_up.double().eval()(x)
        b = large.backbone.bottom_up.double().eval()(x)
    for k in ('s0', 's1', 's2', 's3'):
        assert rel_err(a[k], b[k]) < 1e-5, k  # float32 weights resized at load vs in float64 at forward


def test_vitdet_backbone_for_another_size_resizes_global_tables(vitdet_fixture, vitdet_file, caplog):
    model = vitdet_model(vitdet_fixture, img_size=320)
    load(model, vitdet_file, caplog)
    net, ref = model.backbone.net, vitdet_fixture['state_dict']['net.blocks3.1.attn.rel_pos_h']
    assert net.blocks3[1].attn.rel_pos_h.shape == (39, 24)  # global block: 2 * 320 / 16 - 1
    expected = F.interpolate(ref.t()[None], size=39, mode='linear').squeeze(0).t()
    assert torch.allclose(net.blocks3[1].attn.rel_pos_h, expected)
    assert torch.equal(net.blocks3[0].attn.rel_pos_h, vitdet_fixture['state_dict']['net.blocks3.0.attn.rel_pos_h'])


# ------------------------------------------------------------------------------------- pretraining checkpoints
@pytest.mark.parametrize('layout', ['official', 'ours'])
@pytest.mark.parametrize('detector', ['vitdet', 'fpn'])
def test_pretraining_checkpoints_load_into_the_encoder(detector, layout, official, tmp_path, caplog):
    """A pretraining checkpoint (official ``{'model': ...}`` or this project's mmengine one, the pretrainer's
    decoder and fusion included) as ``train.init_checkpoint``: its encoder weights fill the detector's encoder
    (position table resized to the FPN model's grid), nothing else is touched."""
    sizes = dict(embed_dim=tuple(TINY_ARCH['embed_dims']), depth=tuple(TINY_ARCH['depths']),
                 num_heads=TINY_ARCH['num_heads'])
    if layout == 'official':
        weights = official['state_dict']
        path = tmp_path / 'convmae_base.pth'
        torch.save({'model': weights}, path)
    else:
        torch.manual_seed(0)
        weights = ConvMAEPretrainer(img_size=224, **TINY_ARCH).state_dict()
        path = tmp_path / 'epoch_1600.pth'
        torch.save({'meta': {'epoch': 1600, 'iter': 2}, 'state_dict': weights}, path)
    if detector == 'vitdet':
        model = vitdet_model({'config': {'net': dict(sizes, img_size=64, window_size=2, window_block_indexes=[0],
                                                     drop_path_rate=0.0), 'pyramid': {'out_channels': 32}}})
        encoder = model.backbone.net
    else:
        model = det_model({'config': dict(img_size=128, embed_dims=sizes['embed_dim'], depths=sizes['depth'],
                                          num_heads=sizes['num_heads'], window_size=4)}, global_attn_indexes=(1,))
        encoder = model.backbone.bottom_up
    heads = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith('backbone.')}
    with caplog.at_level(logging.INFO):
        DetectionCheckpointer(model).load(str(path))
    state = encoder.state_dict()
    assert set(state) - set(weights) == {k for k in state if 'rel_pos' in k}  # no relative position in pretraining
    for k, v in state.items():
        if k not in weights:
            continue
        expected = weights[k]
        if k == 'pos_embed' and detector == 'fpn':
            expected = resize_pos_embed(expected, (14, 14), (8, 8))
        assert torch.allclose(v, expected, atol=1e-6), k
    assert all(torch.equal(model.state_dict()[k], v) for k, v in heads.items())


# ------------------------------------------------------------------------------------------- the d2 interface
def test_backbones_declare_shapes_and_padding():
    net = ConvViT(img_size=64, embed_dim=(16, 32, 64), depth=(1, 1, 2), num_heads=4, window_size=2,
                  window_block_indexes=[0], use_rel_pos=True)
    assert net.output_shape() == {'last_feat': ShapeSpec(channels=64, stride=16)}
    assert net.size_divisibility == 16 and net.padding_constraints == {'size_divisibility': 16}
    assert net(torch.randn(1, 3, 48, 80))['last_feat'].shape == (1, 64, 3, 5)
    bottom_up = ConvViTDet(window_size=2, img_size=64, embed_dim=(16, 32, 64), depth=(1, 1, 4), num_heads=4,
                           global_attn_indexes=(0, 3))
    assert {k: (s.channels, s.stride) for k, s in bottom_up.output_shape().items()} == {
        's0': (16, 4), 's1': (32, 8), 's2': (64, 16), 's3': (64, 32)}
    assert bottom_up.size_divisibility == 32
    out = bottom_up(torch.randn(1, 3, 64, 96))  # not the official 1024x1024 only
    assert [tuple(out[k].shape[2:]) for k in ('s0', 's1', 's2', 's3')] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_official_det_arguments_build_convmae_base():
    """The official config's ViT-B numbers (patch 16, dim 768, depth 12) are ignored as by the official class."""
    cfg = LazyConfig.load(str(DET))
    bottom_up = cfg.model.backbone.bottom_up
    bottom_up.img_size = 64
    model = instantiate(bottom_up)
    assert model.embed_dims == (256, 384, 768) and model.depths == (2, 2, 11) and model.patch_sizes == (4, 2, 2)
    assert [b.window_size for b in model.blocks3] == [0, 16, 16, 0, 16, 16, 0, 16, 16, 16, 0]
    assert not model.pos_embed.requires_grad  # sincos_pos_embed=True: frozen, as officially


def test_with_cp_checkpoints_activations(monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, 'checkpoint', lambda *a, **k: calls.append(1) or real(*a, **k))
    net = ConvViT(img_size=32, embed_dim=(8, 16, 32), depth=(1, 1, 1), num_heads=2, use_act_checkpoint=True)
    x = torch.randn(1, 3, 32, 32)
    loss = net(x)['last_feat'].sum()
    loss.backward()
    assert len(calls) == 3  # every block, while training
    net.eval()
    net(x)
    assert len(calls) == 3


def test_yacs_builders_in_the_backbone_registry():
    cfg = add_convmae_config(get_cfg())
    cfg.MODEL.CONVMAE.merge_from_list(['IMG_SIZE', 64, 'EMBED_DIM', [16, 32, 64], 'DEPTH', [1, 1, 2],
                                       'NUM_HEADS', 4, 'WINDOW_SIZE', 2, 'WINDOW_BLOCK_INDEXES', [0],
                                       'DET_WINDOW_SIZE', 2, 'GLOBAL_ATTN_INDEXES', [1]])
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.CONVMAE_PYRAMID.SQUARE_PAD = 64
    cfg.MODEL.BACKBONE.NAME = 'build_convmae_vitdet_backbone'
    pyramid = build_backbone(cfg)
    assert isinstance(pyramid.net, ConvViT) and [b.window_size for b in pyramid.net.blocks3] == [2, 0]
    assert pyramid.padding_constraints['square_size'] == 64
    assert sorted(pyramid(torch.randn(1, 3, 64, 64))) == list(LEVELS)
    cfg.MODEL.BACKBONE.NAME = 'build_convmae_fpn_backbone'
    fpn = build_backbone(cfg)
    assert isinstance(fpn.bottom_up, ConvViTDet) and [b.window_size for b in fpn.bottom_up.blocks3] == [2, 0]
    assert {k: v.stride for k, v in fpn.output_shape().items()} == {'p2': 4, 'p3': 8, 'p4': 16, 'p5': 32, 'p6': 64}
    assert [tuple(m.shape) for m in fpn(torch.randn(1, 3, 64, 64)).values()] == [
        (1, 32, 16, 16), (1, 32, 8, 8), (1, 32, 4, 4), (1, 32, 2, 2), (1, 32, 1, 1)]


def test_lsj_postprocess_scales_both_axes_by_one_factor():
    """An image 200x100 (h x w) resized to 1024x512 and padded to 1024x1024: boxes go back by 200/1024 on both
    axes (detectron2's per-axis rule would use 100/1024 on x)."""
    inst = Instances((1024, 1024), pred_boxes=Boxes(torch.tensor([[100.0, 200.0, 300.0, 600.0]])),
                     scores=torch.tensor([0.9]), pred_classes=torch.tensor([0]))
    out = lsj_postprocess([inst], [{'height': 200, 'width': 100}], [(1024, 1024)])[0]['instances']
    assert out.image_size == (200, 100)
    s = 200 / 1024
    assert torch.allclose(out.pred_boxes.tensor, torch.tensor([[100 * s, 200 * s, min(300 * s, 100), 600 * s]]))


def test_fpn_detector_trains_and_maps_detections_back_as_lsj(det_fixture):
    """The FPN config's meta-architecture (official ``GeneralizedRCNNImageListForward``): the backbone receives
    the ImageList; training returns the Mask R-CNN losses; inference returns detections at each image's
    original size."""
    cfg = LazyConfig.load(str(DET))
    c = det_fixture['config']
    cfg.model.backbone.bottom_up.update(img_size=c['img_size'], embed_dim=c['embed_dims'], depth=c['depths'],
                                        num_heads=c['num_heads'], window_size=c['window_size'], drop_path_rate=0.0)
    cfg.model.proposal_generator.update(pre_nms_topk=(50, 50), post_nms_topk=(20, 20), batch_size_per_image=32)
    cfg.model.roi_heads.update(num_classes=2, batch_size_per_image=8)
    cfg.model.roi_heads.box_head.update(conv_dims=[8], fc_dims=[16])
    cfg.model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=16)
    cfg.model.roi_heads.mask_head.conv_dims = [8]
    model = instantiate(cfg.model)
    seen = []
    model.backbone.bottom_up.register_forward_pre_hook(lambda m, args: seen.append(type(args[0])))
    image = torch.randint(0, 255, (3, 128, 96), dtype=torch.uint8)
    gt = Instances((128, 96), gt_boxes=Boxes(torch.tensor([[10.0, 20.0, 60.0, 90.0]])),
                   gt_classes=torch.tensor([1]))
    gt.gt_masks = BitMasks(torch.zeros(1, 128, 96, dtype=torch.bool))
    with EventStorage():  # where detectron2's trainer runs the model
        losses = model.train()([{'image': image, 'instances': gt}])
    assert set(losses) == {'loss_cls', 'loss_box_reg', 'loss_mask', 'loss_rpn_cls', 'loss_rpn_loc'}
    assert seen == [ImageList]
    with torch.no_grad():
        (out,) = model.eval()([{'image': image, 'height': 256, 'width': 192}])
    assert out['instances'].image_size == (256, 192)


def test_layer_decay_rule():
    """The official get_vit_lr_decay_rate: conv stages and patch embeddings at layer 0, blocks3.i at i + 1,
    pos_embed and the rest at the full lr."""
    rate = lambda name: get_vit_lr_decay_rate(name, lr_decay_rate=0.8, num_layers=11)  # noqa: E731
    assert rate('backbone.net.patch_embed4.weight') == pytest.approx(0.8 ** 12)
    assert rate('backbone.net.blocks2.1.attn.weight') == pytest.approx(0.8 ** 12)
    assert rate('backbone.net.blocks3.0.mlp.fc1.weight') == pytest.approx(0.8 ** 11)
    assert rate('backbone.net.blocks3.10.norm1.weight') == pytest.approx(0.8 ** 1)
    assert rate('backbone.net.pos_embed') == 1.0 and rate('roi_heads.box_predictor.cls_score.weight') == 1.0


# ------------------------------------------------------------------------------------------------------ configs
def test_vitdet_config_values():
    """projects/ConvMAEDet/configs/COCO/mask_rcnn_vitdet_convmae_b_25ep.py + common/coco_loader_lsj.py."""
    cfg = LazyConfig.load(str(VITDET))
    net = cfg.model.backbone.net
    assert net._target_ is ConvViT
    assert (net.img_size, tuple(net.patch_size), tuple(net.embed_dim), tuple(net.depth), net.num_heads) == (
        1024, (4, 2, 2), (256, 384, 768), (2, 2, 11), 12)
    assert (net.drop_path_rate, net.window_size, net.mlp_ratio, net.qkv_bias, net.use_rel_pos) == (
        0.1, 14, 4, True, True)
    assert list(net.window_block_indexes) == [0, 2, 3, 5, 6, 8, 9] and net.norm_layer.keywords == {'eps': 1e-6}
    assert net.pretrain_use_cls_token is False and net.out_feature == 'last_feat'
    bb = cfg.model.backbone
    assert (bb.out_channels, tuple(bb.scale_factors), bb.norm, bb.square_pad) == (256, (4.0, 2.0, 1.0, 0.5), 'LN', 1024)
    assert cfg.model.roi_heads.box_head.conv_norm == 'LN' and list(cfg.model.roi_heads.box_head.conv_dims) == [256] * 4
    assert list(cfg.model.proposal_generator.head.conv_dims) == [-1, -1]
    assert list(cfg.model.pixel_mean) == [123.675, 116.28, 103.53] and cfg.model.input_format == 'RGB'
    train = cfg.train
    assert (train.amp.enabled, train.ddp.fp16_compression, train.max_iter, train.eval_period) == (
        True, True, 184375, 7500)
    assert dict(train.checkpointer) == dict(period=2500, max_to_keep=2)
    sched = cfg.lr_multiplier
    assert list(sched.scheduler['values']) == [1.0, 0.1, 0.01] and list(sched.scheduler.milestones) == [163889, 177546]
    assert sched.scheduler.num_updates == 184375
    assert sched.warmup_length == 250 / 184375 and sched.warmup_factor == 0.001
    opt = cfg.optimizer
    assert (opt.lr, tuple(opt.betas), opt.weight_decay, opt.params.weight_decay_norm) == (1e-4, (0.9, 0.999), 0.1, 0.0)
    assert opt.params.lr_factor_func.func is get_vit_lr_decay_rate
    assert opt.params.lr_factor_func.keywords == dict(num_layers=11, lr_decay_rate=0.8)
    assert dict(opt.params.overrides) == {'pos_embed': {'weight_decay': 0.0}}
    data = cfg.dataloader
    assert data.train.total_batch_size == 16 and data.train.mapper.image_format == 'RGB'
    assert data.train.mapper.recompute_boxes is True and data.train.mapper.use_instance_mask is True
    flip, scale, crop = data.train.mapper.augmentations
    assert flip.horizontal is True and (scale.min_scale, scale.max_scale, scale.target_height) == (0.1, 2.0, 1024)
    assert tuple(crop.crop_size) == (1024, 1024) and crop.pad is False
    (resize,) = data.test.mapper.augmentations
    assert (resize.short_edge_length, resize.max_size) == (1024, 1024)


def test_fpn_config_values():
    """DET/configs/convmae/convmae_base_mask_rcnn_FPN_25ep.py on _100ep.py, coco.py and common.py."""
    cfg = LazyConfig.load(str(DET))
    model = cfg.model
    assert model.lsj_postprocess is True
    bu = model.backbone.bottom_up
    assert bu._target_ is ConvViTDet
    assert (bu.window_size, bu.with_cp, bu.sincos_pos_embed, bu.zero_pos_embed, bu.img_size, bu.num_heads,
            bu.drop_path_rate) == (16, False, True, False, 1024, 12, 0.1)
    assert list(model.backbone.in_features) == ['s0', 's1', 's2', 's3'] and model.backbone.norm == 'SyncBN'
    assert model.backbone.out_channels == 256
    rpn = model.proposal_generator
    assert (tuple(rpn.pre_nms_topk), tuple(rpn.post_nms_topk), rpn.nms_thresh, rpn.batch_size_per_image) == (
        (2000, 1000), (1000, 1000), 0.7, 256)
    assert list(rpn.head.conv_dims) == [-1, -1] and rpn.anchor_generator.offset == 0.0
    roi = model.roi_heads
    assert (roi.num_classes, roi.batch_size_per_image, roi.positive_fraction) == (80, 512, 0.25)
    assert list(roi.box_head.conv_dims) == [256] * 4 and list(roi.box_head.fc_dims) == [1024]
    assert list(roi.mask_head.conv_dims) == [256] * 5 and roi.box_pooler.pooler_type == 'ROIAlignV2'
    assert roi.box_head.conv_norm.keywords == {'stats_mode': 'N'}
    opt = cfg.optimizer
    assert (opt.lr, tuple(opt.betas), opt.weight_decay, opt.params.weight_decay_norm) == (8e-5, (0.9, 0.999), 0.1, 0.0)
    assert dict(opt.params.overrides) == {'pos_embed': {'weight_decay': 0.0},
                                          'relative_position_bias_table': {'weight_decay': 0.0}}
    sched = cfg.lr_multiplier
    assert (sched.scheduler.start_value, sched.scheduler.end_value) == (1.0, 0.0)
    assert sched.warmup_length == pytest.approx(0.005) and sched.warmup_factor == 0.001
    train = cfg.train
    assert (train.max_iter, train.amp.enabled, train.ddp.fp16_compression, train.eval_period) == (
        92187, True, True, 3688)
    data = cfg.dataloader
    assert data.train.total_batch_size == 32 and data.train.mapper.use_instance_mask is True
    scale, crop, flip = data.train.mapper.augmentations
    assert (scale.min_scale, scale.max_scale, scale.target_width) == (0.1, 2.0, 1024) and flip.horizontal
    assert tuple(crop.crop_size) == (1024, 1024)
    resize, crop = data.test.mapper.augmentations
    assert (resize.short_edge_length, resize.max_size, tuple(crop.crop_size)) == (1024, 1024, (1024, 1024))
    assert data.evaluator.output_dir == cfg.train.output_dir  # the interpolation resolves


# --------------------------------------------------------------------------------------------------- .pkl files
def test_pkl_weights_load_through_the_safe_reader(vitdet_fixture, tmp_path, caplog):
    """detectron2's model-zoo ``.pkl`` format (numpy weights, ``__author__``) is read without plain pickle."""
    model = vitdet_model(vitdet_fixture)
    state = {k: v.numpy() for k, v in model.state_dict().items() if not k.startswith('backbone.')}
    state.update({f'backbone.{k}': v.numpy() for k, v in vitdet_fixture['state_dict'].items()})
    path = tmp_path / 'model_final.pkl'
    path.write_bytes(pickle.dumps({'model': state, '__author__': 'someone'}, protocol=4))
    load(model, path, caplog)
    assert torch.equal(model.backbone.net.pos_embed, vitdet_fixture['state_dict']['net.pos_embed'])
