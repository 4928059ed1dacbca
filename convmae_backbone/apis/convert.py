"""Convert the released official ConvMAE checkpoints to this project's mmdet / mmseg / mmpretrain models.

Four source formats, one function each:

- ``det``: the ConvMAE-B Mask R-CNN of the official ``DET/`` code, a detectron2 0.6 ``GeneralizedRCNN``
  checkpoint (``{'model': state_dict, ...}``; values may be tensors or, in detectron2's ``.pkl`` format, numpy
  arrays) -> mmdet 3.x ``MaskRCNN`` keys (FPN with norm, 2-conv RPN head, ``Shared4Conv1FCBBoxHead`` with norm,
  ``FCNMaskHead``).
- ``vitdet``: the ViTDet-style ConvMAE-B Mask R-CNN of OpenGVLab/Official-ConvMAE-Det, a detectron2
  ``GeneralizedRCNN`` with a ``SimpleFeaturePyramid`` backbone (encoder at ``backbone.net.``, pyramid at
  ``backbone.simfp_*``) and LN heads -> mmdet 3.x ``MaskRCNN`` keys (``ConvMAE`` + ``SimpleFeaturePyramid``
  neck, 2-conv RPN head, ``Shared4Conv1FCBBoxHead`` and ``FCNMaskHead`` with ``ConvMAELN2d`` norms). The head
  layouts were written from reading the official code (no released file could be opened). A checkpoint with
  only the backbone and pyramid converts too; the report names the parts it lacks.
- ``seg``: the ConvMAE-B UperNet of the official ``SEG/`` code, an mmseg 0.x ``EncoderDecoder`` checkpoint
  (``{'state_dict': ...}``) -> mmseg 1.x keys (UPerHead + FCNHead auxiliary head).
- ``cls``: the official fine-tuned classifier (``{'model': ...}``, ``ConvViT(global_pool=True)``) -> mmpretrain
  ``ImageClassifier`` keys (``backbone.*``, ``backbone.fc_norm.*``, ``head.fc.*``).

Every source key must match exactly one rule. Rules without a target are the documented drops
(``relative_position_index``: the backbone recomputes it; detectron2's ``pixel_mean`` / ``pixel_std``: the
mmdet ``data_preprocessor`` holds them; detectron2 cell anchors: mmdet regenerates them). A key that matches
no rule is an error. No tensor is modified: detectron2's and mmdet's conventions agree on anchor order (one
size, aspect ratios 0.5, 1, 2 per location), on the background being the last of the K + 1 ``cls_score`` rows,
on the class-specific ``bbox_pred`` layout (rows 4k..4k+3 are class k's dx, dy, dw, dh) and on the box coder
(detectron2 weights (10, 10, 5, 5) divide the deltas as mmdet's ``target_stds`` (0.1, 0.1, 0.2, 0.2) multiply
them); ``tests/test_convert.py`` checks each of these against mmdet.
"""
import os
import re
from collections import OrderedDict
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..checkpoint import (CheckpointError, atomic_write, checkpoint_weights, is_torch_zip, load_weights_pickle,
                          safe_torch_load)

KINDS = ('det', 'vitdet', 'seg', 'cls')

# A rule: (regular expression over the whole source key, target template for ``re.Match.expand`` or a callable
# of the match, or None for a documented drop).
Target = Union[str, Callable[[re.Match], str], None]
Rule = Tuple[str, Target]

_BN = r'(weight|bias|running_mean|running_var|num_batches_tracked)'


def _shift(group: int, prefix: str, suffix: str, offset: int) -> Callable[[re.Match], str]:
    """Target ``prefix{int(group) - offset}suffix`` (``suffix`` may use ``\\N`` references)."""
    return lambda m: f'{prefix}{int(m.group(group)) - offset}' + m.expand(suffix)


