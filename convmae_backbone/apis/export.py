"""The encoder of a ConvMAE pretraining checkpoint, as backbone weights (``tools/export_backbone.py``)."""
from collections import OrderedDict
from typing import Dict

import torch
from torch import Tensor

from ..checkpoint import CheckpointError, atomic_write, safe_torch_load
from ..models import ConvViT
from ..models.weights import extract_state_dict


def encoder_state_dict(state: Dict[str, Tensor], source: str = 'checkpoint') -> Dict[str, Tensor]:
    """The encoder weights (:attr:`ConvViT.STAGE_OF`) of a full ConvMAE state dict; raises
    :class:`CheckpointError` naming ``source`` if there are none."""
    encoder = OrderedDict((k, v) for k, v in state.items() if ConvViT.stage_of(k) is not None)
    if not any(k.startswith('blocks3.') for k in encoder) or 'pos_embed' not in encoder:
        raise CheckpointError(f'{source} holds no ConvMAE encoder (keys such as pos_embed, blocks3.*); '
                              f'first keys: {list(state)[:5]}')
    return encoder


def export_backbone(ckpt: str, out: str, official: bool = False) -> Dict[str, Tensor]:
    """Write the encoder weights of checkpoint file ``ckpt`` to ``out`` as a plain state dict, loadable by the
    ``ConvMAE`` backbone through ``init_cfg=dict(type='Pretrained', checkpoint=out)``; with ``official``,
    ``{'model': full state dict}`` (decoder included), the format of the official pretraining checkpoints.
    The file is written atomically. Returns the state dict written (the full one with ``official``)."""
    state = extract_state_dict(safe_torch_load(ckpt))
    encoder = encoder_state_dict(state, ckpt)
    obj = {'model': state} if official else encoder
    atomic_write(out, lambda f: torch.save(obj, f))
    return state if official else encoder
