"""Show what a ConvMAE pretraining checkpoint reconstructs.

    python tools/visualize_reconstruction.py CKPT IMAGE [IMAGE ...] --out FILE.png
        [--config CFG] [--img-size N] [--seed S] [--mask-ratio R] [--scale K] [--compare-untrained]

Labelled columns, one row per image: original | masked input | reconstruction | reconstruction with the visible
blocks pasted back [| the same for the untrained model]; a complementary-masking (Fast ConvMAE) model shows the
original, then every view's masked input and reconstruction with its visible blocks pasted back (1 + 2V columns);
the caption gives the reconstruction error. Each image
is resized (shorter side) and centre-cropped to N x N (default: the model's img_size). The model is built from
``--config``, else from the config stored in the checkpoint (mmengine writes it to ``meta.cfg``); anything but a
ConvMAE pretraining checkpoint is refused, saying what it holds. The PNG is 4 * N * K pixels wide (Fast ConvMAE:
(1 + 2V) * N * K).
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout without installing
from convmae_backbone.apis.cli import run_tool  # noqa: E402
from convmae_backbone.apis.visualization import visualize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description='visualise ConvMAE reconstructions')
    parser.add_argument('checkpoint')
    parser.add_argument('images', nargs='+')
    parser.add_argument('--out', required=True, help='output PNG')
    parser.add_argument('--config', help='model config (default: the one stored with the checkpoint)')
    parser.add_argument('--img-size', type=int,
                        help="input size, a multiple of the model's patch size (default: its img_size)")
    parser.add_argument('--seed', type=int, default=0, help='seed of the random mask')
    parser.add_argument('--mask-ratio', type=float, help="override the model's mask ratio")
    parser.add_argument('--scale', type=int, default=1, help='integer upscaling of the PNG')
    parser.add_argument('--compare-untrained', action='store_true',
                        help='add a column and the error of the same model randomly initialised, on the same masks')
    args = parser.parse_args()
    width, height, caption = visualize(args.checkpoint, args.images, args.out, args.config, args.img_size,
                                       args.seed, args.mask_ratio, args.scale, args.compare_untrained)
    print(f'wrote {args.out} ({width}x{height}, {len(args.images)} image(s)): {caption}')


if __name__ == '__main__':
    run_tool(main)
