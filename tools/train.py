"""Train a detector (mmdet), a segmentor (mmseg) or a classifier (mmpretrain) with a ConvMAE backbone.

The task is taken from the config's ``default_scope`` ('mmdet', 'mmseg' or 'mmpretrain'); the command line is that of
mmdet's and mmseg's ``tools/train.py``::

    python tools/train.py configs/mmseg/upernet_convmae-b_8xb2-160k_ade20k-512x512.py \
        --work-dir work_dirs/upernet --cfg-options model.backbone.init_cfg.checkpoint=backbone.pth
        [--resume [CKPT]] [--amp] [--auto-scale-lr] [--launcher none|pytorch|slurm|mpi]
    bash tools/dist_train.sh CONFIG 8 [ARGS]   # distributed (torchrun)
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout without installing
from convmae_backbone.apis import cli  # noqa: E402

if __name__ == '__main__':
    cli.run_tool(cli.train)