# detectron2 RPN and RoI heads -> mmdet 3.x RPNHead, Shared4Conv1FCBBoxHead, FCNMaskHead, with the conv norms
# of the box and mask heads (``norm``) named ``norm_key`` in mmdet's ConvModule (``bn`` for BN, ``ln`` for LN).
def _head_rules(norm: str, norm_key: str) -> Tuple[Rule, ...]:
    return (
        # RPN: conv_dims [-1, -1] gives ``conv.conv0``, ``conv.conv1`` (each with ReLU); one conv gives ``conv``.
        (r'proposal_generator\.rpn_head\.conv\.conv(\d+)\.(weight|bias)', r'rpn_head.rpn_conv.\1.conv.\2'),
        (r'proposal_generator\.rpn_head\.conv\.(weight|bias)', r'rpn_head.rpn_conv.\1'),
        (r'proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)', r'rpn_head.rpn_cls.\1'),
        (r'proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)', r'rpn_head.rpn_reg.\1'),
        (r'proposal_generator\.anchor_generator\.cell_anchors\.\d+', None),
        # Box head: FastRCNNConvFCHead conv1..4 (+ norm), fc1 -> Shared4Conv1FCBBoxHead shared_convs / shared_fcs.
        (r'roi_heads\.box_head\.conv(\d+)\.(weight|bias)',
         _shift(1, 'roi_head.bbox_head.shared_convs.', r'.conv.\2', 1)),
        (rf'roi_heads\.box_head\.conv(\d+)\.norm\.{norm}',
         _shift(1, 'roi_head.bbox_head.shared_convs.', rf'.{norm_key}.\2', 1)),
        (r'roi_heads\.box_head\.fc(\d+)\.(weight|bias)', _shift(1, 'roi_head.bbox_head.shared_fcs.', r'.\2', 1)),
        (r'roi_heads\.box_predictor\.cls_score\.(weight|bias)', r'roi_head.bbox_head.fc_cls.\1'),
        (r'roi_heads\.box_predictor\.bbox_pred\.(weight|bias)', r'roi_head.bbox_head.fc_reg.\1'),
        # Mask head: MaskRCNNConvUpsampleHead mask_fcn1..4 (+ norm), deconv, predictor -> FCNMaskHead.
        (r'roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)',
         _shift(1, 'roi_head.mask_head.convs.', r'.conv.\2', 1)),
        (rf'roi_heads\.mask_head\.mask_fcn(\d+)\.norm\.{norm}',
         _shift(1, 'roi_head.mask_head.convs.', rf'.{norm_key}.\2', 1)),
        (r'roi_heads\.mask_head\.deconv\.(weight|bias)', r'roi_head.mask_head.upsample.\1'),
        (r'roi_heads\.mask_head\.predictor\.(weight|bias)', r'roi_head.mask_head.conv_logits.\1'),
        (r'pixel_(mean|std)', None),
    )


# detectron2 0.6 GeneralizedRCNN (FPN, StandardRPNHead, StandardROIHeads) -> mmdet 3.x MaskRCNN.
DET_RULES: Tuple[Rule, ...] = (
    (r'backbone\.bottom_up\..*relative_position_index', None),
    (r'backbone\.bottom_up\.(.+)', r'backbone.\1'),
    # FPN: fpn_lateral{2..5} / fpn_output{2..5} sit at strides 4..32, mmdet's lateral_convs / fpn_convs 0..3.
    (r'backbone\.fpn_lateral([2-5])\.(weight|bias)', _shift(1, 'neck.lateral_convs.', r'.conv.\2', 2)),
    (rf'backbone\.fpn_lateral([2-5])\.norm\.{_BN}', _shift(1, 'neck.lateral_convs.', r'.bn.\2', 2)),
    (r'backbone\.fpn_output([2-5])\.(weight|bias)', _shift(1, 'neck.fpn_convs.', r'.conv.\2', 2)),
    (rf'backbone\.fpn_output([2-5])\.norm\.{_BN}', _shift(1, 'neck.fpn_convs.', r'.bn.\2', 2)),
) + _head_rules(_BN, 'bn')

# OpenGVLab/Official-ConvMAE-Det GeneralizedRCNN (SimpleFeaturePyramid over ConvViT, StandardRPNHead, LN heads)
# -> mmdet 3.x MaskRCNN with ConvMAE + SimpleFeaturePyramid (the same module names under ``neck.``).
VITDET_RULES: Tuple[Rule, ...] = (
    (r'backbone\.net\.((patch_embed[1-4]|blocks[1-3])\..+|pos_embed)', r'backbone.\1'),
    (r'backbone\.(simfp_[2-5]\.\d+\.(weight|bias|norm\.weight|norm\.bias))', r'neck.\1'),
) + _head_rules(r'(weight|bias)', 'ln')

