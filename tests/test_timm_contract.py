"""timm's model contract on every ``convmae_*`` name: the checks of timm's generic model tests
(``tests/test_models.py`` of huggingface/pytorch-image-models: forward, backward, default configs, features,
forward_intermediates, torch.fx forward and backward; TorchScript aside), written here for our names with timm's
input-size rule (default size capped per test, or ``min_input_size`` when the default exceeds the cap), plus
what those tests leave open: the maps equal the ``ConvMAE`` backbone's, pruning, fx at a non-square size.

To stay fast on two cores, only test_forward (timm's first test) and the fx extraction at a non-square size
build the named architecture whole; the other tests build it with one block per stage (``SHALLOW``: its widths,
heads and every kind of module kept; what they check does not depend on depth). timm's caps put every test but
the configuration and forward checks at ``min_input_size`` (32 x 32).
"""
import math
from typing import Optional, Sequence, Tuple

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import FeatureInfo, get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from convmae_backbone import ConvMAE
from convmae_backbone.testing import TINY_ENCODER

NAMES = timm.list_models('convmae*')
TAGGED = timm.list_models('convmae*', include_tags=True)
# timm's caps: default input size per test, largest size run
FWD_SIZE, BWD_SIZE, FEATURE_SIZE, FX_SIZE = 384, 128, 96, 128
MAX_OUT_SIZE = 448
SHALLOW = dict(depths=(1, 1, 1))
FX_TRACER = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                 param_shapes_constant=True)


def input_size(name: str, target: Optional[int] = None) -> Tuple[int, int, int]:
    """timm's rule: the default input size, or ``min_input_size`` where that exceeds ``target`` (else capped)."""
    cfg = timm.get_pretrained_cfg(name).to_dict()
    size = cfg['input_size']
    if cfg.get('fixed_input_size') or not target or max(size) <= target:
        return size
    return cfg['min_input_size'] if cfg.get('min_input_size') else tuple(min(s, target) for s in size)


def create(name: str, **kwargs) -> torch.nn.Module:
    """``timm.create_model(name, **kwargs)`` with one block per stage (:data:`SHALLOW`)."""
    return timm.create_model(name, **SHALLOW, **kwargs)


def check_maps(maps: Sequence[torch.Tensor], channels: Sequence[int], reductions: Sequence[int],
               batch: int, hw: Tuple[int, int], output_fmt: str = 'NCHW') -> None:
    """timm's checks of feature maps, with our exact sizes: ceil(H/r) x ceil(W/r)."""
    assert len(maps) == len(channels) == len(reductions)
    spatial = get_spatial_dim(output_fmt)
    for m, c, r in zip(maps, channels, reductions):
        assert m.shape[0] == batch and m.shape[get_channel_dim(output_fmt)] == c
        assert (m.shape[spatial[0]], m.shape[spatial[1]]) == (math.ceil(hw[0] / r), math.ceil(hw[1] / r))
        assert not torch.isnan(m).any()


def test_names_are_tested():
    assert 'convmae_base' in NAMES and all(n.split('.')[0] in NAMES for n in TAGGED)
    assert all(timm.is_model(n) for n in NAMES)


