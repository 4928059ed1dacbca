"""Sparse stage-1/2 pretraining path, fused attention and the layers with a backward of their own: all must give
the reference results."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_ARCH, random_pretrainer, rel_err

from convmae_backbone.models import BlockMask, ConvMAEPretrainer
from convmae_backbone.models.attention import Attention, RelativePositionBias, TransformerBlock
from convmae_backbone.models.conv_blocks import ConvBlock
from convmae_backbone.models.masking import random_mask
from convmae_backbone.models.sparse_conv import SparseDepthwiseConv, masked_depthwise_conv
from convmae_backbone.models.reference import ExplicitAttention, with_explicit_attention
from convmae_backbone.models.utils import GeluLinear, gelu_linear

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'official_convmae_small.pt')


@pytest.fixture(scope='module')
def official():
    return torch.load(FIXTURE, weights_only=True)


def official_model(official, sparse: bool, norm_pix_loss: bool) -> ConvMAEPretrainer:
    c = official['config']
    model = ConvMAEPretrainer(embed_dims=c['embed_dim'], depths=c['depth'], num_heads=c['num_heads'],
                              mlp_ratios=c['mlp_ratio'], decoder_embed_dim=c['decoder_embed_dim'],
                              decoder_depth=c['decoder_depth'], decoder_num_heads=c['decoder_num_heads'],
                              norm_pix_loss=norm_pix_loss, sparse=sparse)
    model.load_state_dict(official['state_dict'], strict=True)
    return model.double()


@pytest.mark.parametrize('norm_pix_loss', [True, False], ids=['norm_pix', 'raw'])
@pytest.mark.parametrize('sparse', [True, False], ids=['sparse', 'dense'])
def test_official_parity(official, sparse, norm_pix_loss):
    """Loss, prediction, latent and gradients of both paths match the official implementation (< 1e-6)."""
    model = official_model(official, sparse, norm_pix_loss)
    assert model.sparse is sparse
    tag = 'norm_pix' if norm_pix_loss else 'raw'
    imgs, mask = official['images'].double(), official['mask']
    out = model.forward_mae(imgs, mask)
    loss, pred = out.loss, out.pred
    loss.backward()
    assert rel_err(loss, official[f'loss_{tag}']) < 1e-6
    assert rel_err(pred, official['pred']) < 1e-6  # pred does not depend on the loss normalisation
    params = dict(model.named_parameters())
    for name, grad in official[f'grads_{tag}'].items():
        assert rel_err(params[name].grad, grad) < 1e-6, name
    with torch.no_grad():
        latent = model.forward_encoder(imgs, BlockMask(mask, (14, 14)))
    assert rel_err(latent, official[f'latent_{tag}']) < 1e-6


def test_sparse_equals_dense_non_square_grid():
    """64x96 images (a 4x6 token grid), random weights and mask: sparse and dense agree in float64."""
    sparse, dense = random_pretrainer(True), random_pretrainer(False)
    dense.load_state_dict(sparse.state_dict())
    gen = torch.Generator().manual_seed(1)
    imgs = torch.randn(3, 3, 64, 96, generator=gen, dtype=torch.float64)
    mask = random_mask(3, 24, 0.6, generator=gen)
    assert mask.any() and (~mask).any()
    outs = []
    for model in (sparse, dense):
        out = model.forward_mae(imgs, mask)
        loss, pred = out.loss, out.pred
        loss.backward()
        latent = model.forward_encoder(imgs, BlockMask(mask, (4, 6)))
        outs.append((loss, pred, latent, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (ls, ps, lat_s, gs), (ld, pd, lat_d, gd) = outs
    assert rel_err(ls, ld) < 1e-12
    assert rel_err(ps, pd) < 1e-12
    assert rel_err(lat_s, lat_d) < 1e-12
    assert gs.keys() == gd.keys()
    for name in gd:
        assert gd[name] is not None and gd[name].abs().max() > 0, name
        assert rel_err(gs[name], gd[name]) < 1e-10, name


@pytest.mark.parametrize('block', [4, 2, 1])
def test_sparse_depthwise_conv_equals_dense_autograd(block):
    """The sparse depthwise conv (its own backward) equals autograd through the conv of the scattered map gathered
    back, in float64: values and input, weight and bias gradients, and passes gradcheck; a non-square grid whose
    visible blocks touch the border, so the windows read zero padding and masked neighbours."""
    torch.manual_seed(block)
    conv = torch.nn.Conv2d(6, 6, 5, padding=2, groups=6).double()
    mask = BlockMask(random_mask(2, 12, 0.5, generator=torch.Generator().manual_seed(block)), (3, 4))
    x = torch.randn(2, 6, block, block, 6, dtype=torch.float64, requires_grad=True)
    ref = mask.gather(conv(mask.scatter(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    out = masked_depthwise_conv(conv, x, mask)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(ref, (x, conv.weight, conv.bias), grad)
    got = torch.autograd.grad(out, (x, conv.weight, conv.bias), grad)
    assert rel_err(out, ref) < 1e-14
    for g, e in zip(got, expected):
        assert e.abs().max() > 0 and rel_err(g, e) < 1e-12
    assert torch.autograd.gradcheck(lambda a, w, b: SparseDepthwiseConv.apply(a, w, b, mask),
                                    (x, conv.weight, conv.bias))


def test_sparse_depthwise_conv_bf16_accumulates_in_fp32():
    """Under bf16 autocast the sparse depthwise conv keeps bf16 activations, and its weight gradient (a sum over
    all visible positions of the batch) is accumulated in fp32: within 1e-5 of the exact sum of the same bf16
    inputs, where bf16 accumulation would be off by ~1e-2."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 32, 5, padding=2, groups=32)
    mask = BlockMask(random_mask(8, 196, 0.75, generator=torch.Generator().manual_seed(0)), (14, 14))
    x = torch.randn(8, 49, 4, 4, 32).bfloat16().requires_grad_()
    with torch.autocast('cpu', torch.bfloat16):
        out = masked_depthwise_conv(conv, x, mask)
    grad = torch.randn(out.shape).bfloat16()
    out.backward(grad)
    assert out.dtype == x.grad.dtype == torch.bfloat16 and conv.weight.grad.dtype == torch.float32
    exact = torch.nn.Conv2d(32, 32, 5, padding=2, groups=32).double()
    with torch.no_grad():
        exact.weight.copy_(conv.weight.bfloat16())  # what the autocast forward used
        exact.bias.copy_(conv.bias.bfloat16())
    xd = x.detach().double().requires_grad_()
    masked_depthwise_conv(exact, xd, mask).backward(grad.double())
    assert rel_err(conv.weight.grad, exact.weight.grad) < 1e-5
    assert rel_err(conv.bias.grad, exact.bias.grad) < 1e-5
    assert rel_err(x.grad, xd.grad) < 1e-2  # rounded to bf16


