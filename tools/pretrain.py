"""ConvMAE masked-autoencoder pretraining on mmengine's Runner.

    python tools/pretrain.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--auto-scale-lr]
                             [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi]
    bash tools/dist_pretrain.sh CONFIG 8 [ARGS]   # distributed (torchrun)

``--resume`` without a value resumes from the latest checkpoint of the work dir (its ``last_checkpoint``).
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout without installing
from convmae_backbone.apis import cli  # noqa: E402

if __name__ == '__main__':
    cli.run_tool(cli.pretrain)
