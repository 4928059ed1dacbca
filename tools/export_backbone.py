"""Export the encoder of a ConvMAE pretraining checkpoint.

    python tools/export_backbone.py CKPT OUT [--official]

Default: a plain state dict of the encoder keys (patch_embed1..4, pos_embed, blocks1..3), loadable by the
``ConvMAE`` backbone with ``init_cfg=dict(type='Pretrained', checkpoint=OUT)``. ``--official`` writes
``{'model': full_state_dict}`` (decoder included), the format of the official pretraining checkpoints.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout without installing
from convmae_backbone.apis.cli import run_tool  # noqa: E402
from convmae_backbone.apis.export import export_backbone  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description='export ConvMAE backbone weights')
    parser.add_argument('checkpoint', help='pretraining checkpoint (mmengine or official format)')
    parser.add_argument('out', help='output .pth file')
    parser.add_argument('--official', action='store_true',
                        help="write {'model': full state dict}, the official ConvMAE pretraining format")
    args = parser.parse_args()
    state = export_backbone(args.checkpoint, args.out, args.official)
    kind = 'full model, official format' if args.official else 'backbone only'
    print(f'wrote {len(state)} tensors ({kind}) to {args.out}')


if __name__ == '__main__':
    run_tool(main)
