"""On a CUDA device: the pretraining step and the det/seg backbones give the CPU's numbers (fp32, TF32 off), a bf16
autocast step is finite and close to fp32, and mmcv's detection ops (where built with CUDA) agree with their CPU
kernels. Marked ``cuda``: skipped, and listed as skipped, without a CUDA device (tools/gpu_check.sh runs them)."""
import pytest
import torch
from conftest import max_rel_err
from helpers import TINY_ARCH, sync_bn_to_bn
from mmengine.config import Config

from convmae_backbone import ConvMAE, ConvMAEPretrainer
from convmae_backbone.models.masking import random_mask
from convmae_backbone.testing import DET_CONFIG, SEG_CONFIG, TINY_BACKBONE

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 matmuls and convolutions in fp32 (no TF32), so that CUDA and CPU differ by rounding only."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _pretrainer() -> ConvMAEPretrainer:
    torch.manual_seed(0)
    return ConvMAEPretrainer(img_size=64, **TINY_ARCH)


def _step(model: ConvMAEPretrainer, imgs: torch.Tensor, mask: torch.Tensor):
    """loss and the gradients of one forward + backward."""
    model.zero_grad()
    out = model.forward_mae(imgs, mask)
    loss = out.loss
    loss.backward()
    return loss.detach().cpu(), {k: p.grad.detach().cpu() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('sparse', [True, False])
def test_pretraining_step_on_cuda_equals_cpu(sparse):
    imgs = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mask = random_mask(4, 16, 0.75, generator=torch.Generator().manual_seed(2))
    model = _pretrainer()
    model.sparse = sparse
    ref_loss, ref_grads = _step(model, imgs, mask)
    loss, grads = _step(model.cuda(), imgs.cuda(), mask.cuda())
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert set(grads) == set(ref_grads) and len(grads) > 20
    for key, grad in grads.items():
        assert max_rel_err(grad, ref_grads[key]) < 1e-4, key


def test_bf16_autocast_step_on_cuda_is_finite_and_close_to_fp32():
    imgs = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1)).cuda()
    mask = random_mask(8, 16, 0.75, generator=torch.Generator().manual_seed(2)).cuda()
    model = _pretrainer().cuda()
    with torch.no_grad():
        fp32_loss = model.forward_mae(imgs, mask).loss.item()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        loss = model.forward_mae(imgs, mask).loss
    assert loss.dtype == torch.float32  # the loss stays fp32 under autocast
    loss.backward()
    optimizer.step()
    assert abs(loss.item() - fp32_loss) < 0.02 * fp32_loss
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())


def _config_backbone(config: str) -> ConvMAE:
    """The backbone of a shipped det/seg config with TINY_BACKBONE sizes (windows of 2 tokens), BN, no weights."""
    cfg = sync_bn_to_bn(Config.fromfile(config).model.backbone.to_dict())
    for key in ('type', '_delete_', 'init_cfg'):
        cfg.pop(key, None)
    cfg.update(TINY_BACKBONE, drop_path_rate=0.0)
    if cfg.get('window_size'):
        cfg.update(window_size=2, global_attn_indexes=(TINY_BACKBONE['depths'][2] - 1,))
    torch.manual_seed(0)
    model = ConvMAE(**cfg)
    model.init_weights()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if 'rel_pos' in key or 'relative_position' in key:
                param.normal_(0, 0.5)  # the tables start at zero
    return model.eval()


@pytest.mark.parametrize('config', [DET_CONFIG, SEG_CONFIG], ids=['det', 'seg'])
def test_config_backbones_on_cuda_equal_cpu(config):
    model = _config_backbone(config)
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        refs = model(x)
        outs = model.cuda()(x.cuda())
    assert len(outs) == len(refs) == 4
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape and max_rel_err(out.cpu(), ref) < 1e-4


def test_mmcv_detection_ops_on_cuda_equal_cpu():
    ops = pytest.importorskip('mmcv.ops')
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(200, 2, generator=g) * 30], dim=1)
    scores = torch.rand(200, generator=g)
    try:
        cuda_dets, cuda_keep = ops.nms(boxes.cuda(), scores.cuda(), 0.5)
    except RuntimeError as exc:  # mmcv's dispatcher: "nms_impl: implementation for device cuda:0 not found."
        if 'implementation for device cuda' in str(exc):
            pytest.skip(f'mmcv was built with CPU ops only: {str(exc).strip()}')
        raise
    dets, keep = ops.nms(boxes, scores, 0.5)
    assert torch.equal(cuda_keep.cpu(), keep) and torch.allclose(cuda_dets.cpu(), dets)
    feats = torch.randn(2, 8, 32, 32, generator=g)
    rois = torch.tensor([[0, 1.0, 2.0, 20.0, 25.0], [1, 5.5, 3.2, 30.0, 31.0], [0, 0.0, 0.0, 31.0, 31.0]])
    ref = ops.roi_align(feats, rois, (7, 7), 1.0, 2, 'avg', True)
    out = ops.roi_align(feats.cuda(), rois.cuda(), (7, 7), 1.0, 2, 'avg', True)
    assert max_rel_err(out.cpu(), ref) < 1e-5
