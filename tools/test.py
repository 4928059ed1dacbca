"""Evaluate a detector (mmdet), a segmentor (mmseg) or a classifier (mmpretrain) with a ConvMAE backbone.

The task is taken from the config's ``default_scope`` ('mmdet', 'mmseg' or 'mmpretrain'); the command line is that of
mmdet's and mmseg's ``tools/test.py``::

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE_OR_DIR] [--show-dir DIR]
    bash tools/dist_test.sh CONFIG CHECKPOINT 8 [ARGS]   # distributed (torchrun)

``--out``: mmdet and mmpretrain dump the raw predictions to this .pkl file; mmseg writes the predicted masks to this
directory.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout without installing
from convmae_backbone.apis import cli  # noqa: E402

if __name__ == '__main__':
    cli.run_tool(cli.evaluate)