# mmseg 0.x EncoderDecoder (UPerHead + FCNHead) -> mmseg 1.x: the same module names (ConvModule ``conv``/``bn``).
_CONV_MODULE = rf'(conv\.(weight|bias)|bn\.{_BN})'
SEG_RULES: Tuple[Rule, ...] = (
    (r'backbone\..*relative_position_index', None),
    (r'backbone\.(.+)', r'backbone.\1'),
    (rf'decode_head\.((psp_modules\.\d+\.1|bottleneck|lateral_convs\.\d+|fpn_convs\.\d+|fpn_bottleneck)'
     rf'\.{_CONV_MODULE})', r'decode_head.\1'),
    (r'(decode_head|auxiliary_head)\.conv_seg\.(weight|bias)', r'\1.conv_seg.\2'),
    (rf'auxiliary_head\.((convs\.\d+|conv_cat)\.{_CONV_MODULE})', r'auxiliary_head.\1'),
)

# Official ConvViT(global_pool=True) fine-tuned on ImageNet -> mmpretrain ImageClassifier.
CLS_RULES: Tuple[Rule, ...] = (
    (r'((patch_embed[1-4]|blocks[1-3])\..+|pos_embed)', r'backbone.\1'),
    (r'fc_norm\.(weight|bias)', r'backbone.fc_norm.\1'),
    (r'head\.(weight|bias)', r'head.fc.\1'),
)

# Keys whose presence identifies each source format (used to reject a checkpoint of another kind).
SIGNATURES: Dict[str, Tuple[str, ...]] = {
    'det': ('backbone.bottom_up.patch_embed1.proj.weight', 'backbone.fpn_lateral2.weight',
            'proposal_generator.rpn_head.objectness_logits.weight', 'roi_heads.box_predictor.cls_score.weight',
            'roi_heads.mask_head.predictor.weight'),
    'vitdet': ('backbone.net.patch_embed1.proj.weight', 'backbone.net.pos_embed', 'backbone.simfp_2.0.weight',
               'backbone.simfp_5.2.weight'),
    'seg': ('backbone.patch_embed1.proj.weight', 'decode_head.conv_seg.weight', 'auxiliary_head.conv_seg.weight'),
    'cls': ('patch_embed1.proj.weight', 'fc_norm.weight', 'head.weight'),
}
DESCRIPTIONS = {
    'det': 'official ConvMAE detector (detectron2 GeneralizedRCNN, DET/)',
    'vitdet': 'official ViTDet-style ConvMAE detector (detectron2 GeneralizedRCNN with SimpleFeaturePyramid, '
              'OpenGVLab/Official-ConvMAE-Det)',
    'seg': 'official ConvMAE segmentor (mmseg 0.x UperNet, SEG/)',
    'cls': 'official ConvMAE fine-tuned classifier (models_convvit.ConvViT)',
}
RULES: Dict[str, Tuple[Rule, ...]] = {'det': DET_RULES, 'vitdet': VITDET_RULES, 'seg': SEG_RULES, 'cls': CLS_RULES}
#: The parts of a converted model, by key prefix, that a checkpoint of that kind may lack (``vitdet``: a file with
#: only the backbone and the pyramid, e.g. for fine-tuning); :func:`convert` reports the ones it lacks.
OPTIONAL_PARTS: Dict[str, Dict[str, str]] = {
    'vitdet': {'RPN head': 'rpn_head.', 'box head': 'roi_head.bbox_head.', 'mask head': 'roi_head.mask_head.'}}


