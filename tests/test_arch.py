"""models/arch.py: the architecture read back from the weights of models of several sizes, and the one error
that lists every field where a config and a checkpoint disagree."""
import pytest

from convmae_backbone import ConvMAE, ConvMAEPretrainer
from convmae_backbone.models.arch import arch_settings, check_arch, infer_arch, model_arch

ARCHS = [
    dict(img_size=32, in_channels=3, patch_sizes=(4, 2, 2), embed_dims=(16, 24, 64), depths=(1, 1, 2),
         num_heads=1, mlp_ratios=(4, 4, 4), conv_kernel_size=5),
    dict(img_size=48, in_channels=1, patch_sizes=(4, 2, 2), embed_dims=(8, 16, 128), depths=(2, 3, 1),
         num_heads=2, mlp_ratios=(4, 3, 2.5), conv_kernel_size=7),
    dict(img_size=64, in_channels=3, patch_sizes=(2, 2, 4), embed_dims=(8, 12, 64), depths=(1, 2, 3),
         num_heads=1, mlp_ratios=(2, 1.5, 4), conv_kernel_size=3),
]


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('cls', [ConvMAEPretrainer, ConvMAE])
def test_infer_arch_recovers_the_keyword_arguments(arch, cls):
    model = cls(**arch)
    inferred = infer_arch(model.state_dict())
    assert inferred == arch  # num_heads: 64-channel heads by default, as these models have
    check_arch(arch, inferred, 'model')  # agrees with itself
    model.__class__(**inferred).load_state_dict(model.state_dict(), strict=True)


def test_num_heads_from_caller_or_relative_position_tables():
    arch = dict(ARCHS[0], num_heads=4)
    plain = ConvMAE(**arch).state_dict()
    assert infer_arch(plain)['num_heads'] == 1  # no trace of the heads: 64-channel heads assumed
    assert infer_arch(plain, num_heads=4)['num_heads'] == 4
    with_rel_pos = ConvMAE(**arch, use_rel_pos_bias=True).state_dict()  # rel_pos_h: (2 * 2 - 1, 16)
    assert infer_arch(with_rel_pos)['num_heads'] == 4
    with pytest.raises(ValueError, match='num_heads must divide the stage-3 width 64, got 3'):
        infer_arch(plain, num_heads=3)


def test_mlp_ratios_compare_by_hidden_width():
    inferred = infer_arch(ConvMAE(**dict(ARCHS[0], mlp_ratios=(4 / 3, 4, 4))).state_dict())
    assert inferred['mlp_ratios'] == (1.3125, 4, 4)  # int(16 * 4 / 3) = 21 hidden channels
    check_arch(dict(mlp_ratios=(4 / 3, 4, 4)), inferred, 'ckpt')
    check_arch(dict(mlp_ratios=4, img_size=1024, num_heads=12), infer_arch(ConvMAE(**ARCHS[0]).state_dict()),
               'ckpt')  # a scalar applies to all stages; img_size and num_heads are not compared


def test_check_arch_lists_every_differing_field():
    inferred = infer_arch(ConvMAE(**ARCHS[1]).state_dict())
    config = dict(ARCHS[1], embed_dims=(8, 16, 96), depths=[2, 3, 1], mlp_ratios=4, patch_sizes=(4, 2, 2))
    with pytest.raises(ValueError) as info:
        check_arch(config, inferred, 'backbone.pth')
    message = str(info.value)
    assert message.startswith('the architecture in the config differs from the weights in backbone.pth: ')
    assert 'embed_dims: config (8, 16, 96), checkpoint (8, 16, 128)' in message
    assert 'mlp_ratios: config 4, checkpoint (4, 3, 2.5)' in message
    assert 'depths' not in message and 'patch_sizes' not in message and 'in_channels' not in message
    assert message.count(': config ') == 2


def test_infer_arch_errors_name_the_cause():
    state = ConvMAE(**ARCHS[0]).state_dict()
    del state['patch_embed2.proj.weight']
    with pytest.raises(ValueError, match=r'no patch_embed2.proj.weight among the weights'):
        infer_arch(state)
    state = ConvMAE(**ARCHS[0]).state_dict()
    state['pos_embed'] = state['pos_embed'][:, :3]
    with pytest.raises(ValueError, match='pos_embed has 3 tokens, not a square grid'):
        infer_arch(state)


