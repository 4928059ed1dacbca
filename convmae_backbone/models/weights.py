"""Adapting ConvMAE weights of any supported checkpoint format to a model (file reading: ``..checkpoint``).

Formats: official ConvMAE pretraining and fine-tuned checkpoints (``{'model': ...}``), mmengine checkpoints of
this project (``{'state_dict': ...}``), exported backbone weights (plain state dicts), detector/segmentor
checkpoints (``backbone.`` prefix, DDP ``module.``) including the official mmseg 0.x segmentor and the official
detectron2 detectors (encoder under ``backbone.bottom_up.``, beside the FPN's own ``backbone.fpn_*`` keys, or, in
the ViTDet-style one, under ``backbone.net.``, beside the pyramid's ``backbone.simfp_*``); with mmengine's
``prefix`` the keys under that prefix, stripped. The position embedding is resized to the model's grid
and relative-position tables to the model's sizes (BEiT tables bicubically over their 2-D offsets) by a
``load_state_dict`` pre-hook of the encoder (:func:`resize_on_load`), so that every way of loading weights into
it (``init_cfg``, mmengine's ``load_from``, a plain ``load_state_dict``) resizes; ``relative_position_index``
buffers of official checkpoints are dropped (recomputed by the model); any other shape mismatch is an error
naming the key. ConvMAE-v2 checkpoints load too: their ``cls_token`` is skipped and the class-token row of their
``pos_embed`` dropped (:data:`CLASS_TOKEN`).
"""
import logging
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from torch import Tensor, nn

from ..checkpoint import CheckpointError, checkpoint_weights, load_checkpoint
from .attention import resize_relative_position_table
from .utils import pos_embed_layout, resize_pos_embed

# Wrappers put around the encoder's own names by detectors, segmentors, DDP and EMA.
STRIP_PREFIXES = ('module.', 'backbone.', 'encoder.', 'model.')
# Where a detector/segmentor keeps its encoder, most specific first: detectron2 FPN backbones wrap it as
# ``bottom_up``, its SimpleFeaturePyramid as ``net``; mmdet/mmseg models hold it at ``backbone``.
ENCODER_PREFIXES = ('backbone.bottom_up.', 'backbone.net.', 'backbone.')
# Buffers of official checkpoints that the model recomputes.
RECOMPUTED_BUFFERS = ('relative_position_index',)
#: The class token of ConvMAE-v2 checkpoints (Alpha-VL/ConvMAE#19), which no downstream model uses: skipped with
#: one log line, and the class-token row of their ``pos_embed`` dropped (:func:`resize_tensor`), as ViTDet does
#: with ``pretrain_use_cls_token``.
CLASS_TOKEN = 'cls_token'
#: What a pretraining checkpoint holds on top of the encoder, defined once. ``PRETRAINING_DECODER``: the final norm
#: and the MAE decoder, in every pretraining checkpoint. ``PRETRAINING_OPTIONAL``: the multi-scale fusion (absent
#: with ``multiscale_fusion=False``) and the feature-mimicking heads (present with ``mimic``).
PRETRAINING_DECODER = ('norm', 'decoder_embed', 'mask_token', 'decoder_pos_embed', 'decoder_blocks', 'decoder_norm',
                       'decoder_pred')
PRETRAINING_OPTIONAL = ('stage1_output_decode', 'stage2_output_decode', 'mimic_heads')
#: Every module a pretraining checkpoint may hold on top of the encoder: skipped with one log line when weights
#: are loaded into an encoder.
PRETRAINING_ONLY = PRETRAINING_DECODER + PRETRAINING_OPTIONAL
#: The keys of a ``Pretrained`` init_cfg: mmengine's ``PretrainedInit`` ones and ``min_loaded`` (the least
#: fraction of the encoder's tensors the checkpoint must fill; 0.0 accepts any checkpoint with a ConvMAE key).
PRETRAINED_KEYS = ('type', 'checkpoint', 'prefix', 'map_location', 'min_loaded')
MIN_LOADED = 0.5


