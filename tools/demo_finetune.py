"""Fine-tune a small pretrained ConvMAE on tiny synthetic detection and segmentation datasets.

    python tools/demo_finetune.py --backbone work_dirs/demo/backbone.pth --work-dir work_dirs/demo_finetune

Writes a tiny COCO-layout instance-segmentation dataset and a tiny ADE20K-layout semantic-segmentation
dataset, derives small Mask R-CNN and UperNet configs from the two full configs in configs/, trains each for a
few iterations from the backbone weights with mmdet's / mmseg's own train tools, evaluates, runs both on a
scikit-image photograph through DetInferencer / MMSegInferencer (WORK_DIR/detection.png, segmentation.png),
and prints bbox/segm mAP and mIoU (:func:`demo.finetune_demo` in tools/demo.py). The backbone architecture is read from
the checkpoint's shapes; the number of heads from ``--num-heads``, else from the config the checkpoint
records, else from the configs/pretrain/ config with the same architecture.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout without installing
from convmae_backbone.apis.cli import run_tool  # noqa: E402
from demo import finetune_demo  # noqa: E402  (tools/demo.py, beside this script)

if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--backbone', required=True, help='pretrained ConvMAE weights (any supported format)')
    parser.add_argument('--work-dir', default='work_dirs/demo_finetune')
    parser.add_argument('--num-heads', type=int, help='stage-3 heads of the pretrained model (if not recorded)')
    parser.add_argument('--det-epochs', type=int, default=20, help='epochs over the 8 detection images')
    parser.add_argument('--seg-iters', type=int, default=60, help='segmentation iterations')
    parser.add_argument('--det-lr', type=float, default=1e-3, help='AdamW lr of the detector')
    parser.add_argument('--seg-lr', type=float, default=2e-4, help='AdamW lr of the segmentor heads')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--verbose', action='store_true', help="the train tools' full logs")
    parser.add_argument('--no-summary', action='store_true', help='only write WORK_DIR/results.json (tools/demo.py '
                                                                  'prints the summary)')
    args = parser.parse_args()
    run_tool(lambda: finetune_demo(args.backbone, args.work_dir, args.num_heads, args.det_epochs, args.seg_iters,
                                   args.det_lr, args.seg_lr, args.seed, args.verbose, not args.no_summary))
