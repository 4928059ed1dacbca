"""Export the encoder of a ConvMAE pretraining checkpoint.

    python tools/export_backbone.py CKPT OUT [--official]

Default: a plain state dict of the encoder keys (patch_embed1..4, pos_embed, blocks1..3), loadable by the
``ConvMAE`` backbone with ``init_cfg=dict(type='Pretrained', checkpoint=OUT)``. ``--official`` writes
``{'model': full_state_dict}`` (decoder included), the format of the official pretraining checkpoints.
"""
import argparse
import os.path as osp
import sys
from collections import OrderedDict
from typing import Dict, List, Optional

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from convmae_backbone.checkpoint import CheckpointError, safe_torch_load  # noqa: E402
from convmae_backbone.engine import atomic_write  # noqa: E402
from convmae_backbone.models import ConvViT  # noqa: E402
from convmae_backbone.models.weights import extract_state_dict  # noqa: E402


def encoder_state_dict(state: Dict[str, torch.Tensor], source: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """The encoder weights of a full ConvMAE state dict; raises CheckpointError if there are none."""
    encoder = OrderedDict((k, v) for k, v in state.items() if ConvViT.stage_of(k) is not None)
    if not any(k.startswith('blocks3.') for k in encoder) or 'pos_embed' not in encoder:
        raise CheckpointError(f'{source} holds no ConvMAE encoder (keys such as pos_embed, blocks3.*); '
                              f'first keys: {list(state)[:5]}')
    return encoder


def export(ckpt: str, out: str, official: bool = False) -> Dict[str, torch.Tensor]:
    """Write the backbone weights (or the official full format) of ``ckpt`` to ``out``; returns what was saved."""
    state = extract_state_dict(safe_torch_load(ckpt))
    encoder = encoder_state_dict(state, ckpt)
    obj = {'model': state} if official else encoder
    atomic_write(out, lambda f: torch.save(obj, f))
    return obj


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description='export ConvMAE backbone weights')
    parser.add_argument('checkpoint', help='pretraining checkpoint (mmengine or official format)')
    parser.add_argument('out', help='output .pth file')
    parser.add_argument('--official', action='store_true',
                        help="write {'model': full state dict}, the official ConvMAE pretraining format")
    args = parser.parse_args(argv)
    obj = export(args.checkpoint, args.out, args.official)
    n = len(obj['model']) if args.official else len(obj)
    kind = 'full model, official format' if args.official else 'backbone only'
    print(f'wrote {n} tensors ({kind}) to {args.out}')


if __name__ == '__main__':
    main()