def test_gelu_linear_recomputes_gelu_with_the_same_gradients():
    """The MLPs' GELU -> Linear keeps only its input for the backward (one hidden-size activation per MLP fewer)
    and gives autograd's values and gradients in float64 (and passes gradcheck)."""
    torch.manual_seed(0)
    h = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    fc2 = torch.nn.Linear(16, 8).double()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = gelu_linear(h, fc2.weight, fc2.bias)
    assert {t.data_ptr() for t in saved} == {h.data_ptr(), fc2.weight.data_ptr()}
    ref = F.linear(F.gelu(h), fc2.weight, fc2.bias)
    grad = torch.randn_like(ref)
    args = (h, fc2.weight, fc2.bias)
    for got, expected in zip(torch.autograd.grad(out, args, grad), torch.autograd.grad(ref, args, grad)):
        assert rel_err(got, expected) < 1e-14
    assert rel_err(out, ref) == 0
    assert torch.autograd.gradcheck(GeluLinear.apply, args)
    with torch.no_grad():  # no autograd: the plain expression
        assert torch.equal(gelu_linear(h, fc2.weight, fc2.bias), ref)


def test_sparse_prediction_ignores_masked_pixels():
    """The sparse path never reads masked pixels: changing them leaves pred bit-identical, while changing a
    visible pixel changes it."""
    model = random_pretrainer(True).eval()
    gen = torch.Generator().manual_seed(2)
    imgs = torch.randn(2, 3, 64, 64, generator=gen, dtype=torch.float64)
    mask = random_mask(2, 16, 0.75, generator=gen)
    pixel_mask = mask.reshape(2, 1, 4, 1, 4, 1).expand(2, 3, 4, 16, 4, 16).reshape(2, 3, 64, 64)
    with torch.no_grad():
        out = model.forward_mae(imgs, mask)
        pred = out.pred
        noisy = torch.where(pixel_mask, torch.randn_like(imgs) * 100, imgs)
        out = model.forward_mae(noisy, mask)
        pred_noisy = out.pred
        changed = imgs.clone()
        changed[~pixel_mask] += 1.0
        out = model.forward_mae(changed, mask)
        pred_changed = out.pred
    assert not torch.equal(noisy, imgs)
    assert torch.equal(pred_noisy, pred)
    assert (pred_changed - pred).abs().max() > 1e-3


