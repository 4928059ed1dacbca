"""Training reliability: kill -9 and --resume reproduce an uninterrupted run exactly; a non-finite loss rolls the
run back to the last good checkpoint (and stops after max_rollbacks) without ever writing a bad checkpoint; a
crash while saving never damages the latest checkpoint."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, make_images, write_tiny_config

from convmae_backbone.apis import cli
from convmae_backbone.checkpoint import safe_torch_load
from convmae_backbone.engine.hooks import NonFiniteLossHook, atomic_write
from convmae_backbone.models import ConvMAEPretrainer

PRETRAIN = str(ROOT / 'tools' / 'pretrain.py')


def run_pretrain(args, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    return subprocess.Popen([sys.executable, PRETRAIN, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    """Reference: one process loading data itself. Killed and resumed run: two persistent loader workers."""
    max_epochs = 8
    cfg = write_tiny_config(tmp_path / 'tiny.py', make_images(tmp_path / 'data'), max_epochs=max_epochs)
    ref, killed = tmp_path / 'ref', tmp_path / 'killed'
    finish(run_pretrain([cfg, '--work-dir', ref]))

    workers = ['--cfg-options', 'train_dataloader.num_workers=2', 'train_dataloader.persistent_workers=True']
    proc = run_pretrain([cfg, '--work-dir', killed, *workers])
    deadline = time.time() + 240
    while not (killed / 'epoch_2.pth').exists():
        assert proc.poll() is None, 'the run ended before it could be killed'
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    resumed_from = (killed / 'last_checkpoint').read_text().strip()
    assert not (killed / f'epoch_{max_epochs}.pth').exists(), 'killed too late to test anything'

    out = finish(run_pretrain([cfg, '--work-dir', killed, '--resume', *workers]))
    assert f'Load checkpoint from {resumed_from}' in out and 'resumed epoch' in out

    final_ref = safe_torch_load(ref / f'epoch_{max_epochs}.pth')
    final = safe_torch_load(killed / f'epoch_{max_epochs}.pth')
    assert final['meta']['iter'] == final_ref['meta']['iter'] == 2 * max_epochs
    for key, value in final_ref['state_dict'].items():
        assert torch.equal(final['state_dict'][key], value), key
    first = safe_torch_load(ref / 'epoch_1.pth')['state_dict']
    assert not torch.equal(first['decoder_pred.weight'], final_ref['state_dict']['decoder_pred.weight'])
    opt_ref, opt = final_ref['optimizer']['state'], final['optimizer']['state']
    assert all(torch.equal(opt[k]['exp_avg'], opt_ref[k]['exp_avg']) for k in opt_ref)


def _inject(monkeypatch, bad_calls, what='loss'):
    """Make the training forward passes numbered in ``bad_calls`` (1-based) produce a NaN loss, or (``what=
    'weights'``) leave a NaN in a weight under a finite loss."""
    original, calls = ConvMAEPretrainer.forward, []

    def forward(self, inputs, data_samples=None, mode='tensor'):
        out = original(self, inputs, data_samples, mode)
        if mode == 'loss':
            calls.append(mode)
            if len(calls) in bad_calls:
                if what == 'loss':
                    out['loss_rec'] = out['loss_rec'] * float('nan')
                else:
                    with torch.no_grad():
                        self.decoder_pred.bias[0] = float('nan')
        return out

    monkeypatch.setattr(ConvMAEPretrainer, 'forward', forward)


@pytest.mark.parametrize('what', ['loss', 'weights'])
def test_non_finite_loss_rolls_back_to_last_good_checkpoint_and_finishes(tmp_path, monkeypatch, what):
    cfg = write_tiny_config(tmp_path / 'tiny.py', make_images(tmp_path / 'data'), max_epochs=3)
    work = tmp_path / 'work'
    _inject(monkeypatch, {3}, what)  # the third training iteration, first of epoch 2
    restored = []
    rollback = NonFiniteLossHook.rollback

    def spy(self, runner, path):
        rollback(self, runner, path)
        restored.append((path, {k: v.clone() for k, v in runner.model.state_dict().items()},
                         [g['lr'] for g in runner.optim_wrapper.param_groups]))

    monkeypatch.setattr(NonFiniteLossHook, 'rollback', spy)
    runner = cli.pretrain([str(cfg), '--work-dir', str(work), '--cfg-options', f'experiment_name=nan_{what}'])
    assert runner.iter == 6 and [p for p, _, _ in restored] == [str(work / 'epoch_1.pth')]
    good = safe_torch_load(work / 'epoch_1.pth')['state_dict']
    for key, value in good.items():  # right after the rollback: exactly the last good weights
        assert torch.equal(restored[0][1][key], value), key
    assert all(lr > 0 for lr in restored[0][2])
    for epoch in (2, 3):
        state = safe_torch_load(work / f'epoch_{epoch}.pth')['state_dict']
        assert all(torch.isfinite(v).all() for v in state.values())
    assert not torch.equal(state['decoder_pred.weight'], good['decoder_pred.weight'])  # trained on after it
    log = next(work.rglob('*.log')).read_text()
    assert f'non-finite {what}' in log and 'at iteration 3 (epoch 2): rolled back to' in log
    assert 'rollback 1 of at most 3' in log


def test_repeated_non_finite_loss_stops_after_max_rollbacks(tmp_path, monkeypatch):
    cfg = write_tiny_config(tmp_path / 'tiny.py', make_images(tmp_path / 'data'), max_epochs=3)
    work = tmp_path / 'work'
    _inject(monkeypatch, set(range(3, 20)))
    with pytest.raises(FloatingPointError, match=r'non-finite loss \(nan\) at iteration 5 \(epoch 3\); training '
                                                 r'stopped \(2 rollback\(s\) done, max_rollbacks=2\)\. Last good '
                                                 r'checkpoint: .*epoch_2\.pth'):
        cli.pretrain([str(cfg), '--work-dir', str(work), '--cfg-options', 'experiment_name=nan_stop',
                       'custom_hooks.0.max_rollbacks=2'])
    # epoch 2 ended on rolled-back (epoch 1) weights: its checkpoint is finite
    for epoch in (1, 2):
        assert all(torch.isfinite(v).all() for v in safe_torch_load(work / f'epoch_{epoch}.pth')['state_dict'].values())
    assert not (work / 'epoch_3.pth').exists()


def test_max_rollbacks_zero_stops_at_first_non_finite_loss(tmp_path, monkeypatch):
    cfg = write_tiny_config(tmp_path / 'tiny.py', make_images(tmp_path / 'data'), max_epochs=3)
    work = tmp_path / 'work'
    _inject(monkeypatch, {3})
    with pytest.raises(FloatingPointError, match=r'non-finite loss \(nan\) at iteration 3 .*epoch_1\.pth'):
        cli.pretrain([str(cfg), '--work-dir', str(work), '--cfg-options', 'experiment_name=nan_zero',
                      'custom_hooks.0.max_rollbacks=0'])
    assert (work / 'last_checkpoint').read_text().strip() == str(work / 'epoch_1.pth')
    assert not (work / 'epoch_2.pth').exists()


def test_atomic_write_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / 'ckpt.pth'
    target.write_bytes(b'old complete content')

    def crash(f):
        f.write(b'partial')
        raise OSError('disk full')

    with pytest.raises(OSError, match='disk full'):
        atomic_write(target, crash)
    assert target.read_bytes() == b'old complete content'
    assert os.listdir(tmp_path) == ['ckpt.pth']  # no temporary file left behind
    atomic_write(target, lambda f: f.write(b'new'))
    assert target.read_bytes() == b'new'
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


@pytest.mark.parametrize('crash_point', ['torch.save', 'fsync'])
def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch, crash_point):
    # max_keep_ckpts=1: mmengine's own CheckpointHook would delete epoch_1.pth before writing epoch_2.pth
    cfg = write_tiny_config(tmp_path / 'tiny.py', make_images(tmp_path / 'data'), max_epochs=2,
                            extra="default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=1))\n")
    work = tmp_path / 'work'
    saves = []
    if crash_point == 'torch.save':
        real_save = torch.save

        def fake_save(obj, f, *args, **kwargs):
            saves.append(1)
            if len(saves) == 2 and isinstance(obj, dict) and 'state_dict' in obj:
                f.write(b'PK\x03\x04 partial checkpoint bytes')
                raise OSError('simulated crash while saving')
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, 'save', fake_save)
    else:
        real_fsync = os.fsync

        def fake_fsync(fd):
            saves.append(1)
            if len(saves) == 3:  # epoch_1.pth, last_checkpoint, then epoch_2.pth
                raise OSError('simulated crash while saving')
            return real_fsync(fd)

        monkeypatch.setattr(os, 'fsync', fake_fsync)
    with pytest.raises(OSError, match='simulated crash'):
        cli.pretrain([str(cfg), '--work-dir', str(work), '--cfg-options', f'experiment_name=crash_{crash_point}'])
    monkeypatch.undo()
    assert (work / 'last_checkpoint').read_text().strip() == str(work / 'epoch_1.pth')
    assert not (work / 'epoch_2.pth').exists()
    assert not [p for p in os.listdir(work) if p.endswith('.tmp')]
    assert safe_torch_load(work / 'epoch_1.pth')['meta']['epoch'] == 1
    (work / '.epoch_2.pth.k1ll3d.tmp').write_bytes(b'PK partial')  # as left by a SIGKILL during a save
    runner = cli.pretrain([str(cfg), '--work-dir', str(work), '--resume', '--cfg-options',
                            f'experiment_name=crash_{crash_point}_resume'])
    assert runner.iter == 4 and safe_torch_load(work / 'epoch_2.pth')['meta']['epoch'] == 2
    assert not (work / 'epoch_1.pth').exists()  # max_keep_ckpts=1, removed after epoch_2.pth was complete
    assert not (work / '.epoch_2.pth.k1ll3d.tmp').exists()  # stale temporary file cleaned up on start
