"""Parity with outputs recorded from the official ConvMAE code (tests/fixtures/README.md)."""
import pytest
import torch

from convmae_backbone import ConvMAEPretrainer
from conftest import max_rel_err


@pytest.mark.parametrize('norm_pix', [True, False])
def test_pretrainer_matches_official(official, small_arch, small_decoder, norm_pix):
    tag = 'norm_pix' if norm_pix else 'raw'
    model = ConvMAEPretrainer(**small_arch, **small_decoder, norm_pix_loss=norm_pix)
    model.load_state_dict(official['state_dict'], strict=True)
    model = model.double()
    imgs, mask = official['images'].double(), official['mask']
    loss, pred, out_mask = model.forward_mae(imgs, mask)
    assert torch.equal(out_mask, mask)
    assert max_rel_err(loss, official[f'loss_{tag}']) < 1e-6
    assert max_rel_err(pred, official['pred']) < 1e-6
    loss.backward()
    params = dict(model.named_parameters())
    for name, ref in official[f'grads_{tag}'].items():
        assert max_rel_err(params[name].grad, ref) < 1e-6, name
    with torch.no_grad():
        latent = model.forward_encoder(imgs, mask, (14, 14))
    assert max_rel_err(latent, official[f'latent_{tag}']) < 1e-6
