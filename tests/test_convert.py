"""Conversion of the released official checkpoints (detectron2 detector, mmseg 0.x segmentor, fine-tuned
classifier): synthetic state dicts with exactly the source layout, converted and compared with the models our
configs build, plus the detectron2 / mmdet conventions the conversion relies on (anchor order, background row,
class-specific regression rows, box-coder weights)."""
import copy
import math
import os.path as osp
import pickle
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

import convmae_backbone  # noqa: F401
from convmae_backbone.checkpoint import CheckpointError, safe_torch_load
from convmae_backbone.apis.convert import convert, convert_cls, convert_det, convert_seg, model_state
from helpers import sync_bn_to_bn

REPO = Path(__file__).resolve().parents[1]
DOWNSTREAM = REPO / 'tests' / 'fixtures' / 'official_downstream_small.pt'
DET_CONFIG = REPO / 'configs' / 'mmdet' / 'mask-rcnn_convmae-b_fpn_lsj-25e_coco.py'
SEG_CONFIG = REPO / 'configs' / 'mmseg' / 'upernet_convmae-b_8xb2-160k_ade20k-512x512.py'

NUM_CLASSES_COCO, NUM_CLASSES_ADE = 80, 150
NUM_ANCHORS = 3  # one size per level x aspect ratios (0.5, 1, 2)
# Small channel sizes for the heads; the backbones take the fixture's sizes.
FPN_C, BOX_CONV_C, BOX_FC_C, MASK_C = 16, 16, 32, 16
SEG_C, AUX_C = 16, 8


class _Random:
    """Distinct random float32 tensors, and BatchNorm buffers with their real dtypes."""

    def __init__(self, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.g)

    def norm(self, state: dict, prefix: str, c: int, with_nbt: bool = True) -> None:
        state[prefix + 'weight'], state[prefix + 'bias'] = self(c), self(c)
        state[prefix + 'running_mean'], state[prefix + 'running_var'] = self(c), self(c).abs() + 0.5
        if with_nbt:
            state[prefix + 'num_batches_tracked'] = torch.tensor(1234, dtype=torch.long)


def detectron2_maskrcnn_state(backbone: dict, in_channels=(16, 32, 64, 64), with_nbt: bool = True) -> dict:
    """The state dict of the official DET model in detectron2 0.6's layout (``GeneralizedRCNN.state_dict()``):
    FPN(norm='SyncBN', LastLevelMaxPool) over strides 4..32, StandardRPNHead(conv_dims=[-1, -1]),
    FastRCNNConvFCHead(conv_dims=[C] * 4, fc_dims=[F], conv_norm=NaiveSyncBN), FastRCNNOutputLayers(80 classes),
    MaskRCNNConvUpsampleHead(conv_dims=[C] * 5, conv_norm=NaiveSyncBN). ``pixel_mean``/``pixel_std`` and the cell
    anchors are non-persistent buffers in 0.6 and so are absent."""
    r, s = _Random(), OrderedDict()
    for k, v in backbone.items():
        s[f'backbone.bottom_up.{k}'] = v
    for stage, cin in zip(range(2, 6), in_channels):  # FPN: no conv bias when a norm follows
        s[f'backbone.fpn_lateral{stage}.weight'] = r(FPN_C, cin, 1, 1)
        r.norm(s, f'backbone.fpn_lateral{stage}.norm.', FPN_C, with_nbt)
        s[f'backbone.fpn_output{stage}.weight'] = r(FPN_C, FPN_C, 3, 3)
        r.norm(s, f'backbone.fpn_output{stage}.norm.', FPN_C, with_nbt)
    rpn = 'proposal_generator.rpn_head.'
    for k in range(2):
        s[f'{rpn}conv.conv{k}.weight'], s[f'{rpn}conv.conv{k}.bias'] = r(FPN_C, FPN_C, 3, 3), r(FPN_C)
    s[rpn + 'objectness_logits.weight'], s[rpn + 'objectness_logits.bias'] = r(NUM_ANCHORS, FPN_C, 1, 1), \
        r(NUM_ANCHORS)
    s[rpn + 'anchor_deltas.weight'], s[rpn + 'anchor_deltas.bias'] = r(4 * NUM_ANCHORS, FPN_C, 1, 1), \
        r(4 * NUM_ANCHORS)
    cin = FPN_C
    for k in range(1, 5):
        s[f'roi_heads.box_head.conv{k}.weight'] = r(BOX_CONV_C, cin, 3, 3)
        r.norm(s, f'roi_heads.box_head.conv{k}.norm.', BOX_CONV_C, with_nbt)
        cin = BOX_CONV_C
    s['roi_heads.box_head.fc1.weight'], s['roi_heads.box_head.fc1.bias'] = r(BOX_FC_C, BOX_CONV_C * 49), r(BOX_FC_C)
    s['roi_heads.box_predictor.cls_score.weight'] = r(NUM_CLASSES_COCO + 1, BOX_FC_C)
    s['roi_heads.box_predictor.cls_score.bias'] = r(NUM_CLASSES_COCO + 1)
    s['roi_heads.box_predictor.bbox_pred.weight'] = r(4 * NUM_CLASSES_COCO, BOX_FC_C)
    s['roi_heads.box_predictor.bbox_pred.bias'] = r(4 * NUM_CLASSES_COCO)
    cin = FPN_C
    for k in range(1, 5):
        s[f'roi_heads.mask_head.mask_fcn{k}.weight'] = r(MASK_C, cin, 3, 3)
        r.norm(s, f'roi_heads.mask_head.mask_fcn{k}.norm.', MASK_C, with_nbt)
        cin = MASK_C
    s['roi_heads.mask_head.deconv.weight'] = r(MASK_C, MASK_C, 2, 2)  # ConvTranspose2d: (in, out, k, k)
    s['roi_heads.mask_head.deconv.bias'] = r(MASK_C)
    s['roi_heads.mask_head.predictor.weight'] = r(NUM_CLASSES_COCO, MASK_C, 1, 1)
    s['roi_heads.mask_head.predictor.bias'] = r(NUM_CLASSES_COCO)
    return s