# ------------------------------------------------------------------------------------------------ helpers
def apply_rules(state: Mapping[str, Tensor], rules: Sequence[Rule],
                source: str) -> Tuple['OrderedDict[str, Tensor]', List[str]]:
    """Rename every key of ``state`` by the first rule whose pattern matches it in full.

    Returns ``(converted, dropped)``. Raises :class:`CheckpointError` listing every key that matches no rule
    and every target written twice.
    """
    compiled = [(re.compile(p), t) for p, t in rules]
    out: 'OrderedDict[str, Tensor]' = OrderedDict()
    dropped, unmapped, clashes = [], [], []
    for key, value in state.items():
        for pattern, target in compiled:
            m = pattern.fullmatch(key)
            if m is None:
                continue
            if target is None:
                dropped.append(key)
            else:
                new = target(m) if callable(target) else m.expand(target)
                if new in out:
                    clashes.append(new)
                out[new] = value
            break
        else:
            unmapped.append(key)
    if unmapped:
        raise CheckpointError(f'{source}: {len(unmapped)} key(s) map to nothing in the target model: {unmapped}')
    if clashes:
        raise CheckpointError(f'{source}: several source keys map to {clashes}')
    return out, dropped


def fill_num_batches_tracked(state: 'OrderedDict[str, Tensor]') -> List[str]:
    """Add ``num_batches_tracked = 0`` next to every ``running_mean`` that lacks it (older checkpoints omit it);
    returns the keys added."""
    added = []
    for key in [k for k in state if k.endswith('.running_mean')]:
        nbt = key[:-len('running_mean')] + 'num_batches_tracked'
        if nbt not in state:
            state[nbt] = torch.tensor(0, dtype=torch.long)
            added.append(nbt)
    return added


def _as_tensor(key: str, value, source: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):  # of a plain numeric dtype, its bytes checked (checkpoint.plain_data)
        try:
            return torch.from_numpy(np.ascontiguousarray(value))
        except TypeError as exc:  # a numpy dtype torch has no counterpart of
            raise CheckpointError(f'{source}: value of {key!r}: {exc}') from None
    raise CheckpointError(f'{source}: value of {key!r} is a {type(value).__name__}, not a tensor or array')


def model_state(ckpt, source: str, kind: Optional[str] = None) -> 'OrderedDict[str, Tensor]':
    """The weights dict of a checkpoint (:func:`..checkpoint.checkpoint_weights`: ``ckpt['state_dict']`` (mmcv /
    mmengine), ``ckpt['model']`` (official, detectron2) or ``ckpt`` itself); numpy arrays become tensors. With
    ``kind``, first check that the keys are those of that kind (:func:`check_kind`)."""
    state = checkpoint_weights(ckpt, source)
    if kind is not None:
        check_kind(state, kind, source)
    return OrderedDict((k, _as_tensor(k, v, source)) for k, v in state.items())


def check_kind(state: Mapping, kind: str, source: str) -> None:
    """Raise :class:`CheckpointError` if ``state`` lacks a signature key of ``kind``, naming the missing keys and
    the kind the checkpoint looks like instead."""
    missing = [k for k in SIGNATURES[kind] if k not in state]
    if not missing:
        return
    other = [k for k in KINDS if k != kind and all(s in state for s in SIGNATURES[k])]
    hint = f'; it looks like a {other[0]!r} checkpoint ({DESCRIPTIONS[other[0]]})' if other else ''
    raise CheckpointError(f'{source} is not an {DESCRIPTIONS[kind]} checkpoint: missing expected keys '
                          f'{missing}{hint}')


def load_source(path: str) -> dict:
    """Read a checkpoint with :func:`..checkpoint.safe_torch_load`, or a plain pickle of numpy arrays (detectron2
    ``.pkl``) with :func:`..checkpoint.load_weights_pickle`. Any unreadable file, and any file naming a global
    that neither allows, raises :class:`CheckpointError`."""
    if not os.path.isfile(path) or is_torch_zip(path):
        return safe_torch_load(path)
    first = load_weights_pickle(path)
    return first if isinstance(first, dict) else safe_torch_load(path)  # a legacy torch file: magic number first


# --------------------------------------------------------------------------------------- per format
def convert_det(state: Mapping[str, Tensor], source: str = 'checkpoint') -> Tuple[dict, List[str]]:
    """detectron2 0.6 ``GeneralizedRCNN`` (official ConvMAE DET) weights -> mmdet 3.x ``MaskRCNN`` keys.

    Shapes are unchanged: ``cls_score`` (K + 1, C) with background last, ``bbox_pred`` (4K, C), RPN
    ``objectness_logits`` (A, C, 1, 1) and ``anchor_deltas`` (4A, C, 1, 1). Returns (state_dict, dropped keys).
    """
    check_kind(state, 'det', source)
    out, dropped = apply_rules(state, DET_RULES, source)
    fill_num_batches_tracked(out)
    return out, dropped