@pytest.mark.parametrize('name', NAMES)
def test_forward(name):
    """timm's test_model_forward: one image at the default size (grad checkpointing changes nothing in eval)."""
    model = timm.create_model(name).eval()
    x = torch.randn(1, *input_size(name, FWD_SIZE))
    with torch.no_grad():
        out = model(x)
        model.set_grad_checkpointing()
        again = model(x)
    assert out.shape == (1, model.num_classes) and not torch.isnan(out).any()
    torch.testing.assert_close(again, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', NAMES)
def test_backward(name):
    """timm's test_model_backward (42 classes, batch 2, train mode): every parameter gets a gradient; with grad
    checkpointing the same logits and gradients."""
    torch.manual_seed(0)
    model = create(name, num_classes=42).train()
    x = torch.randn(2, *input_size(name, BWD_SIZE))
    out = model(x)
    out.mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert out.shape == (2, 42) and not torch.isnan(out).any()
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing()
    again = model(x)
    again.mean().backward()
    torch.testing.assert_close(again, out)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize('name', TAGGED)
def test_default_cfgs(name):
    """timm's test_model_default_cfgs (with test_model_default_cfgs_non_std's extra check): forward_features
    unpooled at ``pool_size``, forward_head with pre_logits, classifier reset with and without pooling, and the
    config's classifier and first conv named in the state dict."""
    model = create(name).eval()
    state = model.state_dict()
    cfg = model.pretrained_cfg
    assert model.num_classes == cfg['num_classes'] >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    assert {'input_size', 'mean', 'std', 'crop_pct', 'interpolation', 'pool_size', 'first_conv',
            'classifier'} <= set(cfg)
    size = cfg['input_size']
    assert max(size) <= MAX_OUT_SIZE
    x = torch.randn(1, *size)
    with torch.no_grad():
        features = model.forward_features(x)
        pre = model.forward_head(features, pre_logits=True)
        assert features.shape == (1, model.num_features, *cfg['pool_size'])
        assert pre.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0
        pooled = model(x)
        assert pooled.shape == pre.shape
        torch.testing.assert_close(pooled, pre)
        model.reset_classifier(0, '')
        assert model(x).shape == (1, model.num_features, *cfg['pool_size'])
        unpooled = create(name, num_classes=0, global_pool='').eval()(x)
        assert unpooled.shape == (1, model.num_features, *cfg['pool_size'])
        assert create(name, num_classes=0).eval()(x).shape == (1, model.num_features)
    classifiers = cfg['classifier'] if isinstance(cfg['classifier'], (tuple, list)) else (cfg['classifier'],)
    if cfg['num_classes']:
        assert all(f'{c}.weight' in state for c in classifiers)
    first = cfg['first_conv'] if isinstance(cfg['first_conv'], (tuple, list)) else (cfg['first_conv'],)
    assert all(f'{c}.weight' in state for c in first)


def test_classifier_interface():
    """get_classifier / reset_classifier: a new head of the size asked for; a per-position head without pooling;
    the pooling names timm's models take and nothing else."""
    model = create('convmae_base', num_classes=5).eval()
    assert model.get_classifier() is model.head and model.head.out_features == 5
    model.reset_classifier(7)
    assert model.head.out_features == 7 and model.global_pool == 'avg'
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        logits = model(x)
        model.reset_classifier(7, '')
        dense = model(x)
    assert logits.shape == (1, 7) and dense.shape == (1, 7, 3, 4)
    with pytest.raises(ValueError, match="global_pool must be one of"):
        model.reset_classifier(7, 'token')


@pytest.mark.parametrize('feature_cls', ['getter', 'fx'])
@pytest.mark.parametrize('name', NAMES)
def test_forward_features(name, feature_cls):
    """timm's test_model_forward_features (``features_only=True``, the default: timm's FeatureGetterNet) and
    test_model_forward_intermediates_features; also through timm's FX wrapper (FeatureGraphNet), which returns
    the same maps."""
    torch.manual_seed(0)
    model = create(name, features_only=True, feature_cls=feature_cls).eval()
    torch.manual_seed(0)
    default = create(name, features_only=True).eval()
    assert type(default).__name__ == 'FeatureGetterNet'
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) >= 3 and reductions == [4, 8, 16]
    size = input_size(name, FEATURE_SIZE)
    x = torch.randn(1, *size)
    with torch.no_grad():
        maps, expected = model(x), default(x)
    check_maps(maps, channels, reductions, 1, size[1:])
    assert all(torch.equal(a, b) for a, b in zip(maps, expected))


@pytest.mark.parametrize('name', NAMES)
def test_forward_intermediates(name):
    """timm's test_model_forward_intermediates: all stage maps and the final features, equal to forward_features
    (also with grad checkpointing)."""
    model = create(name).eval()
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    size = input_size(name, FEATURE_SIZE)
    x = torch.randn(1, *size)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, output_fmt='NCHW')
        check_maps(maps, info.channels(), info.reduction(), 1, size[1:])
        torch.testing.assert_close(final, model.forward_features(x))
        model.set_grad_checkpointing()
        torch.testing.assert_close(model.forward_intermediates(x)[0], final, rtol=1e-4, atol=1e-5)


