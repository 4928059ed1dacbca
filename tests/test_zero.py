"""ZeRO (mmengine's ZeroRedundancyOptimizer over AdamW) in 2 processes on CPU (gloo), through our tools: the
same weights as 1 process with the same global batch (layer-decay param groups), full optimizer state in the
checkpoints, --resume, the NaN rollback (the paper config's param groups); a clear error for a config that cannot
run it."""
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import max_rel_err
from convmae_backbone.checkpoint import safe_torch_load
from convmae_backbone.engine.optim import check_zero
from helpers import ROOT, make_images, write_tiny_config
from test_distributed import assert_same_weights

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason='torch built without the gloo backend')

ZERO = ['optim_wrapper.optimizer.type=ZeroRedundancyOptimizer', 'optim_wrapper.optimizer.optimizer_type=AdamW']


def run(cmd, timeout: float = 300) -> str:
    path = os.pathsep.join([str(ROOT), str(ROOT / 'tests')] + [p for p in [os.environ.get('PYTHONPATH')] if p])
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS='1',
               PYTHON=sys.executable, PORT=str(29500 + random.randrange(2000)))
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def dist_pretrain(cfg, work_dir, *options) -> str:
    return run(['bash', ROOT / 'tools' / 'dist_pretrain.sh', cfg, 2, '--work-dir', work_dir, *options])


def test_zero_two_processes_match_one_and_resume(tmp_path):
    """3 epochs of 2 iterations with layer-wise lr decay (ConvMAELayerDecayOptimWrapperConstructor): 1 process x
    batch 4 with AdamW = 2 processes x batch 2 with ZeRO (weights and the gathered AdamW moments, 1e-4); then
    epoch 3 again from the ZeRO epoch-2 checkpoint with --resume: the same weights as without the interruption."""
    layer_decay = ("optim_wrapper = dict(constructor='ConvMAELayerDecayOptimWrapperConstructor',\n"
                   "                     paramwise_cfg=dict(_delete_=True, layer_decay_rate=0.5))\n")
    cfg = write_tiny_config(tmp_path / 'tiny.py', make_images(tmp_path / 'data'), max_epochs=3, extra=layer_decay)
    one, two = tmp_path / 'one', tmp_path / 'two'
    run([sys.executable, ROOT / 'tools' / 'pretrain.py', cfg, '--work-dir', one, '--cfg-options',
         'train_dataloader.batch_size=4'])
    out = dist_pretrain(cfg, two, '--cfg-options', 'train_dataloader.batch_size=2', *ZERO)
    assert 'distributed on CPU: gloo, rank 0 of 2' in out
    for epoch in (2, 3):
        ref, zero = safe_torch_load(one / f'epoch_{epoch}.pth'), safe_torch_load(two / f'epoch_{epoch}.pth')
        assert ref['meta']['iter'] == zero['meta']['iter'] == 2 * epoch
        assert_same_weights(zero['state_dict'], ref['state_dict'])
        opt_ref, opt = ref['optimizer'], zero['optimizer']
        assert len(opt['state']) == len(opt_ref['state']) > 0  # every parameter's moments, from both processes
        assert [len(g['params']) for g in opt['param_groups']] == [len(g['params']) for g in opt_ref['param_groups']]
        assert [g['lr_scale'] for g in opt['param_groups']] == [g['lr_scale'] for g in opt_ref['param_groups']]
        assert len({g['lr_scale'] for g in opt['param_groups']}) == 4  # layers 0, 1, 2 and 3 (decoder)
        for key, state in opt_ref['state'].items():
            assert max_rel_err(opt['state'][key]['exp_avg_sq'], state['exp_avg_sq']) < 1e-3, key
    uninterrupted = safe_torch_load(two / 'epoch_3.pth')
    (two / 'epoch_3.pth').unlink()
    (two / 'last_checkpoint').write_text(str(two / 'epoch_2.pth'))
    out = dist_pretrain(cfg, two, '--resume', '--cfg-options', 'train_dataloader.batch_size=2', *ZERO)
    assert f'Load checkpoint from {two / "epoch_2.pth"}' in out
    resumed = safe_torch_load(two / 'epoch_3.pth')
    for key, value in uninterrupted['state_dict'].items():
        assert torch.equal(resumed['state_dict'][key], value), key


def test_zero_non_finite_weights_on_one_process_roll_both_back(tmp_path):
    """A NaN weight on rank 1 only, after iteration 3: both processes load epoch_1.pth (weights and the
    gathered optimizer state, each its own shard) and training finishes with finite checkpoints."""
    extra = ("custom_imports = dict(imports=['zero_inject'], allow_failed_imports=False)\n"
             "custom_hooks = [dict(type='NonFiniteLossHook', max_rollbacks=3), dict(type='ReseedHook'),\n"
             "                dict(type='PlainParamGroupsHook'), dict(type='InjectNonFiniteWeightHook', iteration=3,"
             " rank=1)]\n")
    cfg = write_tiny_config(tmp_path / 'tiny.py', make_images(tmp_path / 'data'), max_epochs=3, extra=extra)
    work = tmp_path / 'work'
    out = dist_pretrain(cfg, work, '--cfg-options', 'train_dataloader.batch_size=2', *ZERO)
    assert f'non-finite weights at iteration 3 (epoch 2): rolled back to {work / "epoch_1.pth"}' in out
    final = safe_torch_load(work / 'epoch_3.pth')
    assert final['meta']['iter'] == 6
    assert all(torch.isfinite(v).all() for v in final['state_dict'].values() if v.is_floating_point())
    assert len(final['optimizer']['state']) == len(safe_torch_load(work / 'epoch_1.pth')['optimizer']['state'])


def test_zero_config_errors_name_the_cause():
    zero = dict(optim_wrapper=dict(optimizer=dict(type='ZeroRedundancyOptimizer', optimizer_type='AdamW')),
                launcher='pytorch', default_hooks=dict(checkpoint=dict(type='AtomicCheckpointHook')))
    check_zero(zero)  # fine
    with pytest.raises(ValueError, match='dist_pretrain.sh'):
        check_zero(dict(zero, launcher='none'))
    with pytest.raises(ValueError, match='optimizer_type'):
        check_zero(dict(zero, optim_wrapper=dict(optimizer=dict(type='ZeroRedundancyOptimizer'))))
    with pytest.raises(ValueError, match="'CheckpointHook'"):
        check_zero(dict(zero, default_hooks=dict(checkpoint=dict(type='CheckpointHook'))))