def is_pretraining_only(key: str) -> bool:
    """Whether a weight key (relative to the model) belongs to a module of :data:`PRETRAINING_ONLY`."""
    return key.split('.', 1)[0] in PRETRAINING_ONLY


def holds_decoder(keys: Iterable[str]) -> bool:
    """Whether weight keys (relative to the model) hold every module of :data:`PRETRAINING_DECODER` (then, with
    an encoder, they are a pretraining model; the :data:`PRETRAINING_OPTIONAL` modules may be absent)."""
    return set(PRETRAINING_DECODER) <= {k.split('.', 1)[0] for k in keys}


def extract_state_dict(ckpt: Any, prefix: Optional[str] = None, source: str = 'checkpoint') -> Dict[str, Tensor]:
    """The model weights of a loaded checkpoint in any supported format, with wrapper prefixes removed.

    For a detector or segmentor only the encoder's weights are kept (keys under ``backbone.bottom_up.`` or
    ``backbone.net.`` in a detectron2 detector, else under ``backbone.``). With ``prefix`` (mmengine's
    ``PretrainedInit`` semantics), the keys that start with it, stripped of it, and nothing else; raises
    :class:`CheckpointError` naming ``source`` if there are none.
    """
    state = OrderedDict((k, v) for k, v in checkpoint_weights(ckpt, source).items() if isinstance(v, Tensor))
    if prefix is not None:
        prefix = prefix if prefix.endswith('.') else prefix + '.'
        selected = OrderedDict((k[len(prefix):], v) for k, v in state.items() if k.startswith(prefix))
        if not selected:
            raise CheckpointError(f'{source}: no weight key starts with prefix {prefix!r} (first keys: '
                                  f'{list(state)[:5]})')
        return selected
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


# ----------------------------------------------------------------------------------------- resizing
def _pos_embed_grid(value: Tensor, key: str) -> Tuple[Tensor, Tuple[int, int]]:
    """A stored (1, N, C) position embedding without its class-token row, if it has one (ConvMAE-v2:
    N = side * side + 1, :func:`.utils.pos_embed_layout`), and its square grid."""
    try:
        side, prefix = pos_embed_layout(value.shape[1], key)
    except ValueError as exc:
        raise CheckpointError(f"{exc}: cannot resize it to the model's grid") from None
    if prefix:
        print_log(f'dropped the class-token row of {key} (ConvMAE-v2 layout)', logger='current')
    return value[:, prefix:], (side, side)


def _at_least_float32(value: Tensor) -> Tensor:
    """``value`` in float32, or float64 if it is float64 (interpolation in half precision is inexact)."""
    return value.to(torch.promote_types(value.dtype, torch.float32))


def resizable(key: str, value: Tensor, target: torch.Size) -> bool:
    """Whether ``value`` of ``key`` can take the model's ``target`` shape by :func:`resize_tensor`: a position
    embedding of another grid, a decomposed relative position table of another length, a BEiT table of another
    size."""
    if key.endswith('pos_embed'):
        return value.dim() == 3 and value.shape[-1] == target[-1]
    if key.endswith(('rel_pos_h', 'rel_pos_w')):
        return value.dim() == 2 and value.shape[1:] == target[1:]
    if key.endswith('relative_position_bias_table'):
        return value.dim() == 2 and value.shape[1] == target[1]
    return False