@pytest.mark.parametrize('arch', ARCHS)
def test_backbone_arch_auto_builds_the_checkpoint_architecture(arch, tmp_path):
    """``ConvMAE(arch='auto')`` takes every shape field from init_cfg's checkpoint (official {'model': ...}
    pretraining format here) and loads it with no missing key; an explicit num_heads and img_size are kept."""
    import torch
    source = ConvMAEPretrainer(**arch)
    path = str(tmp_path / 'pretrain.pth')
    torch.save({'model': source.state_dict()}, path)
    model = ConvMAE(arch='auto', num_heads=arch['num_heads'], img_size=2 * arch['img_size'],
                    init_cfg=dict(type='Pretrained', checkpoint=path))
    assert (model.patch_sizes, model.embed_dims, model.depths) == (arch['patch_sizes'], arch['embed_dims'],
                                                                   arch['depths'])
    assert model.in_channels == arch['in_channels'] and model.pos_grid == (2 * arch['img_size'] // 16,) * 2
    assert model.conv_kernel_size == arch['conv_kernel_size'] == model.blocks1[0].attn.kernel_size[0]
    assert model.init_weights() is None and model.blocks3[0].attn.num_heads == arch['num_heads']
    key = 'blocks3.0.mlp.fc1.weight'
    assert torch.equal(model.state_dict()[key], source.state_dict()[key])


def test_backbone_arch_auto_lists_every_conflict_with_the_config(tmp_path):
    import torch
    path = str(tmp_path / 'pretrain.pth')
    torch.save({'model': ConvMAEPretrainer(**ARCHS[1]).state_dict()}, path)
    with pytest.raises(ValueError, match=r'embed_dims: config \(8, 16, 96\), checkpoint \(8, 16, 128\); '
                                         r'depths: config \(2, 2, 1\), checkpoint \(2, 3, 1\)'):
        ConvMAE(arch='auto', embed_dims=(8, 16, 96), depths=(2, 2, 1), init_cfg=dict(type='Pretrained',
                                                                                  checkpoint=path))
    with pytest.raises(ValueError, match="arch='auto' reads the architecture from one init_cfg entry"):
        ConvMAE(arch='auto')


def test_arch_auto_names_a_kernel_size_conflict(tmp_path):
    import torch
    path = str(tmp_path / 'pretrain.pth')
    torch.save({'model': ConvMAEPretrainer(**ARCHS[1]).state_dict()}, path)  # 7x7 depthwise kernels
    with pytest.raises(ValueError, match=r'conv_kernel_size: config 5, checkpoint 7'):
        ConvMAE(arch='auto', conv_kernel_size=5, init_cfg=dict(type='Pretrained', checkpoint=path))


BASE = dict(patch_sizes=(4, 2, 2), embed_dims=(256, 384, 768), depths=(2, 2, 11), num_heads=12,
            mlp_ratios=(4, 4, 4))


def test_named_base_size():
    """'b'/'base' is ConvMAE-Base (official convmae_convvit_base_patch16): the checkpoint shapes give back its
    fields."""
    assert arch_settings('b') == arch_settings('base') == arch_settings('Base') == BASE
    named = ConvMAE(arch='b', img_size=32)
    inferred = infer_arch(named.state_dict(), num_heads=named.blocks3[0].attn.num_heads)
    assert {k: inferred[k] for k in BASE} == BASE and inferred['conv_kernel_size'] == 5


def test_named_demo_size_and_dicts():
    demo = ConvMAEPretrainer(arch='demo', img_size=32)
    assert (demo.embed_dims, demo.depths, demo.blocks3[0].attn.num_heads) == ((32, 64, 128), (1, 1, 3), 4)
    custom = ConvMAE(arch=dict(embed_dims=(8, 16, 32), depths=(1, 1, 1), num_heads=2), img_size=32)
    assert (custom.embed_dims, custom.depths, custom.patch_sizes, custom.mlp_ratios) == (
        (8, 16, 32), (1, 1, 1), (4, 2, 2), (4, 4, 4))
    # explicit fields replace the arch's (as a config inheriting arch='base' that sets embed_dims)
    mixed = ConvMAE(arch='base', embed_dims=(16, 32, 64), depths=(1, 1, 2), num_heads=4, img_size=32)
    assert (mixed.embed_dims, mixed.depths, mixed.mlp_ratios) == ((16, 32, 64), (1, 1, 2), (4, 4, 4))
    assert ConvMAE(img_size=32).embed_dims == BASE['embed_dims']  # no arch: ConvMAE-Base, as before


@pytest.mark.parametrize('arch, match', [
    ('large', r"unknown arch 'large'; the named sizes are \['b', 'base', 'demo'\]"),
    (dict(embed_dims=(8, 16, 32)), r"missing \['depths', 'num_heads'\]"),
    (dict(embed_dims=(8, 16, 32), depths=(1, 1, 1), num_heads=2, window=3), r"unknown \['window'\]"),
])
def test_bad_arch_names_the_choices(arch, match):
    with pytest.raises(ValueError, match=match):
        ConvMAE(arch=arch)


def test_model_arch_of_configs():
    """model_arch resolves what a config builds: the configs name their size instead of spelling it."""
    from mmengine.config import Config
    from helpers import BASE_CFG, DEMO_CFG
    base, demo = Config.fromfile(str(BASE_CFG)).model, Config.fromfile(str(DEMO_CFG)).model
    assert base.arch == 'base' and demo.arch == 'demo' and 'embed_dims' not in base and 'embed_dims' not in demo
    assert {k: model_arch(base)[k] for k in BASE} == BASE
    assert model_arch(demo)['embed_dims'] == (32, 64, 128) and model_arch(demo)['num_heads'] == 4
    assert model_arch(dict(arch='base', num_heads=4))['num_heads'] == 4