def mmseg0_upernet_state(backbone: dict, in_channels=(16, 32, 64, 64)) -> dict:
    """The state dict of the official SEG model in mmseg 0.x's layout: ``EncoderDecoder`` with UPerHead
    (PPM scales 1, 2, 3, 6) and FCNHead(num_convs=1, concat_input=False), ConvModules with SyncBN."""
    r, s = _Random(1), OrderedDict()
    for k, v in backbone.items():
        s[f'backbone.{k}'] = v

    def conv_module(prefix, cout, cin, k):
        s[prefix + 'conv.weight'] = r(cout, cin, k, k)
        r.norm(s, prefix + 'bn.', cout)

    for i in range(4):
        conv_module(f'decode_head.psp_modules.{i}.1.', SEG_C, in_channels[-1], 1)
    conv_module('decode_head.bottleneck.', SEG_C, in_channels[-1] + 4 * SEG_C, 3)
    for i, cin in enumerate(in_channels[:-1]):
        conv_module(f'decode_head.lateral_convs.{i}.', SEG_C, cin, 1)
        conv_module(f'decode_head.fpn_convs.{i}.', SEG_C, SEG_C, 3)
    conv_module('decode_head.fpn_bottleneck.', SEG_C, 4 * SEG_C, 3)
    s['decode_head.conv_seg.weight'], s['decode_head.conv_seg.bias'] = r(NUM_CLASSES_ADE, SEG_C, 1, 1), \
        r(NUM_CLASSES_ADE)
    conv_module('auxiliary_head.convs.0.', AUX_C, in_channels[2], 3)
    s['auxiliary_head.conv_seg.weight'], s['auxiliary_head.conv_seg.bias'] = r(NUM_CLASSES_ADE, AUX_C, 1, 1), \
        r(NUM_CLASSES_ADE)
    return s


@pytest.fixture(scope='module')
def fixture():
    return torch.load(DOWNSTREAM, weights_only=True)


def _official_backbone_keys(state: dict) -> set:
    return {f'backbone.{k}' for k in state if not k.endswith('relative_position_index')}


def _heads(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items() if not k.startswith('backbone.')}


