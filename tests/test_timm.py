"""The encoder in timm: registered names, ``features_only`` maps equal to the backbone's, and checkpoints (ours and
the official formats) loaded through the backbone's adaptation via ``pretrained_cfg_overlay=dict(file=...)``."""
import pytest
import timm
import torch

from convmae_backbone import ConvMAE, ConvMAEPretrainer
from convmae_backbone.models.timm_model import TimmConvMAE
from convmae_backbone.models.utils import resize_pos_embed
from convmae_backbone.testing import TINY_DECODER, TINY_ENCODER


def create(tag: str, path: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(f'convmae_base.{tag}', pretrained=True, pretrained_cfg_overlay=dict(file=path),
                             **TINY_ENCODER, **kwargs).eval()


def backbone_from(path: str, **kwargs) -> ConvMAE:
    model = ConvMAE(**TINY_ENCODER, init_cfg=dict(type='Pretrained', checkpoint=path), **kwargs)
    model.init_weights()
    return model.eval()


def test_names_and_default_architecture():
    assert timm.list_models('convmae*') == ['convmae_base']
    assert timm.list_models('convmae*', include_tags=True) == ['convmae_base.ft_in1k', 'convmae_base.mae_in1k']
    model = timm.create_model('convmae_base')
    assert isinstance(model, TimmConvMAE) and model.num_classes == 1000
    assert (model.embed_dims, model.depths, model.blocks3[0].attn.num_heads) == ((256, 384, 768), (2, 2, 11), 12)
    assert timm.create_model('convmae_base.mae_in1k').num_classes == 0
    with pytest.raises(RuntimeError, match='No pretrained weights'):  # the official files are not downloaded
        timm.create_model('convmae_base', pretrained=True)


def test_features_only_from_our_pretraining_checkpoint(tmp_path):
    """An mmengine pretraining checkpoint: decoder skipped, maps equal to the ConvMAE backbone's at any size."""
    torch.manual_seed(0)
    path = str(tmp_path / 'epoch_1.pth')
    torch.save({'state_dict': ConvMAEPretrainer(img_size=64, **TINY_ENCODER, **TINY_DECODER).state_dict(),
                'meta': {'epoch': 1}}, path)
    features = create('mae_in1k', path, img_size=64, features_only=True)
    assert features.feature_info.channels() == list(TINY_ENCODER['embed_dims'])
    assert features.feature_info.reduction() == [4, 8, 16]
    reference = backbone_from(path, img_size=64, out_indices=(0, 1, 2))
    x = torch.randn(2, 3, 50, 70)
    with torch.no_grad():
        got, expected = features(x), reference(x)
    assert [tuple(m.shape) for m in got] == [(2, 32, 13, 18), (2, 48, 7, 9), (2, 96, 4, 5)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    last = create('mae_in1k', path, img_size=64, features_only=True, out_indices=(2,))
    with torch.no_grad():
        assert torch.equal(last(x)[0], expected[2])


def test_official_checkpoint_resized_to_another_grid(tmp_path, official, small_arch):
    """The official pretraining format ({'model': ...}, 224 grid) into a 64-pixel model: position embedding
    resized as the backbone does it."""
    path = str(tmp_path / 'official.pth')
    state = official['state_dict']
    torch.save({'model': state, 'epoch': 1599}, path)
    model = timm.create_model('convmae_base.mae_in1k', pretrained=True, pretrained_cfg_overlay=dict(file=path),
                              img_size=64, **small_arch).eval()
    side = int(state['pos_embed'].shape[1] ** 0.5)
    expected = resize_pos_embed(state['pos_embed'], (side, side), (4, 4)).to(model.pos_embed.dtype)
    assert torch.equal(model.pos_embed, expected)
    assert torch.equal(model.blocks3[0].attn.qkv.weight, state['blocks3.0.attn.qkv.weight'].float())
    features = timm.create_model('convmae_base', pretrained=True, pretrained_cfg_overlay=dict(file=path),
                                 img_size=64, features_only=True, **small_arch).eval()
    reference = ConvMAE(img_size=64, **small_arch, init_cfg=dict(type='Pretrained', checkpoint=path))
    reference.init_weights()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(features(x), reference.eval()(x)))


def test_official_fine_tuned_format_loads_with_its_head(tmp_path):
    """A fine-tuned classifier ({'model': encoder + fc_norm + head}) loads whole; logits = head(fc_norm(mean))."""
    torch.manual_seed(1)
    source = TimmConvMAE(img_size=64, num_classes=10, **TINY_ENCODER)
    with torch.no_grad():
        source.fc_norm.weight.normal_()
    path = str(tmp_path / 'finetuned.pth')
    torch.save({'model': source.state_dict()}, path)
    model = create('ft_in1k', path, img_size=64, num_classes=10)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        pooled = backbone_from(path, img_size=64, out_type='avg_featmap')(x)[0]
    assert logits.shape == (2, 10)
    torch.testing.assert_close(logits, model.head(pooled), rtol=0, atol=1e-6)
    with pytest.raises(Exception, match='shape mismatch for head.weight'):
        create('ft_in1k', path, img_size=64, num_classes=5)