@pytest.mark.parametrize('rel_pos', ['decomposed', 'table', 'shared'])
@pytest.mark.parametrize('window', [0, 4], ids=['global', 'window4_padded'])
def test_fused_attention_equals_explicit(window, rel_pos, monkeypatch):
    """Fused attention == explicit softmax(QK^T)V with relative position bias (decomposed, a block's own BEiT
    table, a shared one), windows with padding (a 7x10 grid in windows of 4) and query chunking forced, in
    float64; the mask handed to SDPA stays small."""
    torch.manual_seed(3)
    hw = (7, 10)
    block = TransformerBlock(32, 4, window_size=window, rel_pos='none' if rel_pos == 'shared' else rel_pos,
                             rel_pos_size=hw).double()
    shared = RelativePositionBias((window, window) if window else hw, 4).double() if rel_pos == 'shared' else None
    with torch.no_grad():
        for p in [*block.parameters(), *(shared.parameters() if shared else ())]:
            p.add_(torch.randn_like(p) * 0.3)
    explicit_block = with_explicit_attention(copy.deepcopy(block))
    assert type(explicit_block.attn) is ExplicitAttention
    x = torch.randn(2, hw[0] * hw[1], 32, dtype=torch.float64, requires_grad=True)
    table = {'decomposed': lambda blk: blk.attn.rel_pos_h, 'table': lambda blk: blk.attn.relative_position_bias_table,
             'shared': lambda blk: shared.relative_position_bias_table}[rel_pos]

    def run(blk):
        x.grad = None
        blk.zero_grad()
        if shared is not None:
            shared.zero_grad()
        out = blk(x, hw, shared)
        out.square().sum().backward()
        return out.detach(), x.grad.clone(), table(blk).grad.clone()

    explicit = run(explicit_block)
    assert explicit[0].abs().max() > 0
    # chunk queries to 2 grid rows: the largest mask is (batch, heads, 2 rows, all keys)
    n_keys = 16 if window else hw[0] * hw[1]
    n_rows = window or hw[1]
    batch = 2 * (6 if window else 1)  # 2 x 3 windows of 4x4 over the padded 8x12 grid
    limit = batch * 4 * 2 * n_rows * n_keys
    monkeypatch.setattr(Attention, 'max_bias_numel', limit)
    sizes = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, **kwargs):
        sizes.append(attn_mask.numel())
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, 'scaled_dot_product_attention', recording_sdpa)
    fused = run(block)
    assert len(sizes) > 1 and max(sizes) <= limit
    for a, b in zip(fused, explicit):
        assert rel_err(a, b) < 1e-12
    # without autograd the chunks share one mask buffer (padding added in place)
    sizes.clear()
    with torch.no_grad():
        out = block(x, hw, shared)
    assert len(sizes) > 1 and max(sizes) <= limit
    assert rel_err(out, explicit[0]) < 1e-12


def test_fused_attention_float32_flash_kernel():
    """Without monkeypatching: the real SDPA kernel in float32 agrees with the explicit formulation."""
    torch.manual_seed(4)
    attn = Attention(64, 4, rel_pos='decomposed', rel_pos_size=(12, 12))
    with torch.no_grad():
        attn.rel_pos_h.normal_(std=0.5)
        attn.rel_pos_w.normal_(std=0.5)
    explicit = ExplicitAttention(64, 4, rel_pos='decomposed', rel_pos_size=(12, 12))
    explicit.load_state_dict(attn.state_dict())
    x = torch.randn(2, 144, 64)
    assert rel_err(attn(x, (12, 12)), explicit(x, (12, 12))) < 1e-5


