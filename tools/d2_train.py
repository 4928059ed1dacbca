"""Train, resume or evaluate a detectron2 LazyConfig with a ConvMAE backbone (``configs/detectron2``), with
detectron2's own trainer, hooks, checkpointer, evaluator and launcher; the command line of detectron2's
``tools/lazyconfig_train_net.py`` (:mod:`convmae_backbone.detectron2.train`)::

    python tools/d2_train.py --config-file CONFIG [--num-gpus N] [--resume] [--eval-only] [KEY=VALUE ...]
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout without installing
from convmae_backbone.apis import cli  # noqa: E402
try:
    from convmae_backbone.detectron2 import train  # noqa: E402
except ImportError as exc:  # detectron2 missing: the one line saying what to install
    sys.exit(f'error: {exc}')

if __name__ == '__main__':
    cli.run_tool(train.run)
