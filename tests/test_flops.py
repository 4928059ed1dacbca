"""mmengine's FLOP counter (what mmdet's and mmseg's ``get_flops.py`` call) counts every multiply-add of the
backbone once our handles are registered (``import convmae_backbone``): SDPA, the MLPs' fused GELU -> Linear and
the convolutions our layers call as functions, compared with a count written out layer by layer."""
import math

import pytest
import torch
from mmengine.analysis import FlopAnalyzer, get_model_complexity_info

import convmae_backbone  # noqa: F401  (registers the handles)
from convmae_backbone import ConvMAE
from convmae_backbone.engine.flops import FLOP_HANDLES
from convmae_backbone.testing import TINY_ENCODER


def layer_norm(n: int, c: int) -> int:
    return 5 * n * c  # mmengine's convention for an affine LayerNorm


def conv_block(n: int, c: int, hidden: int) -> int:
    """norm1, 1x1 conv, 5x5 depthwise conv, 1x1 conv, norm2, MLP (two 1x1 convs) over n positions."""
    return 2 * layer_norm(n, c) + 2 * n * c * c + n * c * 25 + 2 * n * c * hidden


def transformer_block(n: int, c: int, hidden: int, windows: int, tokens: int) -> int:
    """norm1, qkv and proj over ``windows * tokens`` (padded) tokens, attention (q k^T and attn v) in each of
    ``windows`` groups of ``tokens``, norm2 and MLP over the n tokens."""
    padded = windows * tokens
    return 2 * layer_norm(n, c) + padded * c * 4 * c + windows * 2 * tokens * tokens * c + 2 * n * c * hidden


def analytic_macs(model: ConvMAE, batch: int, h: int, w: int) -> int:
    """Multiply-adds of the backbone's forward on (batch, 3, h, w), h and w multiples of 16, layer by layer."""
    (c1, c2, c3), (p1, p2, p3) = model.embed_dims, model.patch_sizes
    n1 = (h // p1) * (w // p1)
    n2 = n1 // (p2 * p2)
    gh, gw = h // model.patch_size, w // model.patch_size
    n3 = gh * gw
    total = n1 * c1 * 3 * p1 * p1 + layer_norm(n1, c1)
    total += sum(conv_block(n1, c1, int(c1 * model.mlp_ratios[0])) for _ in model.blocks1)
    total += n2 * c2 * c1 * p2 * p2 + layer_norm(n2, c2)
    total += sum(conv_block(n2, c2, int(c2 * model.mlp_ratios[1])) for _ in model.blocks2)
    total += n3 * c3 * c2 * p3 * p3 + layer_norm(n3, c3) + n3 * c3 * c3  # patch_embed3, patch_embed4
    for blk in model.blocks3:
        ws = blk.window_size
        windows, tokens = (math.ceil(gh / ws) * math.ceil(gw / ws), ws * ws) if ws else (1, n3)
        total += transformer_block(n3, c3, int(c3 * model.mlp_ratios[2]), windows, tokens)
    return batch * total


VARIANTS = {
    'dense': dict(),
    'windowed': dict(window_size=3, global_attn_indexes=(1,), rel_pos_bias='shared'),
}


@pytest.mark.parametrize('grad', [True, False])
@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_backbone_count_equals_the_analytical_count(variant, grad):
    """With autograd (the MLPs' GeluLinear autograd function) and without (plain linear), dense and windowed
    (a 4x5 grid in 3x3 windows: padded windows) attention."""
    model = ConvMAE(img_size=64, **TINY_ENCODER, out_indices=(0, 1, 2), **VARIANTS[variant]).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.set_grad_enabled(grad):
        analyzer = FlopAnalyzer(model, (x,))
        total = analyzer.total()
    assert total == analytic_macs(model, 2, 64, 80)
    ops = analyzer.by_operator()
    assert ops['scaled_dot_product_attention'] > 0
    assert (ops['PythonOp.GeluLinear'] > 0) == grad
    assert not [op for op in analyzer.unsupported_ops() if op in FLOP_HANDLES]


def test_get_model_complexity_info_counts_attention():
    """The entry point of mmdet's and mmseg's get_flops.py gives the same total."""
    model = ConvMAE(img_size=64, **TINY_ENCODER, out_indices=(0, 1, 2)).eval()
    x = torch.randn(1, 3, 64, 64)
    info = get_model_complexity_info(model, inputs=(x,), show_table=False, show_arch=False)
    assert info['flops'] == analytic_macs(model, 1, 64, 64)

