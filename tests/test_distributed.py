"""DDP through our tools on a machine without CUDA (gloo): 2 processes x batch b end with the weights of
1 process x batch 2b (masks come from the samples, not from the processes)."""
import os
import random
import subprocess
import sys

import pytest
import torch

from convmae_backbone.checkpoint import safe_torch_load
from conftest import max_rel_err
from helpers import ROOT, make_images, write_tiny_config

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason='torch built without the gloo backend')


def run(cmd, timeout: float = 300) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', PYTHON=sys.executable,
               PORT=str(29500 + random.randrange(2000)))
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def assert_same_weights(a: dict, b: dict, tol: float = 1e-4) -> None:
    """Every floating tensor within ``tol`` relative (max abs difference / max abs value).

    The key part of a qkv bias has a zero gradient in exact arithmetic (softmax ignores a constant added to all
    logits of a query), so AdamW turns its rounding noise into small steps that differ between any two runs;
    it is left out."""
    assert set(a) == set(b)
    for key, value in a.items():
        if not value.is_floating_point():
            continue
        if key.endswith('attn.qkv.bias'):
            (qa, _, va), (qb, _, vb) = value.chunk(3), b[key].chunk(3)
            value, b_value = torch.cat([qa, va]), torch.cat([qb, vb])
        else:
            b_value = b[key]
        assert max_rel_err(value, b_value) < tol, (key, max_rel_err(value, b_value))


def test_pretraining_two_processes_match_one(tmp_path):
    cfg = write_tiny_config(tmp_path / 'tiny.py', make_images(tmp_path / 'data'), max_epochs=2)
    one, two = tmp_path / 'one', tmp_path / 'two'
    run([sys.executable, ROOT / 'tools' / 'pretrain.py', cfg, '--work-dir', one, '--cfg-options',
         'train_dataloader.batch_size=4'])
    out = run(['bash', ROOT / 'tools' / 'dist_pretrain.sh', cfg, 2, '--work-dir', two, '--cfg-options',
               'train_dataloader.batch_size=2'])
    assert 'distributed on CPU: gloo, rank 0 of 2' in out
    ref, ddp = safe_torch_load(one / 'epoch_2.pth'), safe_torch_load(two / 'epoch_2.pth')
    assert ref['meta']['iter'] == ddp['meta']['iter'] == 4  # 8 images: 2 iterations of 4 (= 2 x 2) per epoch
    start = safe_torch_load(one / 'epoch_1.pth')['state_dict']
    assert not torch.equal(start['decoder_pred.weight'], ref['state_dict']['decoder_pred.weight'])
    assert_same_weights(ddp['state_dict'], ref['state_dict'])


def _sync_bn_worker(rank: int, world: int, init_file: str, x: torch.Tensor, w: torch.Tensor, out_dir: str) -> None:
    from convmae_backbone.engine.distributed import CPUSyncBatchNorm
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    bn = CPUSyncBatchNorm(x.shape[1], momentum=0.3)
    with torch.no_grad():
        bn.weight.normal_(generator=torch.Generator().manual_seed(0))
    part = x.chunk(world)[rank].clone().requires_grad_(True)
    y = bn(part)
    (y * w.chunk(world)[rank]).sum().backward()
    torch.save(dict(y=y.detach(), grad=part.grad, wgrad=bn.weight.grad, bgrad=bn.bias.grad,
                    running=(bn.running_mean, bn.running_var)), os.path.join(out_dir, f'{rank}.pt'))
    torch.distributed.destroy_process_group()


def test_sync_bn_on_cpu_equals_batch_norm_of_the_global_batch(tmp_path):
    """Outputs, input gradients, the summed affine gradients and the running statistics equal those of one
    BatchNorm2d over the whole batch."""
    x = torch.randn(6, 5, 4, 3, dtype=torch.float64).float() * 3 + 1
    w = torch.randn(6, 5, 4, 3)
    torch.multiprocessing.spawn(_sync_bn_worker, args=(2, str(tmp_path / 'init'), x, w, str(tmp_path)), nprocs=2)
    parts = [torch.load(tmp_path / f'{r}.pt') for r in range(2)]
    bn = torch.nn.BatchNorm2d(5, momentum=0.3)
    with torch.no_grad():
        bn.weight.normal_(generator=torch.Generator().manual_seed(0))
    xr = x.clone().requires_grad_(True)
    y = bn(xr)
    (y * w).sum().backward()
    assert max_rel_err(torch.cat([p['y'] for p in parts]), y) < 1e-5
    assert max_rel_err(torch.cat([p['grad'] for p in parts]), xr.grad) < 1e-5
    assert max_rel_err(parts[0]['wgrad'] + parts[1]['wgrad'], bn.weight.grad) < 1e-5
    assert max_rel_err(parts[0]['bgrad'] + parts[1]['bgrad'], bn.bias.grad) < 1e-5
    for p in parts:
        assert max_rel_err(p['running'][0], bn.running_mean) < 1e-5
        assert max_rel_err(p['running'][1], bn.running_var) < 1e-5


def _sync_bn_autocast_worker(rank: int, world: int, init_file: str, inputs: dict, out_dir: str) -> None:
    from convmae_backbone.engine.distributed import CPUSyncBatchNorm
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    for name, x in inputs.items():
        bn = CPUSyncBatchNorm(x.shape[1], momentum=0.3)
        part = x.chunk(world)[rank].clone().requires_grad_(True)
        with torch.autocast('cpu', dtype=x.dtype):
            y = bn(part)  # a low-precision input, as a conv under autocast hands it over
        y.float().sum().backward()
        torch.save(dict(y=y.detach(), grad=part.grad, running=(bn.running_mean, bn.running_var)),
                   os.path.join(out_dir, f'{name}{rank}.pt'))
    torch.distributed.destroy_process_group()


