"""End-to-end ConvMAE demo on CPU (what ``make demo`` runs), a few minutes on 2 cores.

1. writes random views of the photographs shipped with scikit-image to OUT/images/train/<photo>/,
2. pretrains a small ConvMAE on them (configs/pretrain/convmae-tiny_demo.py),
3. writes OUT/reconstruction.png (original | masked | reconstruction | reconstruction + visible blocks) and
   the exported backbone OUT/convmae_demo_backbone.pth,
4. runs tools/demo_finetune.py --backbone OUT/convmae_demo_backbone.pth --work-dir OUT/finetune.

    python tools/demo.py [--out-dir demo_output] [--epochs N] [--views N] [--skip-finetune]

The steps are :func:`convmae_backbone.demo.run_demo`.
"""
import argparse
import os.path as osp
import sys

TOOLS = osp.dirname(osp.abspath(__file__))
sys.path.insert(0, osp.dirname(TOOLS))  # run from a checkout without installing
from convmae_backbone.demo import run_demo  # noqa: E402

if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='ConvMAE pretraining demo on scikit-image photographs')
    parser.add_argument('--out-dir', default='demo_output')
    parser.add_argument('--epochs', type=int, help='override the demo config\'s max_epochs')
    parser.add_argument('--views', type=int, default=40, help='random views written per photograph')
    parser.add_argument('--skip-finetune', action='store_true', help='do not run tools/demo_finetune.py')
    args = parser.parse_args()
    finetune = None if args.skip_finetune else osp.join(TOOLS, 'demo_finetune.py')
    sys.exit(run_demo(args.out_dir, args.epochs, args.views, finetune))
