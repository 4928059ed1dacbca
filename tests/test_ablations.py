"""The paper's ablation switches: the depthwise kernel size (sparse == dense, halo following the kernel) and the
multi-scale fusion; the official defaults are what the parity tests (test_sparse.py, test_fastconvmae.py) pin."""
import pytest
import torch
from helpers import TINY_ARCH, random_pretrainer, rel_err

from convmae_backbone.models import BlockMask, ConvMAE, ConvMAEPretrainer
from convmae_backbone.models.masking import random_mask
from convmae_backbone.models.sparse_conv import SparseDepthwiseConv, masked_depthwise_conv


@pytest.mark.parametrize('kernel', [7, 9])
def test_kernel_size_sparse_equals_dense(kernel):
    """A k x k depthwise kernel everywhere in stages 1-2 (halo k // 2 in the sparse path: wider than the 2x2
    blocks of stage 2): sparse == dense in float64 on a 4x6 grid, values and gradients."""
    sparse, dense = random_pretrainer(True, conv_kernel_size=kernel), random_pretrainer(False, conv_kernel_size=kernel)
    dense.load_state_dict(sparse.state_dict())
    assert sparse.blocks1[0].attn.weight.shape == (32, 1, kernel, kernel)
    assert sparse.blocks2[0].attn.padding == (kernel // 2, kernel // 2)
    gen = torch.Generator().manual_seed(1)
    imgs = torch.randn(2, 3, 64, 96, generator=gen, dtype=torch.float64)
    mask = random_mask(2, 24, 0.5, generator=gen)
    outs = []
    for model in (sparse, dense):
        out = model.forward_mae(imgs, mask)
        loss, pred = out.loss, out.pred
        loss.backward()
        outs.append((loss, pred, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (ls, ps, gs), (ld, pd, gd) = outs
    assert rel_err(ls, ld) < 1e-12 and rel_err(ps, pd) < 1e-12
    for name in gd:
        assert gd[name].abs().max() > 0 and rel_err(gs[name], gd[name]) < 1e-10, name


def test_kernel_size_reaches_further_and_the_sparse_conv_keeps_its_own_gradients():
    """The 7x7 sparse depthwise conv passes gradcheck and, unlike 5x5, reads 3 positions across a block edge."""
    torch.manual_seed(2)
    mask = BlockMask(torch.tensor([[False, False, True, True]]), (1, 4))  # two visible 4x4 blocks side by side
    x = torch.zeros(1, 2, 4, 4, 1, dtype=torch.float64)
    x[0, 0, :, 0] = 1.0  # the left column of the left block
    for k, reaches in ((5, False), (7, True)):
        conv = torch.nn.Conv2d(1, 1, k, padding=k // 2, groups=1).double()
        torch.nn.init.ones_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
        out = masked_depthwise_conv(conv, x, mask)
        assert bool(out[0, 1, :, 0].abs().sum() > 0) is False  # 4 columns away: out of reach of both
        assert bool(out[0, 0, :, 3].abs().sum() > 0) is reaches  # 3 columns away
    conv = torch.nn.Conv2d(3, 3, 7, padding=3, groups=3).double()
    xs = torch.randn(1, 2, 4, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w, b: SparseDepthwiseConv.apply(a, w, b, mask),
                                    (xs, conv.weight, conv.bias))


@pytest.mark.parametrize('kernel', [4, 0, -3])
def test_kernel_size_must_be_odd_and_positive(kernel):
    with pytest.raises(ValueError, match=f'conv_kernel_size must be a positive odd number, got {kernel}'):
        ConvMAE(img_size=32, **{k: v for k, v in TINY_ARCH.items() if not k.startswith('decoder')},
                conv_kernel_size=kernel)


def test_backbone_takes_the_kernel_size():
    backbone = ConvMAE(img_size=64, embed_dims=(16, 32, 64), depths=(1, 1, 1), num_heads=2, conv_kernel_size=7)
    assert all(b.attn.kernel_size == (7, 7) for b in [*backbone.blocks1, *backbone.blocks2])
    maps = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 16, 16, 16), (1, 32, 8, 8), (1, 64, 4, 4)]


def test_without_multiscale_fusion():
    """multiscale_fusion=False: no stage1/2_output_decode (nor their keys); the latent is norm(stage 3) of the
    visible tokens, the same on both paths; the model trains."""
    fused = random_pretrainer(True)
    plain = random_pretrainer(True, multiscale_fusion=False)
    dense = random_pretrainer(False, multiscale_fusion=False)
    keys = set(fused.state_dict()) - set(plain.state_dict())
    assert keys == {f'stage{i}_output_decode.{p}' for i in (1, 2) for p in ('weight', 'bias')}
    assert set(plain.state_dict()) < set(fused.state_dict())
    plain.load_state_dict({k: v for k, v in fused.state_dict().items() if k not in keys}, strict=True)
    dense.load_state_dict(plain.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(3)
    imgs = torch.randn(2, 3, 64, 64, generator=gen, dtype=torch.float64)
    mask = BlockMask(random_mask(2, 16, 0.75, generator=gen), (4, 4))
    with torch.no_grad():
        s2 = plain.conv_stage(2, plain.conv_stage(1, mask.gather(imgs.permute(0, 2, 3, 1)), mask), mask)
        tokens, _ = plain.stage3_tokens(s2, mask)
        expected = plain.norm(plain.transformer_stage(tokens))
        assert rel_err(plain.forward_encoder(imgs, mask), expected) < 1e-14
        assert rel_err(dense.forward_encoder(imgs, mask), expected) < 1e-12
        assert rel_err(fused.forward_encoder(imgs, mask), expected) > 1e-3  # fusion does change the latent
    out = plain.forward_mae(imgs, mask.mask)
    loss = out.loss
    loss.backward()
    assert loss.isfinite() and plain.blocks1[0].conv1.weight.grad.abs().max() > 0