def test_forward_intermediates_options_and_backbone_parity():
    """indices (timm's: None all, n the last n, negatives from the end), stop_early, intermediates_only, NHWC;
    the maps equal the ConvMAE backbone's (same weights) at a size that is no multiple of 16."""
    torch.manual_seed(0)
    model = timm.create_model('convmae_base', **TINY_ENCODER).eval()
    backbone = ConvMAE(**TINY_ENCODER, out_indices=(0, 1, 2)).eval()
    backbone.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(2, 3, 50, 70)
    with torch.no_grad():
        expected = backbone(x)
        final, maps = model.forward_intermediates(x)
        assert all(torch.equal(a, b) for a, b in zip(maps, expected)) and torch.equal(final, expected[2])
        assert [m.shape[1] for m in model.forward_intermediates(x, indices=2, intermediates_only=True)] == \
            list(TINY_ENCODER['embed_dims'][1:])
        last, only_first = model.forward_intermediates(x, indices=[-3], stop_early=True)
        assert torch.equal(last, expected[0]) and torch.equal(only_first[0], expected[0])
        nhwc = model.forward_intermediates(x, indices=(1,), output_fmt='NHWC', intermediates_only=True)
        assert torch.equal(nhwc[0], expected[1].permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match='without a norm'):
        model.forward_intermediates(x, norm=True)
    with pytest.raises(ValueError, match="output_fmt='NLC'"):
        model.forward_intermediates(x, output_fmt='NLC')
    with pytest.raises(AssertionError, match='out of range'):  # timm's own check of indices
        model.forward_intermediates(x, indices=[3])


def test_prune_intermediate_layers():
    """Pruning to the first stage removes stages 2-3 (pos_embed included) and the head: fewer parameters, the
    same map; features_only with out_indices=(0,) does it through timm's FeatureGetterNet."""
    torch.manual_seed(0)
    model = timm.create_model('convmae_base', **TINY_ENCODER).eval()
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
    assert model.prune_intermediate_layers([-3]) == [0]
    names = {n.split('.')[0] for n in model.state_dict()}
    assert names == {'patch_embed1', 'blocks1'}, names
    assert model.num_classes == 0 and model.global_pool == ''
    with torch.no_grad():
        got = model.forward_intermediates(x, intermediates_only=True)
    assert len(got) == 1 and torch.equal(got[0], expected[0])
    torch.manual_seed(0)
    features = timm.create_model('convmae_base', features_only=True, out_indices=(0,), **TINY_ENCODER).eval()
    assert {n.split('.')[1] for n in features.state_dict()} == {'patch_embed1', 'blocks1'}
    with torch.no_grad():
        assert torch.equal(features(x)[0], expected[0])


def _fx_model(model: torch.nn.Module) -> torch.nn.Module:
    """timm's FX path as its tests take it: torchvision's feature extractor with timm's leaf modules and
    functions, returning the last node in train and in eval mode."""
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=FX_TRACER)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                    eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=FX_TRACER)


@pytest.mark.parametrize('name', NAMES)
def test_forward_fx(name):
    """timm's test_model_forward_fx: the traced model gives exactly the model's logits (under inference_mode)."""
    model = create(name).eval()
    x = torch.randn(1, *input_size(name, FX_SIZE))
    with torch.inference_mode():
        out = model(x)
        traced = _fx_model(model)
        fx_out = torch.cat(tuple(traced(x).values()))
    assert torch.equal(fx_out, out) and not torch.isnan(out).any()


@pytest.mark.parametrize('name', NAMES)
def test_backward_fx(name):
    """timm's test_model_backward_fx: the traced model (train mode, 42 classes, batch 2) gives a gradient to
    every parameter."""
    model = create(name, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    traced = _fx_model(model)
    out = torch.cat(tuple(traced(torch.randn(2, *input_size(name, FX_SIZE))).values()))
    out.mean().backward()
    assert all(p.grad is not None for p in traced.parameters())
    assert sum(p.grad.numel() for p in traced.parameters()) == num_params
    assert out.shape == (2, 42) and not torch.isnan(out).any()


def test_fx_feature_extraction_convmae_b_non_square():
    """torchvision's create_feature_extractor (its default tracer) on ConvMAE-B at 50 x 70: the three maps by
    their module names, equal to forward_intermediates (the backbone's maps, tested above); a bad input still
    gets the model's error from the traced graph."""
    model = timm.create_model('convmae_base').eval()
    nodes = {info['module']: f'res{info["reduction"]}' for info in model.feature_info}
    extractor = create_feature_extractor(model, return_nodes=nodes)
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        got = list(extractor(x).values())
        check_maps(got, [256, 384, 768], [4, 8, 16], 1, (50, 70))
        assert all(torch.equal(a, b) for a, b in zip(got, model.forward_intermediates(x, intermediates_only=True)))
        with pytest.raises(ValueError, match=r'at least 32 pixels, got \(20, 70\)'):
            extractor(torch.randn(1, 3, 20, 70))
        with pytest.raises(ValueError, match=r'images of shape \(B, 3, H, W\)'):
            model(torch.randn(1, 1, 64, 64))