@pytest.mark.parametrize('rel_pos', ['none', 'decomposed', 'table', 'shared'])
def test_fused_attention_runs_the_flash_kernel_in_float32(rel_pos):
    """On CPU every kind of relative position bias reaches SDPA as a 4-D mask, so SDPA runs its flash kernel (a
    3-D (heads, N, N) mask makes it fall back to the math kernel, which forms the (N, N) attention matrix), and
    agrees with the explicit formulation."""
    torch.manual_seed(5)
    attn = Attention(64, 4, rel_pos='none' if rel_pos == 'shared' else rel_pos, rel_pos_size=(12, 12))
    shared = RelativePositionBias((12, 12), 4) if rel_pos == 'shared' else None
    with torch.no_grad():
        for p in list(attn.parameters()) + (list(shared.parameters()) if shared else []):
            p.normal_(std=0.5)
    explicit = ExplicitAttention(64, 4, rel_pos=attn.rel_pos, rel_pos_size=(12, 12))
    explicit.load_state_dict(attn.state_dict())
    x = torch.randn(2, 144, 64)
    with torch.no_grad(), torch.profiler.profile() as prof:
        out = attn(x, (12, 12), shared=shared)
    kernels = {e.key for e in prof.key_averages() if e.key.startswith('aten::_scaled_dot_product')}
    assert kernels == {'aten::_scaled_dot_product_flash_attention_for_cpu'}
    with torch.no_grad():
        assert rel_err(out, explicit(x, (12, 12), shared=shared)) < 1e-5


def test_conv_block_inference_slabs_equal_full_map(monkeypatch):
    """Eval-mode ConvBlock without autograd (MLP in slabs of rows, as for 1024x1024 backbone inputs) equals the
    autograd forward on the whole map."""
    torch.manual_seed(5)
    block = ConvBlock(16).double().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(2, 13, 9, 16, dtype=torch.float64)  # channels last
    ref = block(x)  # grad enabled: whole map
    monkeypatch.setattr(ConvBlock, 'mlp_slab_numel', 2 * 9 * 64 * 3)  # 3 rows per slab, last one partial
    calls = []
    mlp_forward = block.mlp.forward
    monkeypatch.setattr(block.mlp, 'forward', lambda t: calls.append(t.shape[1]) or mlp_forward(t))
    with torch.no_grad():
        out = block(x)
    assert calls == [3, 3, 3, 3, 1]
    assert rel_err(out, ref) < 1e-13


def test_sparse_with_activation_checkpointing(monkeypatch):
    """with_cp checkpoints the sparse conv blocks too (with a BlockMask as argument)."""
    from convmae_backbone.models import convvit
    checkpointed = []
    checkpoint = convvit.cp.checkpoint
    monkeypatch.setattr(convvit.cp, 'checkpoint',
                        lambda fn, *a, **k: checkpointed.append(type(fn).__name__) or checkpoint(fn, *a, **k))
    plain = random_pretrainer(True)
    torch.manual_seed(0)
    ckpt = ConvMAEPretrainer(img_size=64, **TINY_ARCH, sparse=True, with_cp=True).double()
    ckpt.load_state_dict(plain.state_dict())
    gen = torch.Generator().manual_seed(6)
    imgs = torch.randn(2, 3, 64, 64, generator=gen, dtype=torch.float64)
    mask = random_mask(2, 16, 0.5, generator=gen)
    losses = []
    for model in (plain, ckpt):
        loss = model.forward_mae(imgs, mask).loss
        loss.backward()
        losses.append(loss)
    assert checkpointed.count('ConvBlock') == 2  # blocks1[0] and blocks2[0], in the with_cp model only
    assert rel_err(losses[1], losses[0]) < 1e-14
    grad_plain = plain.blocks1[0].attn.weight.grad
    assert grad_plain.abs().max() > 0
    assert rel_err(ckpt.blocks1[0].attn.weight.grad, grad_plain) < 1e-12
