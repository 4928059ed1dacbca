"""Adapting ConvMAE weights of any supported checkpoint format to a model (file reading: ``..checkpoint``).

Formats: official ConvMAE pretraining and fine-tuned checkpoints (``{'model': ...}``), mmengine checkpoints of
this project (``{'state_dict': ...}``), exported backbone weights (plain state dicts), detector/segmentor
checkpoints (``backbone.`` prefix, DDP ``module.``) including the official mmseg 0.x segmentor and the official
detectron2 detectors (encoder under ``backbone.bottom_up.``, beside the FPN's own ``backbone.fpn_*`` keys, or, in
the ViTDet-style one, under ``backbone.net.``, beside the pyramid's ``backbone.simfp_*``). The
position embedding is resized to the model's grid and relative-position tables to the model's sizes (BEiT tables
bicubically over their 2-D offsets); ``relative_position_index`` buffers of official checkpoints are dropped
(recomputed by the model); any other shape mismatch is an error naming the key.
"""
import logging
from collections import OrderedDict
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from torch import Tensor, nn

from ..checkpoint import CheckpointError, safe_torch_load
from .attention import resize_relative_position_table
from .utils import resize_pos_embed

# Wrappers put around the encoder's own names by detectors, segmentors, DDP and EMA.
STRIP_PREFIXES = ('module.', 'backbone.', 'encoder.', 'model.')
# Where a detector/segmentor keeps its encoder, most specific first: detectron2 FPN backbones wrap it as
# ``bottom_up``, its SimpleFeaturePyramid as ``net``; mmdet/mmseg models hold it at ``backbone``.
ENCODER_PREFIXES = ('backbone.bottom_up.', 'backbone.net.', 'backbone.')
# Buffers of official checkpoints that the model recomputes.
RECOMPUTED_BUFFERS = ('relative_position_index',)
#: The modules a pretraining checkpoint holds on top of the encoder (``ConvMAEPretrainer``'s fusion, final norm and
#: decoder): skipped with one log line when weights are loaded into an encoder.
PRETRAINING_ONLY = ('stage1_output_decode', 'stage2_output_decode', 'norm', 'decoder_embed', 'mask_token',
                    'decoder_pos_embed', 'decoder_blocks', 'decoder_norm', 'decoder_pred')


def extract_state_dict(ckpt) -> Dict[str, Tensor]:
    """The model weights of a loaded checkpoint in any supported format, with wrapper prefixes removed.

    For a detector or segmentor only the encoder's weights are kept (keys under ``backbone.bottom_up.`` or
    ``backbone.net.`` in a detectron2 detector, else under ``backbone.``).
    """
    if isinstance(ckpt, dict):
        for key in ('state_dict', 'model', 'module'):
            if key in ckpt and isinstance(ckpt[key], dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'expected a dict of weights, found {type(ckpt).__name__}')
    state = OrderedDict((k, v) for k, v in ckpt.items() if isinstance(v, Tensor))
    encoder = next((p for p in ENCODER_PREFIXES if any(k.startswith((p, 'module.' + p)) for k in state)), None)
    out = OrderedDict()
    for k, v in state.items():
        if encoder is not None:
            if not k.startswith((encoder, 'module.' + encoder)):
                continue  # a detector/segmentor: keep only its encoder
            k = k[k.index(encoder) + len(encoder):]
        changed = True
        while changed:
            changed = False
            for p in STRIP_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _square_grid(n: int, key: str, path: str) -> Tuple[int, int]:
    side = int(round(n ** 0.5))
    if side * side != n:
        raise CheckpointError(f'{path}: cannot infer the grid of {key} with {n} tokens')
    return side, side


def _at_least_float32(value: Tensor) -> Tensor:
    """``value`` in float32, or float64 if it is float64 (interpolation in half precision is inexact)."""
    return value.to(torch.promote_types(value.dtype, torch.float32))


def adapt_tensor(model: nn.Module, key: str, value: Tensor, target: torch.Size, path: str) -> Tensor:
    """``value`` of checkpoint ``key`` shaped for the model's ``target`` shape: ``pos_embed`` resized to the
    model's grid, relative-position tables interpolated; any other mismatch raises :class:`CheckpointError`."""
    if value.shape == target:
        return value
    if key.endswith('pos_embed') and value.dim() == 3 and value.shape[-1] == target[-1]:
        src, dst = _square_grid(value.shape[1], key, path), model.pos_grid
        print_log(f'resized {key} from grid {src} to {dst}', logger='current')
        return resize_pos_embed(_at_least_float32(value), src, dst).to(value.dtype)
    if key.endswith(('rel_pos_h', 'rel_pos_w')) and value.shape[1:] == target[1:]:
        return F.interpolate(value.t().unsqueeze(0).float(), size=target[0], mode='linear').squeeze(0).t().to(
            value.dtype)
    if key.endswith('relative_position_bias_table') and value.dim() == 2 and value.shape[1] == target[1]:
        side = int(round(value.shape[0] ** 0.5))
        if side * side != value.shape[0] or side % 2 == 0:
            raise CheckpointError(f'{path}: {key} with {value.shape[0]} offsets is not the table of a square grid')
        src = ((side + 1) // 2,) * 2
        dst = model.get_submodule(key.rsplit('.', 1)[0]).table_size
        print_log(f'resized {key} from grid {src} to {dst}', logger='current')
        return resize_relative_position_table(_at_least_float32(value), src, dst).to(value.dtype)
    raise CheckpointError(f'{path}: shape mismatch for {key}: checkpoint {tuple(value.shape)}, model '
                          f'{tuple(target)} (a different architecture?)')


def load_pretrained(model: nn.Module, path: str) -> List[str]:
    """Load ConvMAE weights from the checkpoint file ``path`` into ``model`` (any ConvViT subclass).

    Missing and unexpected keys are logged; the pretraining-only modules (decoder, fusion, final norm) of a
    pretraining checkpoint are skipped with one log line. Returns the list of missing keys.
    """
    state = extract_state_dict(safe_torch_load(path))
    recomputed = [k for k in state if k.rsplit('.', 1)[-1] in RECOMPUTED_BUFFERS]
    for k in recomputed:
        del state[k]
    own = model.state_dict()
    if not any(k in own for k in state):
        raise CheckpointError(f'checkpoint {path!r} holds no ConvMAE weights (none of its {len(state)} keys, e.g. '
                              f'{list(state)[:3]}, is a ConvMAE key)')
    extra = [k for k in state if k not in own]
    ignored = [k for k in extra if k.split('.', 1)[0] in PRETRAINING_ONLY]
    unexpected = [k for k in extra if k not in ignored]
    to_load = OrderedDict((k, adapt_tensor(model, k, v, own[k].shape, path)) for k, v in state.items() if k in own)
    missing = [k for k in own if k not in to_load]
    model.load_state_dict(to_load, strict=False)
    print_log(f'loaded {len(to_load)} ConvMAE weights from {path}', logger='current')
    if recomputed:
        print_log(f'dropped {len(recomputed)} relative_position_index buffers (recomputed)', logger='current')
    if ignored:
        print_log(f'ignored {len(ignored)} pretraining-only keys (decoder, fusion, final norm)', logger='current')
    if unexpected:
        print_log(f'unexpected keys in {path}: {unexpected}', logger='current', level=logging.WARNING)
    if missing:
        print_log(f'missing keys (left at their initialisation): {missing}', logger='current',
                  level=logging.WARNING)
    return missing
