"""The pretrainer's API: keys, masking, any grid, losses, input validation (parity is in test_sparse.py)."""
import pytest
import torch

from convmae_backbone import BlockMask, ConvMAEPretrainer
from convmae_backbone.models.masking import random_mask, upsample_mask
from convmae_backbone.models.utils import get_2d_sincos_pos_embed, patchify, unpatchify


@pytest.fixture
def model(small_arch, small_decoder, official):
    m = ConvMAEPretrainer(**small_arch, **small_decoder)
    m.load_state_dict(official['state_dict'], strict=True)
    return m.double()


def test_state_dict_keys_equal_official(model, official):
    assert list(model.state_dict().keys()) == list(official['state_dict'].keys()) or \
        set(model.state_dict()) == set(official['state_dict'])


@pytest.mark.parametrize('ratio, length', [(0.75, 196), (0.5, 24), (0.6, 50)])
def test_random_mask_has_exact_visible_count(ratio, length):
    mask = random_mask(5, length, ratio)
    assert mask.dtype == torch.bool and mask.shape == (5, length)
    assert ((~mask).sum(1) == int(length * (1 - ratio))).all()
    assert not all(torch.equal(mask[0], m) for m in mask[1:])  # drawn per image


def test_forward_mae_draws_a_mask_per_image(model):
    out = model.forward_mae(torch.randn(3, 3, 64, 96, dtype=torch.float64))
    loss, pred, mask = out.loss, out.pred, out.mask
    assert mask.shape == (3, 24) and ((~mask).sum(1) == 6).all()
    assert pred.shape == (3, 24, 768) and loss.ndim == 0


def test_upsampled_masks_repeat_the_h16_mask():
    mask = random_mask(2, 12, 0.75).reshape(2, 12)
    up4 = upsample_mask(mask, (3, 4), 4)
    assert up4.shape == (2, 1, 12, 16)
    for i in range(3):
        for j in range(4):
            block = up4[:, 0, 4 * i:4 * i + 4, 4 * j:4 * j + 4]
            assert (block == mask[:, i * 4 + j, None, None]).all()
    up2 = upsample_mask(mask, (3, 4), 2)
    assert torch.equal(up2, up4[:, :, ::2, ::2])


def test_masked_pixels_do_not_change_pred(model, official):
    imgs, mask = official['images'].double(), official['mask']
    out = model.forward_mae(imgs, mask)
    pred = out.pred
    pixel_mask = upsample_mask(mask, (14, 14), 16).expand_as(imgs)
    changed = torch.where(pixel_mask, torch.randn_like(imgs) * 10, imgs)
    out = model.forward_mae(changed, mask)
    pred2 = out.pred
    assert torch.equal(pred, pred2)
    visible_changed = torch.where(pixel_mask, imgs, imgs + 1)
    out = model.forward_mae(visible_changed, mask)
    pred3 = out.pred
    assert not torch.allclose(pred, pred3)


def test_non_224_grid_uses_sincos_of_the_actual_grid(model):
    seen = {}
    model.blocks3[0].register_forward_pre_hook(lambda m, args: seen.setdefault('x', args[0]))
    imgs = torch.randn(1, 3, 80, 48, dtype=torch.float64)
    mask = torch.zeros(1, 15, dtype=torch.bool)
    mask[0, 5:] = True
    out = model.forward_mae(imgs, mask)
    pred = out.pred
    assert pred.shape == (1, 15, 768)
    dense = BlockMask(mask, (5, 3))  # the dense path over the whole masked image
    s2 = model.conv_stage(2, model.conv_stage(1, imgs.permute(0, 2, 3, 1), dense), dense)
    tokens = model.patch_embed4(model.patch_embed3(s2).flatten(1, 2))
    pos = get_2d_sincos_pos_embed(96, (5, 3))
    torch.testing.assert_close(seen['x'][0], (tokens + pos)[0, :5])


def test_patchify_roundtrip_and_order():
    imgs = torch.randn(2, 3, 32, 48)
    x = patchify(imgs, 16)
    assert x.shape == (2, 6, 768)
    assert torch.equal(unpatchify(x, (2, 3), 16), imgs)
    # patch (0, 1), pixel (row 2, col 5), channel 1
    assert x[0, 1, (2 * 16 + 5) * 3 + 1] == imgs[0, 1, 2, 16 + 5]


@pytest.mark.parametrize('loss_type', ['mse', 'l1'])
@pytest.mark.parametrize('norm_pix', [True, False])
def test_loss_types(small_arch, small_decoder, official, loss_type, norm_pix):
    m = ConvMAEPretrainer(**small_arch, **small_decoder, loss_type=loss_type, norm_pix_loss=norm_pix).double()
    m.load_state_dict(official['state_dict'])
    imgs, mask = official['images'].double(), official['mask']
    out = m.forward_mae(imgs, mask)
    loss, pred = out.loss, out.pred
    target = patchify(imgs, 16)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    err = (pred - target).abs() if loss_type == 'l1' else (pred - target) ** 2
    expected = err.mean(-1)[mask].mean()
    torch.testing.assert_close(loss, expected)


def test_mmengine_forward_modes(model):
    imgs = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = model(imgs, mode='loss')
    assert set(out) == {'loss_rec'} and out['loss_rec'].requires_grad
    pred, mask = model(imgs, mode='tensor')
    assert pred.shape == (2, 4, 768) and mask.shape == (2, 4)
    with pytest.raises(ValueError, match='mode'):
        model(imgs, mode='bogus')


@pytest.mark.parametrize('shape, mask, match', [
    ((1, 3, 40, 32), None, 'multiples of 16'),
    ((1, 3, 32, 32, 1), None, r'\(B, 3, H, W\)'),
    ((2, 3, 32, 32), torch.zeros(2, 5, dtype=torch.bool), r'mask must have shape \(B, L\) = \(2, 4\)'),
    ((2, 3, 32, 32), torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool), 'same, non-zero number'),
    ((1, 3, 32, 32), torch.ones(1, 4, dtype=torch.bool), 'same, non-zero number'),
])
def test_bad_input_raises_value_error(model, shape, mask, match):
    with pytest.raises(ValueError, match=match):
        model.forward_mae(torch.randn(*shape, dtype=torch.float64), mask)


def test_bad_arguments(small_arch):
    with pytest.raises(ValueError, match='loss_type'):
        ConvMAEPretrainer(**small_arch, loss_type='huber')
    with pytest.raises(ValueError, match='mask_ratio'):
        ConvMAEPretrainer(**small_arch, mask_ratio=1.0)
