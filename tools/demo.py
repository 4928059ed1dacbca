"""End-to-end ConvMAE demo on CPU (what ``make demo`` runs), a few minutes on 2 cores.

1. writes random views of the photographs shipped with scikit-image to OUT/images/train/<photo>/,
2. pretrains a small ConvMAE on them (configs/pretrain/convmae-tiny_demo.py),
3. writes OUT/reconstruction.png (labelled columns: original | masked | reconstruction | reconstruction +
   visible blocks | the same for an untrained model; the caption compares their errors) and the exported
   backbone OUT/convmae_demo_backbone.pth,
4. runs tools/demo_finetune.py (Mask R-CNN and UperNet fine-tuned from that backbone, then run on a photograph:
   OUT/finetune/detection.png, OUT/finetune/segmentation.png),
5. prints one summary with every file it wrote.

    python tools/demo.py [--out-dir demo_output] [--epochs N] [--views N] [--skip-finetune] [--verbose] [--threads N]

The steps are :func:`convmae_backbone.demo.run_demo`.
"""
import argparse
import os.path as osp
import sys
import warnings

# mmengine imports pkg_resources, which warns on import; the demo hides that (convmae_backbone.demo.QUIET_WARNINGS).
warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)
TOOLS = osp.dirname(osp.abspath(__file__))
sys.path.insert(0, osp.dirname(TOOLS))  # run from a checkout without installing
from convmae_backbone.demo import run_demo  # noqa: E402

if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='ConvMAE pretraining demo on scikit-image photographs')
    parser.add_argument('--out-dir', default='demo_output')
    parser.add_argument('--epochs', type=int, help='override the demo config\'s max_epochs')
    parser.add_argument('--views', type=int, default=40, help='random views written per photograph')
    parser.add_argument('--skip-finetune', action='store_true', help='do not run tools/demo_finetune.py')
    parser.add_argument('--verbose', action='store_true', help="mmengine's full logs (environment, config, "
                                                                'every logged iteration)')
    parser.add_argument('--threads', type=int, default=1,
                        help='CPU threads per process (default 1: fastest where other jobs share the cores)')
    args = parser.parse_args()
    finetune = None if args.skip_finetune else osp.join(TOOLS, 'demo_finetune.py')
    sys.exit(run_demo(args.out_dir, args.epochs, args.views, finetune, args.verbose, args.threads))
