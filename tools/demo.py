"""End-to-end ConvMAE demo on CPU (what ``make demo`` runs), a few minutes on 2 cores.

1. writes random views of the photographs shipped with scikit-image to OUT/images/train/<photo>/,
2. pretrains a small ConvMAE on them (configs/pretrain/convmae-tiny_demo.py) with tools/pretrain.py,
3. writes OUT/reconstruction.png (original | masked | reconstruction | reconstruction + visible blocks) and
   the exported backbone OUT/convmae_demo_backbone.pth,
4. runs tools/demo_finetune.py --backbone OUT/convmae_demo_backbone.pth --work-dir OUT/finetune, if present.

    python tools/demo.py [--out-dir demo_output] [--epochs N] [--skip-finetune]
"""
import argparse
import os
import os.path as osp
import subprocess
import sys
import time
from typing import List, Optional

import numpy as np

TOOLS = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(TOOLS)
sys.path.insert(0, ROOT)
sys.path.insert(0, TOOLS)
from convmae_backbone.data import write_demo_images  # noqa: E402
from convmae_backbone.engine import last_checkpoint  # noqa: E402
import export_backbone  # noqa: E402
import pretrain  # noqa: E402
import visualize_reconstruction  # noqa: E402

DEMO_CONFIG = osp.join(ROOT, 'configs', 'pretrain', 'convmae-tiny_demo.py')


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description='ConvMAE pretraining demo on scikit-image photographs')
    parser.add_argument('--out-dir', default='demo_output')
    parser.add_argument('--epochs', type=int, help='override the demo config\'s max_epochs')
    parser.add_argument('--views', type=int, default=40, help='random views written per photograph')
    parser.add_argument('--skip-finetune', action='store_true', help='do not run tools/demo_finetune.py')
    parser.add_argument('--finetune-script', default=osp.join(TOOLS, 'demo_finetune.py'), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = osp.abspath(args.out_dir)
    images, work = osp.join(out, 'images'), osp.join(out, 'pretrain')
    start = time.time()

    n = write_demo_images(images, views_per_photo=args.views, size=128, seed=0)
    print(f'[demo] wrote {n} views of scikit-image photographs to {images}', flush=True)

    options = [f'train_dataloader.dataset.data_root={images}', f'experiment_name=convmae_demo_{int(start)}']
    if args.epochs:
        options.append(f'train_cfg.max_epochs={args.epochs}')
    runner = pretrain.main([DEMO_CONFIG, '--work-dir', work, '--cfg-options', *options])
    losses = np.asarray(runner.message_hub.get_scalar('train/loss').data[0], dtype=float)
    train_time = time.time() - start
    ckpt = last_checkpoint(work)

    samples = [osp.join(images, 'train', name, f'{name}_000.jpg') for name in ('astronaut', 'chelsea', 'coffee',
                                                                               'rocket')]
    png = osp.join(out, 'reconstruction.png')
    visualize_reconstruction.main([ckpt, *samples, '--out', png, '--scale', '4', '--seed', '0'])
    backbone = osp.join(out, 'convmae_demo_backbone.pth')
    export_backbone.main([ckpt, backbone])

    k = min(10, len(losses) // 2)
    summary = [
        f'[demo] pretraining: {len(losses)} iterations in {train_time:.0f} s; loss first {losses[0]:.4f} -> last '
        f'{losses[-1]:.4f} (mean of first {k}: {losses[:k].mean():.4f}, last {k}: {losses[-k:].mean():.4f})',
        f'[demo] checkpoint:     {ckpt}',
        f'[demo] reconstruction: {png}',
        f'[demo] backbone:       {backbone}']
    print('\n'.join(summary), flush=True)

    finetune = args.finetune_script
    if args.skip_finetune or not osp.isfile(finetune):
        return 0
    cmd = [sys.executable, finetune, '--backbone', backbone, '--work-dir', osp.join(out, 'finetune')]
    print(f'[demo] running {" ".join(cmd)}', flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')])))
    rc = subprocess.call(cmd, env=env)
    print('\n'.join(summary + [f'[demo] fine-tuning: exit code {rc}, outputs under {osp.join(out, "finetune")}']))
    return rc


if __name__ == '__main__':
    sys.exit(main())