def resize_tensor(model: nn.Module, key: str, value: Tensor, target: torch.Size) -> Tensor:
    """``value`` of ``key`` (a :func:`resizable` one, relative to the encoder ``model``) shaped ``target``:
    ``pos_embed`` resized bicubically to the model's grid, ``rel_pos_h/w`` linearly, BEiT relative-position
    tables bicubically over their 2-D offsets."""
    if value.shape == target:
        return value
    if key.endswith('pos_embed'):
        (value, src), dst = _pos_embed_grid(value, key), model.pos_grid
        if src == dst:
            return value
        print_log(f'resized {key} from grid {src} to {dst}', logger='current')
        return resize_pos_embed(_at_least_float32(value), src, dst).to(value.dtype)
    if key.endswith(('rel_pos_h', 'rel_pos_w')):
        return F.interpolate(value.t().unsqueeze(0).float(), size=target[0], mode='linear').squeeze(0).t().to(
            value.dtype)
    side = int(round(value.shape[0] ** 0.5))
    if side * side != value.shape[0] or side % 2 == 0:
        raise CheckpointError(f'{key} with {value.shape[0]} offsets is not the table of a square grid')
    src = ((side + 1) // 2,) * 2
    dst = model.get_submodule(key.rsplit('.', 1)[0]).table_size
    print_log(f'resized {key} from grid {src} to {dst}', logger='current')
    return resize_relative_position_table(_at_least_float32(value), src, dst).to(value.dtype)


def resize_on_load(model: nn.Module, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook of the encoder: in ``state_dict`` (keys under ``prefix``), resize position
    embeddings and relative-position tables of other sizes to the model's (:func:`resize_tensor`) and drop the
    ``relative_position_index`` buffers the model recomputes. Other shape mismatches are left to
    ``load_state_dict`` to report."""
    own = model.state_dict()
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name, value = key[len(prefix):], state_dict[key]
        if name not in own:
            if name.rsplit('.', 1)[-1] in RECOMPUTED_BUFFERS:
                del state_dict[key]
        elif isinstance(value, Tensor) and value.shape != own[name].shape and resizable(name, value,
                                                                                         own[name].shape):
            state_dict[key] = resize_tensor(model, name, value, own[name].shape)


# ------------------------------------------------------------------------------------------ coverage
def fill_counts(own: Iterable[str], loaded: Iterable[str]) -> str:
    """'name loaded/total' for every top-level module (first name component) of the keys ``own``, e.g.
    ``'patch_embed1 4/4, blocks1 0/24'``."""
    loaded = set(loaded)
    counts: Dict[str, List[int]] = OrderedDict()
    for key in own:
        top = counts.setdefault(key.split('.', 1)[0], [0, 0])
        top[0] += key in loaded
        top[1] += 1
    return ', '.join(f'{name} {n}/{total}' for name, (n, total) in counts.items())


def check_filled(own: Sequence[str], loaded: Iterable[str], min_loaded: float, source: str, what: str,
                 advice: str) -> None:
    """Raise :class:`CheckpointError` if fewer than ``min_loaded`` of the keys ``own`` (of ``what``, e.g. 'the
    encoder') are ``loaded`` from ``source``, listing :func:`fill_counts`, then ``advice``."""
    loaded = set(loaded) & set(own)
    if len(loaded) < min_loaded * len(own):
        raise CheckpointError(f'{source} fills only {len(loaded)} of the {len(own)} tensors of {what} (fewer than '
                              f'{min_loaded:.0%}); loaded per module: {fill_counts(own, loaded)}. Is it a '
                              f'checkpoint of this model? {advice}')


# ------------------------------------------------------------------------------------------- init_cfg
def split_init_cfg(init_cfg: Any) -> Tuple[List[dict], List[dict]]:
    """(``Pretrained`` entries, other entries) of an mmengine ``init_cfg``: None, a dict or a list of dicts.
    Raises ``ValueError`` for a ``Pretrained`` entry without ``checkpoint`` or with a key not in
    :data:`PRETRAINED_KEYS`."""
    cfgs = [] if not init_cfg else [init_cfg] if isinstance(init_cfg, dict) else list(init_cfg)
    pretrained = [dict(c) for c in cfgs if c.get('type') == 'Pretrained']
    for cfg in pretrained:
        unknown = sorted(set(cfg) - set(PRETRAINED_KEYS))
        if unknown or not cfg.get('checkpoint'):
            raise ValueError(f"init_cfg {cfg}: a 'Pretrained' entry takes checkpoint=PATH_OR_URL and optionally "
                             f'{", ".join(PRETRAINED_KEYS[2:])}' + (f'; unknown: {unknown}' if unknown else ''))
        if not 0.0 <= cfg.get('min_loaded', MIN_LOADED) <= 1.0:
            raise ValueError(f"init_cfg {cfg}: min_loaded is a fraction of the encoder's tensors, in [0, 1]")
    return pretrained, [c for c in cfgs if c.get('type') != 'Pretrained']


def pretrained_state(cfg: dict) -> Dict[str, Tensor]:
    """The encoder weights a ``Pretrained`` init_cfg entry names: the file or URL ``checkpoint`` read through
    mmengine's ``CheckpointLoader`` (:func:`..checkpoint.load_checkpoint`), in any supported format, or the
    keys under ``prefix`` (:func:`extract_state_dict`)."""
    ckpt = load_checkpoint(cfg['checkpoint'], cfg.get('map_location', 'cpu'))
    return extract_state_dict(ckpt, cfg.get('prefix'), cfg['checkpoint'])


def load_pretrained(model: nn.Module, checkpoint: str, prefix: Optional[str] = None,
                    min_loaded: float = MIN_LOADED, map_location: Any = 'cpu',
                    state: Optional[Dict[str, Tensor]] = None) -> List[str]:
    """Load ConvMAE weights from ``checkpoint`` (a path or any URL scheme mmengine knows; ``prefix``: only the
    keys under it) into ``model`` (any ConvViT subclass), or the already read ``state`` of that checkpoint.

    Raises :class:`CheckpointError` if no key is a ConvMAE key, for a shape mismatch that is not a resizing
    (:func:`resizable`), and if fewer than ``min_loaded`` of the encoder's tensors are filled (listing what
    matched per module). Missing and unexpected keys are logged; the pretraining-only modules (decoder, fusion,
    final norm) of a pretraining checkpoint are skipped with one log line. Returns the missing keys.
    """
    if state is None:
        state = pretrained_state(dict(checkpoint=checkpoint, prefix=prefix, map_location=map_location))
    own = model.state_dict()
    recomputed = [k for k in state if k not in own and k.rsplit('.', 1)[-1] in RECOMPUTED_BUFFERS]
    state = OrderedDict((k, v) for k, v in state.items() if k not in recomputed)
    if not any(k in own for k in state):
        raise CheckpointError(f'checkpoint {checkpoint!r} holds no ConvMAE weights (none of its {len(state)} keys, '
                              f'e.g. {list(state)[:3]}, is a ConvMAE key)')
    for k, v in state.items():
        if k in own and v.shape != own[k].shape and not resizable(k, v, own[k].shape):
            raise CheckpointError(f'{checkpoint}: shape mismatch for {k}: checkpoint {tuple(v.shape)}, model '
                                  f'{tuple(own[k].shape)} (a different architecture?)')
    extra = [k for k in state if k not in own]
    ignored = [k for k in extra if is_pretraining_only(k)]
    class_token = [k for k in extra if k == CLASS_TOKEN]
    unexpected = [k for k in extra if k not in ignored and k not in class_token]
    to_load = OrderedDict((k, v) for k, v in state.items() if k in own)
    encoder = [k for k in own if model.stage_of(k) is not None]
    check_filled(encoder, to_load, min_loaded, f'checkpoint {checkpoint!r}', 'the encoder',
                 "To load it anyway, set min_loaded=0.0 in the init_cfg's Pretrained entry.")
    missing = [k for k in own if k not in to_load]
    try:
        model.load_state_dict(to_load, strict=False)  # resize_on_load resizes
    except CheckpointError as exc:
        raise CheckpointError(f'{checkpoint}: {exc}') from None
    print_log(f'loaded {len(to_load)} ConvMAE weights from {checkpoint}', logger='current')
    if recomputed:
        print_log(f'dropped {len(recomputed)} relative_position_index buffers (recomputed)', logger='current')
    if ignored:
        print_log(f'ignored {len(ignored)} pretraining-only keys (decoder, fusion, final norm, mimic heads)',
                  logger='current')
    if class_token:
        print_log(f'ignored {CLASS_TOKEN} (ConvMAE-v2): the model uses the patch tokens only', logger='current')
    if unexpected:
        print_log(f'unexpected keys in {checkpoint}: {unexpected}', logger='current', level=logging.WARNING)
    if missing:
        print_log(f'missing keys (left at their initialisation): {missing}', logger='current',
                  level=logging.WARNING)
    return missing
