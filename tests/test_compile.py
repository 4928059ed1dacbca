"""torch.compile: the pretraining forward and the backbone trace into one graph (masks do not break it), and
mmengine's ``compile=True`` pretraining run works and matches the eager run."""
import numpy as np
import pytest
import torch

from convmae_backbone import ConvMAE, ConvMAEPretrainer
from convmae_backbone.apis import cli
from convmae_backbone.models.masking import random_mask
from conftest import max_rel_err
from convmae_backbone.testing import TINY_DECODER, TINY_ENCODER
from helpers import make_images, write_tiny_config


@pytest.mark.parametrize('sparse', [True, False])
def test_pretraining_forward_is_one_graph_without_recompilation(sparse):
    torch._dynamo.reset()
    model = ConvMAEPretrainer(img_size=64, **TINY_ENCODER, **TINY_DECODER, sparse=sparse)
    compiled = torch.compile(lambda x, m: model.forward_mae(x, m, from_ratio=True), backend='eager', fullgraph=True)
    x = torch.randn(2, 3, 64, 64)
    with torch._dynamo.config.patch(error_on_recompile=True):  # new masks, same shapes: no recompilation
        for seed in range(3):
            mask = random_mask(2, 16, 0.75, generator=torch.Generator().manual_seed(seed))
            got = compiled(x, mask)
            loss, pred = got.loss, got.pred
            out = model.forward_mae(x, mask)
            ref_loss, ref_pred = out.loss, out.pred
            assert torch.allclose(loss, ref_loss, rtol=1e-5) and max_rel_err(pred, ref_pred) < 1e-5
    bad = mask.clone()
    bad[0, bad[0].nonzero()[0]] = False  # one more visible token in the first image
    with pytest.raises(RuntimeError, match='exactly 4 of 16 tokens visible'):
        compiled(x, bad)


def test_backbone_with_windows_and_rel_pos_is_one_graph():
    torch._dynamo.reset()
    model = ConvMAE(img_size=128, **TINY_ENCODER, window_size=4, global_attn_indexes=(1,), use_rel_pos_bias=True,
                    out_indices=(0, 1, 2, 3)).eval()
    compiled = torch.compile(model, backend='eager', fullgraph=True)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        for out, ref in zip(compiled(x), model(x)):
            assert out.shape == ref.shape and max_rel_err(out, ref) < 1e-5


def test_runner_compile_true_matches_eager(tmp_path):
    cfg = write_tiny_config(tmp_path / 'tiny.py', make_images(tmp_path / 'data'), max_epochs=2)
    losses = {}
    for name, extra in (('eager', []), ('compiled', ['compile=True'])):
        runner = cli.pretrain([str(cfg), '--work-dir', str(tmp_path / name), '--cfg-options',
                                f'experiment_name=compile_{name}', *extra])
        losses[name] = np.asarray(runner.message_hub.get_scalar('train/loss').data[0])
    assert len(losses['compiled']) == 4 and np.isfinite(losses['compiled']).all()
    np.testing.assert_allclose(losses['compiled'], losses['eager'], rtol=1e-3)
