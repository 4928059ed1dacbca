"""The ConvMAE backbone: shapes, parity with the official encoder, registries, options."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import convmae_backbone  # noqa: F401  (registers ConvMAE)
from convmae_backbone import ConvMAE, ConvViT
from convmae_backbone.models.utils import resize_pos_embed
from convmae_backbone.testing import TINY_ENCODER
from conftest import max_rel_err

BASE_CHANNELS = (256, 384, 768, 768)


def _tiny(**kw):
    model = ConvMAE(**{**TINY_ENCODER, **kw})
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize('hw', [(224, 224), (96, 160), (33, 70), (100, 37), (32, 32)])
def test_output_shapes_are_ceil_of_stride(hw):
    model = _tiny(out_indices=(0, 1, 2, 3))
    with torch.no_grad():
        outs = model(torch.randn(2, 3, *hw))
    assert len(outs) == 4
    for i, out in enumerate(outs):
        s = 4 * 2 ** i
        channels = (TINY_ENCODER['embed_dims'] + TINY_ENCODER['embed_dims'][-1:])[i]
        assert out.shape == (2, channels, math.ceil(hw[0] / s), math.ceil(hw[1] / s))


def test_base_channels_and_out_indices_subset():
    model = ConvMAE(out_indices=(0, 1, 2, 3)).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 96))
    assert [o.shape[1] for o in outs] == list(BASE_CHANNELS)
    assert [tuple(o.shape[2:]) for o in outs] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    model.out_indices = (1, 3)
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 96))
    assert [o.shape[1] for o in outs] == [384, 768]


def test_h32_map_is_maxpool_of_h16():
    model = _tiny(out_indices=(2, 3))
    with torch.no_grad():
        s16, s32 = model(torch.randn(1, 3, 96, 128))
    assert torch.equal(s32, F.max_pool2d(s16, 2, 2, ceil_mode=True))


def _official_ckpt(tmp_path, official, name='official.pth'):
    path = tmp_path / name
    torch.save({'model': official['state_dict'], 'epoch': 1599}, path)
    return str(path)


def test_parity_with_official_encoder(tmp_path, official, small_arch):
    model = ConvMAE(**small_arch, init_cfg=dict(type='Pretrained', checkpoint=_official_ckpt(tmp_path, official)))
    model.init_weights()
    model = model.double().eval()
    with torch.no_grad():
        feats = model(official['images'].double())
    assert len(feats) == 3
    for ours, ref in zip(feats, official['features']):
        assert ours.shape == ref.shape
        assert max_rel_err(ours, ref) < 1e-6


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_builds_from_both_registries(scope):
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    model = registry.build(dict(type='ConvMAE', **TINY_ENCODER, out_indices=(0, 1, 2, 3)))
    assert isinstance(model, ConvMAE)
    with torch.no_grad():
        outs = model.eval()(torch.randn(1, 3, 64, 64))
    assert [o.shape[-1] for o in outs] == [16, 8, 4, 2]


def test_pos_embed_is_interpolated_bicubic_to_the_input_grid():
    model = _tiny(img_size=224)
    seen = {}
    blk = model.blocks3[0]
    blk.register_forward_pre_hook(lambda m, args: seen.setdefault('x', args[0]))
    x = torch.randn(1, 3, 320, 256)
    with torch.no_grad():
        model(x)
        s2 = model.conv_stage(2, model.conv_stage(1, x.permute(0, 2, 3, 1)))
        tokens = model.patch_embed4(model.patch_embed3(s2).flatten(1, 2))
    grid = model.pos_embed.reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(20, 16), mode='bicubic', align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(1, 320, -1)
    torch.testing.assert_close(seen['x'] - tokens, expected.expand_as(tokens), rtol=1e-5, atol=1e-6)


def test_frozen_stages_really_freeze():
    model = _tiny(frozen_stages=2)
    model.train()
    frozen = [model.patch_embed1, model.blocks1, model.patch_embed2, model.blocks2]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(not m.training for m in frozen)
    assert all(p.requires_grad for p in model.blocks3.parameters()) and model.pos_embed.requires_grad
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sum(o.sum() for o in model(torch.randn(2, 3, 64, 64))).backward()
    opt.step()
    after = model.state_dict()
    assert torch.equal(before['blocks2.0.conv1.weight'], after['blocks2.0.conv1.weight'])
    assert torch.equal(before['patch_embed1.proj.weight'], after['patch_embed1.proj.weight'])
    assert not torch.equal(before['blocks3.0.attn.qkv.weight'], after['blocks3.0.attn.qkv.weight'])


def test_frozen_all_stages_freezes_pos_embed():
    model = _tiny(frozen_stages=3)
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize('rel_pos_bias', ['decomposed', 'shared', 'per_block'])
def test_with_cp_gives_same_outputs_and_gradients(rel_pos_bias):
    ref = _tiny(out_indices=(0, 1, 2, 3), window_size=2, global_attn_indexes=(1,), rel_pos_bias=rel_pos_bias).train()
    with torch.no_grad():  # non-zero relative position tables
        for name, p in ref.named_parameters():
            if 'rel_pos' in name or 'relative_position' in name:
                p.normal_(std=0.5)
    cp = copy.deepcopy(ref)
    cp.with_cp = True
    x = torch.randn(2, 3, 64, 80)
    outs_ref, outs_cp = ref(x), cp(x)
    for a, b in zip(outs_ref, outs_cp):
        torch.testing.assert_close(a, b)
    sum((o ** 2).sum() for o in outs_ref).backward()
    sum((o ** 2).sum() for o in outs_cp).backward()
    grads_cp = dict(cp.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(p.grad, grads_cp[name].grad, msg=name)


@pytest.mark.parametrize('window', [14, 16])
def test_window_covering_whole_grid_equals_global(window):
    glob = _tiny().double()
    win = _tiny(window_size=window).double()
    win.load_state_dict(glob.state_dict())
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        assert max_rel_err(win(x)[2], glob(x)[2]) < 1e-12


def test_windowed_attention_differs_from_global_when_windows_split_the_grid():
    glob = _tiny()
    win = _tiny(window_size=4)
    win.load_state_dict(glob.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert max_rel_err(win(x)[2], glob(x)[2]) > 1e-4


def test_drop_path_is_off_in_eval():
    ref = _tiny()
    dp = _tiny(drop_path_rate=0.5)
    dp.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(ref(x), dp(x)):
            assert torch.equal(a, b)
        dp.train()
        torch.manual_seed(0)
        assert not torch.equal(dp(x)[2], ref(x)[2])


@pytest.mark.parametrize('shape, match', [
    ((3, 64, 64), r'\(B, 3, H, W\)'),
    ((1, 4, 64, 64), r'\(B, 3, H, W\)'),
    ((1, 3, 31, 64), 'at least 32'),
])
def test_bad_input_raises_value_error(shape, match):
    with pytest.raises(ValueError, match=match):
        _tiny()(torch.randn(*shape))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match='out_indices'):
        ConvMAE(**TINY_ENCODER, out_indices=(4,))
    with pytest.raises(ValueError, match='global_attn_indexes'):
        ConvMAE(**TINY_ENCODER, window_size=4, global_attn_indexes=(5,))
    with pytest.raises(ValueError, match='img_size'):
        ConvMAE(**TINY_ENCODER, img_size=100)


def test_resize_pos_embed_identity_when_grid_matches():
    pos = torch.randn(1, 12, 8)
    assert resize_pos_embed(pos, (3, 4), (3, 4)) is pos


def encoder_names_outside_stage_of(model: ConvViT) -> set:
    """Top-level modules, parameters and buffers of an encoder that :attr:`ConvViT.STAGE_OF` does not place (they
    would be dropped from exports and put in the wrong learning-rate group)."""
    names = {n for n, _ in model.named_children()}
    names |= {n for n, _ in model.named_parameters(recurse=False)} | {n for n, _ in model.named_buffers(recurse=False)}
    return names - set(ConvViT.STAGE_OF)


@pytest.mark.parametrize('variant', [
    dict(),
    dict(rel_pos_bias='decomposed', window_size=2, global_attn_indexes=(1,)),
    dict(rel_pos_bias='shared', window_size=2, global_attn_indexes=(1,), freeze_pos_embed=True),
    dict(rel_pos_bias='per_block', layer_scale_init_value=1.0, with_cp=True),
])
def test_every_encoder_module_has_a_stage(variant):
    assert encoder_names_outside_stage_of(ConvViT(img_size=64, **TINY_ENCODER, **variant)) == set()


def test_a_module_missing_from_stage_of_is_found():
    class Extended(ConvViT):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.extra_norm = torch.nn.LayerNorm(self.embed_dims[2])
            self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, self.embed_dims[2]))

    assert encoder_names_outside_stage_of(Extended(img_size=64, **TINY_ENCODER)) == {'extra_norm', 'cls_token'}