# ------------------------------------------------------------------------------------------------ det
@pytest.fixture(scope='module')
def small_detector(fixture):
    """Our mmdet config's Mask R-CNN with the fixture's backbone sizes and small head channels."""
    from mmdet.registry import MODELS
    c = fixture['det']['config']
    cfg = sync_bn_to_bn(copy.deepcopy(Config.fromfile(str(DET_CONFIG)).model))
    cfg.backbone.update(img_size=c['img_size'], embed_dims=tuple(c['embed_dims']), depths=tuple(c['depths']),
                        num_heads=c['num_heads'], window_size=c['window_size'], drop_path_rate=0.0, init_cfg=None)
    cfg.neck.update(in_channels=[*c['embed_dims'], c['embed_dims'][-1]], out_channels=FPN_C)
    cfg.rpn_head.update(in_channels=FPN_C, feat_channels=FPN_C)
    roi = cfg.roi_head
    roi.bbox_roi_extractor.out_channels = roi.mask_roi_extractor.out_channels = FPN_C
    roi.bbox_head.update(in_channels=FPN_C, conv_out_channels=BOX_CONV_C, fc_out_channels=BOX_FC_C)
    roi.mask_head.update(in_channels=FPN_C, conv_out_channels=MASK_C)
    with DefaultScope.overwrite_default_scope('mmdet'):
        return MODELS.build(cfg).eval()


@pytest.fixture(scope='module')
def det_source(fixture):
    return detectron2_maskrcnn_state(fixture['det']['state_dict'])


@pytest.fixture(scope='module')
def det_converted(det_source):
    return convert_det(det_source, 'synthetic detectron2 checkpoint')


def test_det_keys_match_mmdet(small_detector, det_converted, fixture):
    converted, dropped = det_converted
    assert _heads(converted) == _heads(small_detector.state_dict())  # no missing, no unexpected, same shapes
    official = fixture['det']['state_dict']
    assert {k for k in converted if k.startswith('backbone.')} == _official_backbone_keys(official)
    for k, v in official.items():
        if not k.endswith('relative_position_index'):
            assert converted[f'backbone.{k}'] is v
    assert sorted(dropped) == sorted(f'backbone.bottom_up.{k}' for k in official
                                     if k.endswith('relative_position_index'))


def test_det_tensors_land_where_mmdet_expects_them(det_source, det_converted):
    converted, _ = det_converted
    pairs = {
        'backbone.fpn_lateral2.weight': 'neck.lateral_convs.0.conv.weight',
        'backbone.fpn_lateral5.norm.running_var': 'neck.lateral_convs.3.bn.running_var',
        'backbone.fpn_output3.weight': 'neck.fpn_convs.1.conv.weight',
        'backbone.fpn_output4.norm.num_batches_tracked': 'neck.fpn_convs.2.bn.num_batches_tracked',
        'proposal_generator.rpn_head.conv.conv0.weight': 'rpn_head.rpn_conv.0.conv.weight',
        'proposal_generator.rpn_head.conv.conv1.bias': 'rpn_head.rpn_conv.1.conv.bias',
        'proposal_generator.rpn_head.objectness_logits.weight': 'rpn_head.rpn_cls.weight',
        'proposal_generator.rpn_head.anchor_deltas.bias': 'rpn_head.rpn_reg.bias',
        'roi_heads.box_head.conv1.weight': 'roi_head.bbox_head.shared_convs.0.conv.weight',
        'roi_heads.box_head.conv4.norm.running_mean': 'roi_head.bbox_head.shared_convs.3.bn.running_mean',
        'roi_heads.box_head.fc1.weight': 'roi_head.bbox_head.shared_fcs.0.weight',
        'roi_heads.mask_head.mask_fcn1.weight': 'roi_head.mask_head.convs.0.conv.weight',
        'roi_heads.mask_head.mask_fcn4.norm.bias': 'roi_head.mask_head.convs.3.bn.bias',
        'roi_heads.mask_head.deconv.weight': 'roi_head.mask_head.upsample.weight',
        'roi_heads.mask_head.predictor.bias': 'roi_head.mask_head.conv_logits.bias',
    }
    for src, dst in pairs.items():
        assert torch.equal(converted[dst], det_source[src]), (src, dst)
    # Classification rows: detectron2 class i (sorted COCO category id order) at mmdet row i, background
    # (detectron2 row K) at mmdet row K.
    cls_w, cls_b = converted['roi_head.bbox_head.fc_cls.weight'], converted['roi_head.bbox_head.fc_cls.bias']
    src_w = det_source['roi_heads.box_predictor.cls_score.weight']
    src_b = det_source['roi_heads.box_predictor.cls_score.bias']
    for i in (0, 1, 41, NUM_CLASSES_COCO - 1, NUM_CLASSES_COCO):
        assert torch.equal(cls_w[i], src_w[i]) and cls_b[i] == src_b[i]
    # Regression rows: class i's (dx, dy, dw, dh) at rows 4i..4i+3 in both.
    reg_w = converted['roi_head.bbox_head.fc_reg.weight']
    src_reg = det_source['roi_heads.box_predictor.bbox_pred.weight']
    for i in (0, 17, NUM_CLASSES_COCO - 1):
        assert torch.equal(reg_w[4 * i:4 * i + 4], src_reg[4 * i:4 * i + 4])


