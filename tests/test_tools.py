"""tools/: reconstruction maths of the visualiser, config discovery, export errors, the demo end to end."""
import os.path as osp
import shutil

import numpy as np
import pytest
import torch
from mmengine.registry import MODELS
from PIL import Image

from convmae_backbone.checkpoint import CheckpointError
from test_pretrain_runner import TINY_ARCH, load_tool, write_tiny_config


def tiny_model(norm_pix: bool = True):
    return MODELS.build(dict(type='ConvMAEPretrainer', img_size=32, norm_pix_loss=norm_pix, **TINY_ARCH,
                             data_preprocessor=dict(type='ImgDataPreprocessor', mean=[123.675, 116.28, 103.53],
                                                    std=[58.395, 57.12, 57.375]))).eval()


@pytest.mark.parametrize('norm_pix', [True, False])
def test_perfect_prediction_reconstructs_the_image(norm_pix, monkeypatch):
    vis = load_tool('visualize_reconstruction')
    model = tiny_model(norm_pix)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    real = model.forward_mae

    def perfect(x, mask=None, generator=None):  # predicts the (norm-pix) target exactly
        loss, _, mask = real(x, mask, generator)
        return loss, model.reconstruction_target(x), mask

    monkeypatch.setattr(model, 'forward_mae', perfect)
    panels = vis.reconstruct(model, images, seed=3)
    assert panels.shape == (2, 4, 3, 32, 32) and panels.dtype == torch.uint8
    original, masked, recon, pasted = panels.unbind(1)
    assert torch.equal(original, images)
    assert (recon.int() - images.int()).abs().max() <= 1  # un-normalised with each patch's mean and variance
    assert (pasted.int() - images.int()).abs().max() <= 1
    grey_blocks = (masked == 127).all(dim=1).float().mean().item()
    assert grey_blocks == pytest.approx(0.75, abs=0.05)  # 3 of the 4 tokens of a 32x32 image
    # same seed -> same mask; another seed -> (almost surely) another one for some image
    assert torch.equal(vis.reconstruct(model, images, seed=3)[:, 1], masked)


def test_visualiser_finds_config_next_to_checkpoint_or_flag(tmp_path):
    vis = load_tool('visualize_reconstruction')
    model = tiny_model()
    ckpt = tmp_path / 'run' / 'plain.pth'
    ckpt.parent.mkdir()
    torch.save({'state_dict': model.state_dict()}, ckpt)  # no meta.cfg
    img = tmp_path / 'img.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(img)
    with pytest.raises(CheckpointError, match='pass --config'):
        vis.main([str(ckpt), str(img), '--out', str(tmp_path / 'a.png')])
    cfg = write_tiny_config(tmp_path / 'run' / 'tiny.py', tmp_path)
    vis.main([str(ckpt), str(img), '--out', str(tmp_path / 'b.png'), '--img-size', '48'])  # the .py next to it
    with Image.open(tmp_path / 'b.png') as png:
        assert png.size == (4 * 48, 48)
    shutil.move(str(cfg), tmp_path / 'elsewhere.py')
    vis.main([str(ckpt), str(img), '--out', str(tmp_path / 'c.png'), '--config', str(tmp_path / 'elsewhere.py')])
    with Image.open(tmp_path / 'c.png') as png:
        assert png.size == (4 * 32, 32)


def test_export_rejects_non_convmae_checkpoint(tmp_path):
    export = load_tool('export_backbone')
    torch.save({'state_dict': {'conv.weight': torch.zeros(2, 2)}}, tmp_path / 'other.pth')
    with pytest.raises(CheckpointError, match='no ConvMAE encoder'):
        export.main([str(tmp_path / 'other.pth'), str(tmp_path / 'out.pth')])
    assert not (tmp_path / 'out.pth').exists()


def test_demo_end_to_end_small(tmp_path, capfd):
    demo = load_tool('demo')
    fake = tmp_path / 'fake_finetune.py'
    fake.write_text('import sys\nprint("FINETUNE ARGS", sys.argv[1:])\n')
    out = tmp_path / 'demo'
    rc = demo.main(['--out-dir', str(out), '--epochs', '3', '--views', '3', '--finetune-script', str(fake)])
    assert rc == 0
    printed = capfd.readouterr().out
    assert 'loss first' in printed and str(out / 'reconstruction.png') in printed
    with Image.open(out / 'reconstruction.png') as png:
        assert png.size == (4 * 64 * 4, 4 * 64 * 4)  # 4 photos, 64x64 demo input, scaled 4x
    state = torch.load(out / 'convmae_demo_backbone.pth', weights_only=True)
    assert 'blocks3.0.attn.qkv.weight' in state and 'decoder_pred.weight' not in state
    assert (out / 'pretrain' / 'epoch_3.pth').exists()
    # the fine-tuning script ran as a subprocess with the exported backbone, its output passed through
    backbone, finetune_dir = str(out / 'convmae_demo_backbone.pth'), str(out / 'finetune')
    assert f"FINETUNE ARGS ['--backbone', {backbone!r}, '--work-dir', {finetune_dir!r}]" in printed
    assert printed.rstrip().endswith(f'fine-tuning: exit code 0, outputs under {finetune_dir}')


def test_load_config_applies_the_shared_options(tmp_path):
    from convmae_backbone.cli import load_config
    cfg_file = tmp_path / 'my_cfg.py'
    cfg_file.write_text("default_scope = 'mmseg'\nmodel = dict(type='X', depth=2)\n")
    cfg = load_config(str(cfg_file), {'model.depth': 5}, 'pytorch', scopes=('mmdet', 'mmseg'))
    assert cfg.model.depth == 5 and cfg.launcher == 'pytorch'
    assert cfg.work_dir == osp.join('work_dirs', 'my_cfg')
    assert load_config(str(cfg_file), work_dir='w').work_dir == 'w'
    with pytest.raises(ValueError, match=r"my_cfg.py: default_scope must be one of \('mmdet',\), got 'mmseg'"):
        load_config(str(cfg_file), scopes=('mmdet',))
