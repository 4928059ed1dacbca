"""Mixed precision: the wrapper chosen per device, a bf16 pretraining step on CPU close to fp32, sparse and dense
agreeing in bf16, the fp32 islands (loss, attention softmax), and ``--amp`` through the pretraining runner."""
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmengine.optim import AmpOptimWrapper, OptimWrapper, build_optim_wrapper

import convmae_backbone  # noqa: F401
from convmae_backbone import ConvMAEPretrainer, testing
from convmae_backbone.apis import cli
from convmae_backbone.engine.amp import BF16OptimWrapper, amp_optim_wrapper
from convmae_backbone.models.attention import CPU_MATH_MAX_KEYS, sdpa
from convmae_backbone.models.masking import random_mask
from conftest import max_rel_err
from helpers import TINY_ARCH, make_images, write_tiny_config

ARCH = dict(TINY_ARCH, img_size=64)
PLAIN = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3), clip_grad=dict(max_norm=1.0))


def test_wrapper_per_device(monkeypatch):
    cpu = amp_optim_wrapper(PLAIN, 'cpu')
    assert cpu.type == 'BF16OptimWrapper' and cpu.optimizer == PLAIN['optimizer'] and cpu.clip_grad.max_norm == 1
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: True)
    assert amp_optim_wrapper(PLAIN, 'cuda').type == 'BF16OptimWrapper'
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: False)
    fp16 = amp_optim_wrapper(PLAIN, 'cuda')
    assert (fp16.type, fp16.dtype, fp16.loss_scale) == ('AmpOptimWrapper', 'float16', 'dynamic')
    # a config's own fp16 AmpOptimWrapper (the downstream configs) becomes bf16 where that is available
    downstream = dict(PLAIN, type='AmpOptimWrapper', loss_scale='dynamic')
    assert amp_optim_wrapper(downstream, 'cpu').type == 'BF16OptimWrapper'
    assert 'loss_scale' not in amp_optim_wrapper(downstream, 'cpu')
    explicit = dict(downstream, dtype='float16')
    assert amp_optim_wrapper(explicit, 'cuda') == explicit  # asked for explicitly: kept
    with pytest.raises(ValueError, match="the config uses 'OptimWrapperDict'"):
        amp_optim_wrapper(dict(type='OptimWrapperDict'), 'cpu')
    with pytest.raises(AssertionError):  # why we need our own wrapper: mmengine's refuses CPU
        monkeypatch.setattr('mmengine.optim.optimizer.amp_optimizer_wrapper.is_cuda_available', lambda: False)
        AmpOptimWrapper(optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))


def _step(model: ConvMAEPretrainer, wrapper_cfg: dict, imgs: torch.Tensor, mask: torch.Tensor):
    wrapper = build_optim_wrapper(model, wrapper_cfg)
    data = dict(inputs=imgs, data_samples=[dict(mask=m) for m in mask])
    return wrapper, model.train_step(data, wrapper)['loss']


def test_bf16_pretraining_step_close_to_fp32():
    torch.manual_seed(0)
    fp32 = ConvMAEPretrainer(**ARCH)
    bf16 = ConvMAEPretrainer(**ARCH)
    bf16.load_state_dict(fp32.state_dict())
    imgs = torch.randn(4, 3, 64, 64)
    mask = random_mask(4, 16, 0.75, generator=torch.Generator().manual_seed(1))
    before = torch.cat([p.detach().flatten() for p in fp32.parameters()])
    sgd = dict(PLAIN, optimizer=dict(type='SGD', lr=0.1))  # an update proportional to the gradient
    w32, loss32 = _step(fp32, sgd, imgs, mask)
    w16, loss16 = _step(bf16, amp_optim_wrapper(sgd, 'cpu'), imgs, mask)
    assert type(w32) is OptimWrapper and type(w16) is BF16OptimWrapper
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)  # the loss is computed in fp32
    assert abs(loss16.item() - loss32.item()) < 0.02 * loss32.item()
    assert loss16.item() != loss32.item()  # autocast really ran in bf16
    assert all(p.dtype == torch.float32 for p in bf16.parameters())  # master weights stay fp32
    step32 = torch.cat([p.detach().flatten() for p in fp32.parameters()]) - before
    step16 = torch.cat([p.detach().flatten() for p in bf16.parameters()]) - before
    assert torch.isfinite(step16).all() and step32.norm() > 0
    assert ((step16 - step32).norm() / step32.norm()).item() < 0.05  # the same update up to bf16 rounding


def test_sparse_and_dense_agree_in_bf16():
    torch.manual_seed(0)
    sparse = ConvMAEPretrainer(**ARCH, sparse=True)
    dense = ConvMAEPretrainer(**ARCH, sparse=False)
    dense.load_state_dict(sparse.state_dict())
    imgs = torch.randn(4, 3, 64, 64)
    mask = random_mask(4, 16, 0.75, generator=torch.Generator().manual_seed(2))
    with torch.autocast('cpu', torch.bfloat16):
        out = sparse.forward_mae(imgs, mask)
        loss_s, pred_s = out.loss, out.pred
        out = dense.forward_mae(imgs, mask)
        loss_d, pred_d = out.loss, out.pred
    out = sparse.double().forward_mae(imgs.double(), mask)
    ref_loss, ref_pred = out.loss, out.pred
    assert pred_s.dtype == torch.bfloat16 and loss_s.dtype == torch.float32
    assert max_rel_err(pred_s, pred_d) < 0.03 and abs(loss_s.item() - loss_d.item()) < 0.01 * loss_d.item()
    assert max_rel_err(pred_s, ref_pred) < 0.05  # and both are bf16-close to the float64 result