def test_det_rpn_anchor_order_needs_no_permutation(small_detector):
    """detectron2 DefaultAnchorGenerator(sizes=[[32], ..., [512]], aspect_ratios=[0.5, 1, 2], offset=0): cell
    anchors in the order (size, aspect ratio) with w = sqrt(size^2 / a), h = a * w centred at 0; anchors
    location-major (raster order, x fastest) then cell anchor. mmdet's anchors for our config are the same, in
    the same order, so the A = 3 rows of ``objectness_logits`` and 4A rows of ``anchor_deltas`` stay in place."""
    gen = small_detector.rpn_head.prior_generator
    assert gen.num_base_priors == [NUM_ANCHORS] * 5 and list(gen.strides) == [(s, s) for s in (4, 8, 16, 32, 64)]
    for level, size in enumerate((32, 64, 128, 256, 512)):
        cell = []
        for a in (0.5, 1.0, 2.0):
            w = math.sqrt(size ** 2 / a)
            h = a * w
            cell.append([-w / 2, -h / 2, w / 2, h / 2])
        cell = torch.tensor(cell)
        torch.testing.assert_close(gen.base_anchors[level], cell, rtol=0, atol=1e-4)
        if level < 2:
            hgt, wid, stride = 3, 5, 4 * 2 ** level
            ys, xs = torch.meshgrid(torch.arange(hgt) * stride, torch.arange(wid) * stride, indexing='ij')
            shifts = torch.stack([xs.reshape(-1), ys.reshape(-1)] * 2, dim=1).float()
            expected = (shifts[:, None, :] + cell[None]).reshape(-1, 4)
            got = gen.single_level_grid_priors((hgt, wid), level, device='cpu')
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_det_background_row_and_class_specific_deltas(small_detector):
    """mmdet's box head treats the last of the K + 1 logits as background (as detectron2's FastRCNNOutputLayers
    does), reads class k's deltas from columns 4k..4k+3, and decodes them like detectron2's Box2BoxTransform
    with weights (10, 10, 5, 5); the RPN coder's stds (1, 1, 1, 1) are detectron2's RPN weights (1, 1, 1, 1)."""
    from mmengine.config import ConfigDict
    head = small_detector.roi_head.bbox_head
    assert head.num_classes == NUM_CLASSES_COCO and not head.reg_class_agnostic
    assert head.fc_cls.out_features == NUM_CLASSES_COCO + 1 and head.fc_reg.out_features == 4 * NUM_CLASSES_COCO
    assert list(head.bbox_coder.stds) == [0.1, 0.1, 0.2, 0.2] and list(head.bbox_coder.means) == [0.0] * 4
    assert list(small_detector.rpn_head.bbox_coder.stds) == [1.0] * 4

    proposal = torch.tensor([[100.0, 120.0, 300.0, 260.0]])
    rois = torch.cat([torch.zeros(2, 1), proposal.repeat(2, 1)], dim=1)
    cls_score = torch.full((2, NUM_CLASSES_COCO + 1), -10.0)
    cls_score[0, 7] = 10.0  # roi 0: class 7
    cls_score[1, NUM_CLASSES_COCO] = 10.0  # roi 1: background
    deltas = torch.tensor([1.5, -2.0, 0.5, -1.0])  # raw network output (dx, dy, dw, dh)
    bbox_pred = torch.zeros(2, 4 * NUM_CLASSES_COCO)
    bbox_pred[:, 28:32] = deltas
    meta = dict(img_shape=(1024, 1024), scale_factor=(1.0, 1.0))
    cfg = ConfigDict(score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5), max_per_img=100)
    result = head.predict_by_feat((rois,), (cls_score,), (bbox_pred,), [meta], rcnn_test_cfg=cfg)[0]
    assert result.labels.tolist() == [7]  # the background roi gives no detection

    # detectron2 Box2BoxTransform((10, 10, 5, 5)).apply_deltas
    x0, y0, x1, y1 = proposal[0].tolist()
    w, h = x1 - x0, y1 - y0
    cx, cy = x0 + 0.5 * w, y0 + 0.5 * h
    dx, dy, dw, dh = (deltas / torch.tensor([10.0, 10.0, 5.0, 5.0])).tolist()
    pcx, pcy, pw, ph = dx * w + cx, dy * h + cy, math.exp(dw) * w, math.exp(dh) * h
    expected = torch.tensor([[pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2]])
    torch.testing.assert_close(result.bboxes, expected, rtol=1e-5, atol=1e-3)


