"""detectron2's ``DetectionCheckpointer`` reading through the safe loader, writing atomically, and loading ConvMAE
weights of any supported format into a detector.

detectron2 unpickles ``.pkl`` files with plain ``pickle`` and everything else with ``torch.load``: both can run
code. :func:`register_safe_detectron2_checkpointer` (called by ``import convmae_backbone.detectron2``) replaces
the reading of every file by ``DetectionCheckpointer`` (``load``, ``resume_or_load``, so ``train.init_checkpoint``
and ``--resume``) with :func:`convmae_backbone.checkpoint.load_weights_pickle` (``.pkl``: numpy weights only)
and :func:`convmae_backbone.checkpoint.safe_torch_load`, and its writing with
:func:`convmae_backbone.checkpoint.atomic_write`. On top, for a detector holding a ConvMAE encoder:

- a checkpoint of the encoder alone (official ImageNet pretraining or fine-tuning ``{'model': ...}``, this
  project's pretraining checkpoints, exported backbones) is loaded into the encoder (``backbone.net.`` /
  ``backbone.bottom_up.``), its pretraining-only modules skipped;
- the encoder's position table and relative position tables of other sizes are resized to the model's before
  detectron2 compares shapes (it drops mismatched keys before any ``load_state_dict`` pre-hook could resize
  them), and the official ``relative_position_index`` buffers, which the model recomputes, are dropped.
"""
import logging
import os.path as osp
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from ..checkpoint import atomic_write, checkpoint_weights, load_weights_pickle, safe_torch_load
from ..models.convvit import ConvViT
from ..models.weights import extract_state_dict, resize_on_load

logger = logging.getLogger(__name__)

_ORIGINAL_LOAD_FILE = DetectionCheckpointer._load_file
_ORIGINAL_LOAD_MODEL = DetectionCheckpointer._load_model


def encoders(model: nn.Module) -> List[Tuple[str, ConvViT]]:
    """(prefix with a trailing dot, module) of every ConvMAE encoder in ``model`` (not nested in another)."""
    found: List[Tuple[str, ConvViT]] = []
    for name, module in model.named_modules():
        if isinstance(module, ConvViT) and not any(name.startswith(p) for p, _ in found):
            found.append((f'{name}.' if name else '', module))
    return found


def _read_pkl(filename: str) -> Dict[str, Any]:
    """A detectron2 ``.pkl`` (model zoo, or Caffe2/Detectron1 ``blobs``), read as numpy weights only; the dict
    detectron2's own reader returns."""
    data = load_weights_pickle(filename)
    if not isinstance(data, dict):
        raise ValueError(f'{filename}: a .pkl checkpoint holds a dict, found {type(data).__name__}')
    if 'model' in data and '__author__' in data:
        return data
    data = data.get('blobs', data)
    data = {k: v for k, v in data.items() if not k.endswith('_momentum')}
    return {'model': data, '__author__': 'Caffe2', 'matching_heuristics': True}


def _encoder_checkpoint(model: nn.Module, data: Dict[str, Any], filename: str) -> Dict[str, Any]:
    """``data`` with the weights of a checkpoint of the ConvMAE encoder alone put under the detector's encoder
    prefix; ``data`` unchanged when its keys are the detector's own or it holds no ConvMAE weights."""
    found = encoders(model)
    weights = data.get('model')
    own = model.state_dict()
    if not found or not isinstance(weights, dict) or any(k in own for k in weights):
        return data
    state = extract_state_dict(checkpoint_weights(weights, filename), source=filename)
    prefix, encoder = found[0]
    names = set(encoder.state_dict())
    kept = {prefix + k: v for k, v in state.items() if k in names}
    if not kept:
        return data
    logger.info('%s: %d ConvMAE encoder weights loaded into %s (%d other keys skipped)', filename, len(kept),
                prefix.rstrip('.'), len(state) - len(kept))
    return {'model': kept, '__author__': 'convmae_backbone'}


def _safe_load_file(self: DetectionCheckpointer, filename: str) -> Dict[str, Any]:
    """``DetectionCheckpointer._load_file`` through the safe loader."""
    if filename.endswith('.pkl'):
        data = _read_pkl(filename)
    elif filename.endswith('.pyth'):  # pycls
        raw = safe_torch_load(filename)
        data = {'model': {k: v for k, v in raw['model_state'].items() if not k.endswith('num_batches_tracked')},
                '__author__': 'pycls', 'matching_heuristics': True}
    else:
        data = _ORIGINAL_LOAD_FILE(self, filename)  # its torch.load is _safe_torch_load
    return _encoder_checkpoint(self.model, data, filename)


def _safe_torch_load(self: DetectionCheckpointer, filename: str) -> Any:
    return safe_torch_load(filename)


def _resizing_load_model(self: DetectionCheckpointer, checkpoint: Dict[str, Any]):
    """``DetectionCheckpointer._load_model`` after the encoder's tables were resized to the model's sizes."""
    state = checkpoint['model']
    for prefix, encoder in encoders(self.model):
        for key in [k for k in state if k.startswith(prefix) and isinstance(state[k], np.ndarray)]:
            state[key] = torch.from_numpy(state[key])
        resize_on_load(encoder, state, prefix)
    return _ORIGINAL_LOAD_MODEL(self, checkpoint)


def _atomic_save(self: DetectionCheckpointer, name: str, **kwargs: Any) -> None:
    """fvcore's ``Checkpointer.save`` with the checkpoint and the ``last_checkpoint`` tag written atomically."""
    if not self.save_dir or not self.save_to_disk:
        return
    data: Dict[str, Any] = {'model': self.model.state_dict()}
    data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
    data.update(kwargs)
    basename = f'{name}.pth'
    save_file = osp.join(self.save_dir, basename)
    self.logger.info('Saving checkpoint to %s', save_file)
    atomic_write(save_file, lambda f: torch.save(data, f))
    atomic_write(osp.join(self.save_dir, 'last_checkpoint'), lambda f: f.write(basename), mode='w')


def register_safe_detectron2_checkpointer() -> None:
    """Make every ``DetectionCheckpointer`` read files through the safe loader (and resize ConvMAE tables, load
    encoder-only checkpoints), and write them atomically. Idempotent."""
    DetectionCheckpointer._load_file = _safe_load_file
    DetectionCheckpointer._torch_load = _safe_torch_load
    DetectionCheckpointer._load_model = _resizing_load_model
    DetectionCheckpointer.save = _atomic_save