def test_sdpa_softmax_is_fp32_under_bf16_autocast():
    """The bf16 SDPA result is as accurate as rounding the exact result of its (bf16) inputs to bf16: its softmax
    and accumulation run in fp32. An all-bf16 explicit softmax(QK^T)V is an order of magnitude worse."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 196, 32) * 3 for _ in range(3))
    bias = torch.randn(2, 4, 196, 196)
    with torch.autocast('cpu', torch.bfloat16):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert out.dtype == torch.bfloat16
    qd, kd, vd = (t.bfloat16().double() for t in (q, k, v))
    exact = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=bias.double())
    rounding = max_rel_err(exact.bfloat16(), exact)
    assert max_rel_err(out, exact) < 1.5 * rounding
    all_bf16 = ((q.bfloat16() @ k.bfloat16().transpose(-1, -2)) * 32 ** -0.5 + bias.bfloat16()).softmax(-1)
    assert max_rel_err(all_bf16 @ v.bfloat16(), exact) > 5 * rounding


@pytest.mark.parametrize('keys', [49, 196, 256])
def test_sdpa_training_kernels_in_bf16_on_cpu(keys):
    """``sdpa`` trains short bf16 sequences on CPU with the math kernel (up to CPU_MATH_MAX_KEYS keys) and leaves
    longer ones to PyTorch's choice (flash without a mask); either way output and gradients are within bf16
    rounding of the exact result."""
    torch.manual_seed(keys)
    q, k, v = (torch.randn(2, 4, keys, 32).bfloat16().requires_grad_() for _ in range(3))
    bias = torch.randn(4, keys, keys).bfloat16()

    def kernels(fn, *args) -> set:
        with torch.profiler.profile() as prof:
            fn(q, k, v, *args)
        return {e.key for e in prof.key_averages() if e.key.startswith('aten::_scaled_dot_product')}

    math = {'aten::_scaled_dot_product_attention_math'}
    if keys <= CPU_MATH_MAX_KEYS:
        assert kernels(sdpa) == kernels(sdpa, bias) == math
    else:
        assert kernels(sdpa) == kernels(F.scaled_dot_product_attention) != math  # flash
        assert kernels(sdpa, bias) == kernels(F.scaled_dot_product_attention, bias)
    out = sdpa(q, k, v, bias)
    grad = torch.randn(out.shape).bfloat16()
    out.backward(grad)
    exact_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = F.scaled_dot_product_attention(*exact_in, attn_mask=bias.double())
    exact.backward(grad.double())
    assert out.dtype == torch.bfloat16
    assert max_rel_err(out, exact) < 1.5 * max_rel_err(exact.bfloat16(), exact)
    for got, ref in zip((q, k, v), exact_in):
        assert got.grad.dtype == torch.bfloat16
        assert max_rel_err(got.grad, ref.grad) < 3 * max_rel_err(ref.grad.bfloat16(), ref.grad)


def test_amp_flag_runs_bf16_on_cpu_through_the_runner(tmp_path):
    cfg = write_tiny_config(tmp_path / 'tiny.py', make_images(tmp_path / 'data'), max_epochs=2)
    runner = cli.pretrain([str(cfg), '--work-dir', str(tmp_path / 'work'), '--amp', '--cfg-options',
                            'experiment_name=amp_cpu'])
    assert type(runner.optim_wrapper) is BF16OptimWrapper
    losses = runner.message_hub.get_scalar('train/loss').data[0]
    assert len(losses) == 4 and all(0 < x < 10 for x in losses)


def test_amp_for_detection_is_fp16_on_cuda_and_refused_on_cpu(monkeypatch):
    from mmengine.config import Config
    from convmae_backbone.engine.amp import apply_amp
    cfg = Config(dict(default_scope='mmdet', optim_wrapper=dict(PLAIN, type='AmpOptimWrapper')))
    with pytest.raises(RuntimeError, match=r"no mixed precision available on device 'cpu' without bf16 \(mmdet: "
                                           r"mmcv's detection ops \(nms, RoIAlign\) have float and half kernels"):
        apply_amp(cfg, 'cpu')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: True)
    assert apply_amp(cfg, 'cuda').optim_wrapper.type == 'AmpOptimWrapper'  # fp16 even where bf16 exists
    assert cfg.optim_wrapper.dtype == 'float16' and cfg.optim_wrapper.loss_scale == 'dynamic'
    seg = Config(dict(default_scope='mmseg', optim_wrapper=dict(PLAIN, type='AmpOptimWrapper')))
    assert apply_amp(seg, 'cuda').optim_wrapper.type == 'BF16OptimWrapper'


def test_amp_flag_fine_tunes_segmentation_in_bf16_on_cpu(tmp_path):
    """tools/train.py --amp on CPU: the UperNet config's fp16 AmpOptimWrapper (CUDA only) becomes bf16."""
    import subprocess
    import sys

    from helpers import ROOT
    work = str(tmp_path / 'work')
    data = testing.write_ade_dataset(str(tmp_path / 'ade'), num_train=2, num_val=1, size=(64, 80))
    cfg = testing.tiny_seg_config(data, work, testing.TINY_BACKBONE, max_iters=3)
    cfg.optim_wrapper.type = 'AmpOptimWrapper'  # as in the full config
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    config = str(tmp_path / 'tiny.py')
    cfg.dump(config)
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / 'train.py'), config, '--work-dir', work, '--amp'],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    log = proc.stdout + proc.stderr
    assert '--amp: BF16OptimWrapper (bfloat16 autocast)' in log
    losses = [float(m) for m in re.findall(r' loss: ([0-9.naif]+)', log)]
    assert len(losses) == 3 and all(np.isfinite(losses)), losses