def test_det_loads_without_missing_or_unexpected_keys(small_detector, det_converted):
    """The whole converted detector, backbone included, loads into our config's model with strict keys."""
    converted, _ = det_converted
    model = copy.deepcopy(small_detector)
    model.load_state_dict(converted, strict=True)
    assert torch.equal(model.roi_head.bbox_head.fc_cls.weight, converted['roi_head.bbox_head.fc_cls.weight'])
    assert torch.equal(model.backbone.global_rel_pos_bias.relative_position_bias_table,
                       converted['backbone.global_rel_pos_bias.relative_position_bias_table'])


def test_det_without_num_batches_tracked(fixture):
    source = detectron2_maskrcnn_state(fixture['det']['state_dict'], with_nbt=False)
    converted, _ = convert_det(source, 'old checkpoint')
    assert converted['neck.lateral_convs.0.bn.num_batches_tracked'].item() == 0
    assert converted['roi_head.mask_head.convs.3.bn.num_batches_tracked'].dtype == torch.long


# ------------------------------------------------------------------------------------------------ seg
@pytest.fixture(scope='module')
def small_segmentor(fixture):
    from mmseg.registry import MODELS
    c = fixture['seg']['config']
    cfg = sync_bn_to_bn(copy.deepcopy(Config.fromfile(str(SEG_CONFIG)).model))
    cfg.backbone.update(img_size=c['img_size'], embed_dims=tuple(c['embed_dims']), depths=tuple(c['depths']),
                        num_heads=c['num_heads'], drop_path_rate=0.0, init_cfg=None)
    cfg.decode_head.update(in_channels=[*c['embed_dims'], c['embed_dims'][-1]], channels=SEG_C)
    cfg.auxiliary_head.update(in_channels=c['embed_dims'][-1], channels=AUX_C)
    with DefaultScope.overwrite_default_scope('mmseg'):
        return MODELS.build(cfg).eval()


def test_seg_keys_match_mmseg(small_segmentor, fixture):
    official = fixture['seg']['state_dict']
    source = mmseg0_upernet_state(official)
    converted, dropped = convert_seg(source, 'synthetic mmseg 0.x checkpoint')
    assert _heads(converted) == _heads(small_segmentor.state_dict())
    assert {k for k in converted if k.startswith('backbone.')} == _official_backbone_keys(official)
    assert 'backbone.fpn.1.running_var' in converted  # the official H/32 branch passes through
    assert sorted(dropped) == sorted(f'backbone.{k}' for k in official if k.endswith('relative_position_index'))
    for k, v in source.items():
        if k not in dropped:
            assert converted[k] is v  # mmseg 0.x and 1.x share every name
    model = copy.deepcopy(small_segmentor)
    model.load_state_dict(converted, strict=True)  # the whole segmentor, backbone included
    assert torch.equal(model.backbone.blocks3[1].attn.relative_position_bias_table,
                       converted['backbone.blocks3.1.attn.relative_position_bias_table'])


# ------------------------------------------------------------------------------------------------ cls
def test_cls_keys(fixture):
    official = fixture['cls']['state_dict']
    converted, dropped = convert_cls(official, 'fine-tuned checkpoint')
    assert dropped == []
    expected = {f'backbone.{k}' for k in official if not k.startswith(('fc_norm.', 'head.'))}
    expected |= {'backbone.fc_norm.weight', 'backbone.fc_norm.bias', 'head.fc.weight', 'head.fc.bias'}
    assert set(converted) == expected
    assert converted['head.fc.weight'] is official['head.weight']
    assert converted['backbone.fc_norm.bias'] is official['fc_norm.bias']
    assert converted['backbone.blocks3.1.attn.qkv.weight'] is official['blocks3.1.attn.qkv.weight']