def test_sync_bn_on_cpu_under_autocast_keeps_fp32_statistics(tmp_path):
    """bf16 and fp16 inputs: the statistics are those of fp32 batch norm over the same (rounded) global batch, the
    running buffers stay fp32, the output has the input's dtype."""
    x = torch.randn(6, 5, 4, 3) * 3 + 1
    inputs = {'bf16': x.bfloat16(), 'fp16': x.half()}
    torch.multiprocessing.spawn(_sync_bn_autocast_worker, args=(2, str(tmp_path / 'init'), inputs, str(tmp_path)),
                                nprocs=2)
    for name, low in inputs.items():
        parts = [torch.load(tmp_path / f'{name}{r}.pt') for r in range(2)]
        bn = torch.nn.BatchNorm2d(5, momentum=0.3)
        ref = bn(low.float())
        out = torch.cat([p['y'] for p in parts])
        assert out.dtype == low.dtype and max_rel_err(out, ref) < 1e-2, name  # rounded to the input's precision
        for p in parts:
            assert p['grad'].dtype == low.dtype and torch.isfinite(p['grad'].float()).all()
            assert p['running'][0].dtype == p['running'][1].dtype == torch.float32
            assert max_rel_err(p['running'][0], bn.running_mean) < 1e-5, name  # fp32 statistics
            assert max_rel_err(p['running'][1], bn.running_var) < 1e-5, name


def sync_bn_seg_config(tmp_path, max_iters: int) -> str:
    """The tiny mmseg UperNet config with SyncBN heads, no dropout, a deterministic pipeline, no validation and
    a checkpoint after ``max_iters`` iterations of batch 2; returns the path of the dumped config."""
    from convmae_backbone import testing
    data = testing.write_ade_dataset(str(tmp_path / 'ade'), num_train=8, num_val=1, size=(64, 80))
    backbone = dict(img_size=64, embed_dims=(32, 48, 96), depths=(1, 1, 2), num_heads=4, mlp_ratios=(4, 4, 4))
    cfg = testing.tiny_seg_config(data, str(tmp_path / 'unused'), backbone, checkpoint=None, max_iters=max_iters)
    sync_bn = dict(type='SyncBN', requires_grad=True)
    for head in (cfg.model.decode_head, cfg.model.auxiliary_head):
        head.update(norm_cfg=sync_bn, dropout_ratio=0.0)  # BN statistics over the global batch; no dropout
    # a deterministic pipeline (mmseg's random augmentations draw from per-process RNGs)
    cfg.train_dataloader.dataset.pipeline = [
        dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', reduce_zero_label=True),
        dict(type='Resize', scale=(64, 64), keep_ratio=False), dict(type='PackSegInputs')]
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.default_hooks.checkpoint.update(interval=max_iters, by_epoch=False)
    cfg.randomness = dict(seed=7, deterministic=True)
    # AdamW's eps at 1e-3: elements whose gradient is ~0 would otherwise take +-lr steps decided by rounding noise
    # (different in any two runs); what is tested is the DDP maths (gradient averaging, SyncBN)
    cfg.optim_wrapper.optimizer.eps = 1e-3
    config = str(tmp_path / 'upernet_ddp.py')
    cfg.dump(config)
    return config


def test_segmentation_finetune_with_sync_bn_two_processes_match_one(tmp_path):
    """mmseg UperNet with SyncBN heads through tools/train.py and tools/dist_train.sh (gloo): 2 epochs of 8
    images, 2 processes x 2 images per iteration = 1 process x 4, weights and BN statistics."""
    config = sync_bn_seg_config(tmp_path, max_iters=4)
    one, two = tmp_path / 'one', tmp_path / 'two'
    run([sys.executable, ROOT / 'tools' / 'train.py', config, '--work-dir', one, '--cfg-options',
         'train_dataloader.batch_size=4'])
    out = run(['bash', ROOT / 'tools' / 'dist_train.sh', config, 2, '--work-dir', two, '--cfg-options',
               'train_dataloader.batch_size=2'])
    assert 'SyncBN = CPUSyncBatchNorm' in out
    ref, ddp = safe_torch_load(one / 'iter_4.pth')['state_dict'], safe_torch_load(two / 'iter_4.pth')['state_dict']
    assert ref['decode_head.bottleneck.bn.num_batches_tracked'] == 4
    assert not torch.equal(ref['decode_head.bottleneck.bn.running_mean'], torch.zeros_like(
        ref['decode_head.bottleneck.bn.running_mean']))
    assert_same_weights(ddp, ref)


def test_segmentation_finetune_with_sync_bn_and_amp_on_two_processes(tmp_path):
    """tools/dist_train.sh --amp on CPU (bf16 autocast) with SyncBN heads: runs, fp32 BN statistics updated
    every iteration, finite weights."""
    config = sync_bn_seg_config(tmp_path, max_iters=3)  # 2 warm-up iterations + 1
    out = run(['bash', ROOT / 'tools' / 'dist_train.sh', config, 2, '--work-dir', tmp_path / 'two', '--amp'])
    assert 'SyncBN = CPUSyncBatchNorm' in out and '--amp: BF16OptimWrapper' in out
    state = safe_torch_load(tmp_path / 'two' / 'iter_3.pth')['state_dict']
    assert state['decode_head.bottleneck.bn.num_batches_tracked'] == 3
    for name, initial in (('running_mean', 0.0), ('running_var', 1.0)):
        value = state[f'decode_head.bottleneck.bn.{name}']
        assert value.dtype == torch.float32 and not torch.equal(value, torch.full_like(value, initial))
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
