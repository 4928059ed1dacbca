"""tools/d2_train.py (detectron2's LazyConfig trainer, hooks, DetectionCheckpointer, COCOEvaluator and launch) on
the ViTDet-style config shrunk by :func:`convmae_backbone.testing.write_tiny_detectron2_config`, with the synthetic
COCO set registered through ``register_coco_instances``: it trains, checkpoints atomically, resumes where it
stopped and evaluates; also in 2 gloo processes on CPU."""
import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytest
import torch
from helpers import ROOT

pytest.importorskip('detectron2')  # built by `make install` (tools/install_detectron2.sh)

from convmae_backbone.testing import child_env, write_coco_dataset, write_tiny_detectron2_config  # noqa: E402

TOOL = ROOT / 'tools' / 'd2_train.py'


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """(config file, --register-coco arguments) of the tiny config on a 64x64 synthetic COCO set."""
    root = tmp_path_factory.mktemp('d2')
    data = write_coco_dataset(str(root / 'coco'), num_train=4, num_val=2, size=(64, 64))
    config = write_tiny_detectron2_config(str(root / 'tiny.py'), 'tiny_train', 'tiny_val')
    register = ['--register-coco', 'tiny_train', f'{data}/annotations/instances_train.json', f'{data}/train',
                '--register-coco', 'tiny_val', f'{data}/annotations/instances_val.json', f'{data}/val']
    return config, register


def d2_train(setup, *args: str, opts: Sequence[str] = ()) -> subprocess.CompletedProcess:
    config, register = setup
    return subprocess.run([sys.executable, str(TOOL), '--config-file', config, *register, *args, *opts],
                          capture_output=True, text=True, env=child_env(), timeout=600, cwd=ROOT)


def iterations(out_dir: Path) -> list:
    """The iterations logged in metrics.json (detectron2's JSONWriter)."""
    return [json.loads(line)['iteration'] for line in (out_dir / 'metrics.json').read_text().splitlines()
            if 'total_loss' in line]


def test_train_resume_and_evaluate(setup, tmp_path):
    out = tmp_path / 'out'
    run = d2_train(setup, opts=[f'train.output_dir={out}', 'train.max_iter=2', 'train.eval_period=0'])
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in out.glob('*.pth')) == ['model_0000001.pth', 'model_final.pth']
    assert (out / 'last_checkpoint').read_text() == 'model_final.pth'
    assert not list(out.glob('.*.tmp'))  # written atomically: no temporary file left
    first = torch.load(out / 'model_final.pth', weights_only=True)
    assert first['iteration'] == 1

    # resume: iterations 2 and 3 only, then COCO evaluation at the end
    run = d2_train(setup, '--resume', opts=[f'train.output_dir={out}'])
    assert run.returncode == 0, run.stderr[-3000:]
    assert iterations(out) == [0, 1, 2, 3]
    final = torch.load(out / 'model_final.pth', weights_only=True)
    assert final['iteration'] == 3
    assert not torch.equal(final['model']['backbone.net.patch_embed1.proj.weight'],
                           first['model']['backbone.net.patch_embed1.proj.weight'])
    log = run.stdout + run.stderr
    assert 'Evaluation results for bbox' in log and 'Evaluation results for segm' in log

    # evaluate a checkpoint alone
    run = d2_train(setup, '--eval-only', opts=[f'train.output_dir={tmp_path / "eval"}',
                                               f'train.init_checkpoint={out / "model_final.pth"}'])
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert 'copypaste: Task: bbox' in log and 'copypaste: Task: segm' in log


def test_two_gloo_processes_on_cpu(setup, tmp_path):
    out = tmp_path / 'out'
    run = d2_train(setup, '--num-gpus', '2', opts=[f'train.output_dir={out}', 'train.max_iter=2',
                                                   'train.eval_period=0'])
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'Rank of current process: 0. World size: 2' in (out / 'log.txt').read_text()
    assert (out / 'model_final.pth').is_file() and iterations(out) == [0, 1]