# --------------------------------------------------------------------------------- files, errors, CLI
def test_convert_files_and_numpy_pickle(tmp_path, fixture, det_source):
    src = tmp_path / 'seg.pth'
    torch.save({'meta': {'iter': 160000}, 'state_dict': mmseg0_upernet_state(fixture['seg']['state_dict'])}, src)
    report = convert('seg', str(src), str(tmp_path / 'out' / 'seg_mmseg.pth'))
    out = safe_torch_load(str(tmp_path / 'out' / 'seg_mmseg.pth'))
    assert report['converted'] == len(out['state_dict'])
    assert out['meta']['dataset_meta']['classes'][0] == 'wall' and len(out['meta']['dataset_meta']['classes']) \
        == NUM_CLASSES_ADE

    # detectron2's .pkl format: a plain pickle of numpy arrays
    pkl = tmp_path / 'model_final.pkl'
    with open(pkl, 'wb') as f:
        pickle.dump({'model': {k: v.numpy() for k, v in det_source.items()}, '__author__': 'someone'}, f)
    convert('det', str(pkl), str(tmp_path / 'det.pth'))
    det = safe_torch_load(str(tmp_path / 'det.pth'))
    assert torch.equal(det['state_dict']['roi_head.bbox_head.fc_reg.weight'],
                       det_source['roi_heads.box_predictor.bbox_pred.weight'])
    assert len(det['meta']['dataset_meta']['classes']) == NUM_CLASSES_COCO


class _CallsPrint:
    marker = 'code from a pickle ran'

    def __reduce__(self):
        return print, (self.marker,)


def test_errors(tmp_path, capsys, fixture, det_source):
    seg = tmp_path / 'seg.pth'
    torch.save({'state_dict': mmseg0_upernet_state(fixture['seg']['state_dict'])}, seg)
    with pytest.raises(CheckpointError, match=r"seg\.pth is not an official ConvMAE detector.*missing expected "
                                              r"keys \['backbone\.bottom_up\.patch_embed1.*looks like a 'seg'"):
        convert('det', str(seg), str(tmp_path / 'x.pth'))
    assert not (tmp_path / 'x.pth').exists()

    for i, text in enumerate(('not a checkpoint', 'hello\n')):  # torch raises different errors for these
        garbage = tmp_path / f'notes{i}.txt'
        garbage.write_text(text)
        with pytest.raises(CheckpointError, match=f'notes{i}.txt.*could not be read'):
            convert('det', str(garbage), str(tmp_path / 'x.pth'))
    with pytest.raises(CheckpointError, match=r"is not an official ConvMAE detector.*missing expected keys"):
        convert('det', str(DOWNSTREAM), str(tmp_path / 'x.pth'))  # a dict of dicts, not of weights

    evil = tmp_path / 'evil.pkl'
    evil.write_bytes(pickle.dumps({'model': {'x': _CallsPrint()}}))
    with pytest.raises(CheckpointError, match='evil.pkl'):
        convert('det', str(evil), str(tmp_path / 'x.pth'))
    assert _CallsPrint.marker not in capsys.readouterr().out  # nothing in the pickle ran

    extra = OrderedDict(det_source)
    extra['roi_heads.keypoint_head.conv_fcn1.weight'] = torch.zeros(1)
    extra['backbone.fpn_lateral6.weight'] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"2 key\(s\) map to nothing.*keypoint_head.*fpn_lateral6"):
        convert_det(extra, 'extra.pth')
    with pytest.raises(CheckpointError, match=r"odd.pth: value of 'pixel_mean' is a list, not a tensor"):
        model_state({'model': {**det_source, 'pixel_mean': [1, 2, 3]}}, 'odd.pth')
    with pytest.raises(ValueError, match='kind'):
        convert('keypoints', str(seg), str(tmp_path / 'x.pth'))


def test_cli(tmp_path, fixture):
    src = tmp_path / 'finetuned.pth'
    torch.save({'model': fixture['cls']['state_dict'], 'epoch': 99}, src)
    tool = str(REPO / 'tools' / 'convert_official.py')
    done = subprocess.run([sys.executable, tool, 'cls', str(src), str(tmp_path / 'cls.pth')], capture_output=True,
                          text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f'wrote {len(fixture["cls"]["state_dict"])} tensors' in done.stdout
    assert set(safe_torch_load(str(tmp_path / 'cls.pth'))['state_dict']) >= {'head.fc.weight', 'backbone.pos_embed'}
    failed = subprocess.run([sys.executable, tool, 'seg', str(src), str(tmp_path / 'seg.pth')], capture_output=True,
                            text=True, cwd=tmp_path)
    assert failed.returncode == 1 and "looks like a 'cls'" in failed.stderr and 'Traceback' not in failed.stderr
    assert not osp.exists(tmp_path / 'seg.pth')
