"""Convert a released official ConvMAE checkpoint for this project's configs.

    python tools/convert_official.py det|vitdet|seg|cls IN OUT

det: the ConvMAE-B Mask R-CNN (detectron2) -> configs/mmdet/mask-rcnn_convmae-b_fpn_lsj-25e_coco.py
vitdet: the ViTDet-style ConvMAE-B Mask R-CNN (OpenGVLab/Official-ConvMAE-Det)
                                           -> configs/mmdet/mask-rcnn_convmae-b_simplefpn_lsj-25e_coco.py
seg: the ConvMAE-B UperNet (mmseg 0.x)     -> configs/mmseg/upernet_convmae-b_8xb2-160k_ade20k-512x512.py
cls: the fine-tuned ConvMAE-B classifier   -> the mmpretrain fine-tuning config
The logic is convmae_backbone.apis.convert.
"""
import argparse
import os.path as osp
import sys
from typing import List, Optional

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from convmae_backbone.apis.cli import run_tool  # noqa: E402
from convmae_backbone.apis.convert import KINDS, convert  # noqa: E402


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description='convert an official ConvMAE checkpoint')
    parser.add_argument('kind', choices=KINDS, help='det (detectron2 detector), vitdet (ViTDet-style '
                        'detectron2 detector), seg (mmseg 0.x segmentor), cls (fine-tuned classifier)')
    parser.add_argument('src', help='the official checkpoint')
    parser.add_argument('dst', help='output .pth for tools/test.py')
    args = parser.parse_args(argv)
    report = convert(args.kind, args.src, args.dst)
    n = len(report['dropped'])
    dropped = f', dropped {n} keys the target model rebuilds (see convmae_backbone.apis.convert)' if n else ''
    print(f'wrote {report["converted"]} tensors to {args.dst}{dropped}')
    if report['missing_parts']:
        print(f'{args.src} holds no {", ".join(report["missing_parts"])} weights: {args.dst} has the rest only '
              '(the missing parts keep their initialisation when loaded)')


if __name__ == '__main__':
    run_tool(main)