def convert_vitdet(state: Mapping[str, Tensor], source: str = 'checkpoint') -> Tuple[dict, List[str]]:
    """OpenGVLab/Official-ConvMAE-Det ``GeneralizedRCNN`` weights -> mmdet 3.x ``MaskRCNN`` keys of
    ``configs/mmdet/mask-rcnn_convmae-b_simplefpn_lsj-25e_coco.py``: the encoder (``backbone.net.``) under
    ``backbone.``, the pyramid (``backbone.simfp_*``) under ``neck.``, the heads as for ``det`` with their LN
    weights at ConvModule's ``ln``. Shapes are unchanged. Returns (state_dict, dropped keys)."""
    check_kind(state, 'vitdet', source)
    return apply_rules(state, VITDET_RULES, source)


def convert_seg(state: Mapping[str, Tensor], source: str = 'checkpoint') -> Tuple[dict, List[str]]:
    """mmseg 0.x UperNet + FCNHead (official ConvMAE SEG) weights -> mmseg 1.x keys. The backbone's ``fpn``
    (Conv2d -> SyncBN -> GELU, the H/32 branch) passes through. Returns (state_dict, dropped keys)."""
    check_kind(state, 'seg', source)
    out, dropped = apply_rules(state, SEG_RULES, source)
    fill_num_batches_tracked(out)
    return out, dropped


def convert_cls(state: Mapping[str, Tensor], source: str = 'checkpoint') -> Tuple[dict, List[str]]:
    """Official fine-tuned ``ConvViT(global_pool=True)`` weights -> mmpretrain ``ImageClassifier`` keys: encoder
    under ``backbone.``, ``fc_norm`` owned by the backbone, ``head`` as ``LinearClsHead.fc``."""
    check_kind(state, 'cls', source)
    return apply_rules(state, CLS_RULES, source)


CONVERTERS: Dict[str, Callable[[Mapping[str, Tensor], str], Tuple[dict, List[str]]]] = {
    'det': convert_det, 'vitdet': convert_vitdet, 'seg': convert_seg, 'cls': convert_cls}


def _dataset_meta(kind: str) -> Optional[dict]:
    """Class names of the dataset the released model was trained on (their order is the model's)."""
    if kind in ('det', 'vitdet'):
        from mmdet.datasets import CocoDataset
        return dict(classes=tuple(CocoDataset.METAINFO['classes']))
    if kind == 'seg':
        from mmseg.datasets import ADE20KDataset
        return dict(classes=tuple(ADE20KDataset.METAINFO['classes']))
    return None


def convert(kind: str, src_path: str, dst_path: str) -> dict:
    """Convert the official checkpoint ``src_path`` of ``kind`` (one of :data:`KINDS`) and write
    ``{'state_dict': ..., 'meta': ...}`` to ``dst_path`` atomically. Returns a report: ``converted`` (number
    of tensors written), ``dropped`` (source keys left out by the documented rules), ``missing_parts`` (the
    :data:`OPTIONAL_PARTS` the checkpoint holds no weights of)."""
    if kind not in CONVERTERS:
        raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
    state = model_state(load_source(src_path), src_path, kind)
    converted, dropped = CONVERTERS[kind](state, src_path)
    missing_parts = [part for part, prefix in OPTIONAL_PARTS.get(kind, {}).items()
                     if not any(k.startswith(prefix) for k in converted)]
    meta = dict(converted_from=os.path.basename(src_path), source_format=DESCRIPTIONS[kind])
    dataset_meta = _dataset_meta(kind)
    if dataset_meta is not None:
        meta['dataset_meta'] = dataset_meta
    atomic_write(dst_path, lambda f: torch.save({'state_dict': converted, 'meta': meta}, f))
    return dict(converted=len(converted), dropped=dropped, missing_parts=missing_parts)
