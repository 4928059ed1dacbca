"""What the tools run: reconstruction maths of the visualiser, config discovery, export errors, the options
train/test/pretrain share (the demo: test_demo.py)."""
import os.path as osp
import shutil

import numpy as np
import pytest
import torch
from helpers import TINY_ARCH, load_tool, write_tiny_config
from mmengine.registry import MODELS
from PIL import Image

from convmae_backbone.apis import cli, visualization
from convmae_backbone.checkpoint import CheckpointError
from convmae_backbone.apis.export import export_backbone
from convmae_backbone.models.arch import model_arch


def tiny_model(norm_pix: bool = True):
    return MODELS.build(dict(type='ConvMAEPretrainer', img_size=32, norm_pix_loss=norm_pix, **TINY_ARCH,
                             data_preprocessor=dict(type='ImgDataPreprocessor', mean=[123.675, 116.28, 103.53],
                                                    std=[58.395, 57.12, 57.375]))).eval()


@pytest.mark.parametrize('norm_pix', [True, False])
def test_perfect_prediction_reconstructs_the_image(norm_pix, monkeypatch):
    model = tiny_model(norm_pix)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    real = model.forward_mae

    def perfect(x, mask=None, generator=None):  # predicts the (norm-pix) target exactly
        return real(x, mask, generator)._replace(pred=model.reconstruction_target(x))

    monkeypatch.setattr(model, 'forward_mae', perfect)
    panels = visualization.reconstruct(model, images, seed=3)
    assert panels.shape == (2, 4, 3, 32, 32) and panels.dtype == torch.uint8
    original, masked, recon, pasted = panels.unbind(1)
    assert torch.equal(original, images)
    assert (recon.int() - images.int()).abs().max() <= 1  # un-normalised with each patch's mean and variance
    assert (pasted.int() - images.int()).abs().max() <= 1
    grey_blocks = (masked == 127).all(dim=1).float().mean().item()
    assert grey_blocks == pytest.approx(0.75, abs=0.05)  # 3 of the 4 tokens of a 32x32 image
    # same seed -> same mask; another seed -> (almost surely) another one for some image
    assert torch.equal(visualization.reconstruct(model, images, seed=3)[:, 1], masked)


def test_visualiser_shows_the_complementary_views(tmp_path, monkeypatch):
    """A complementary-masking model: original, then every view's masked input and reconstruction + visible; the
    views' visible blocks tile the image; visualize() labels the 9 columns (13 with the untrained model's)."""
    model = MODELS.build(dict(type='ConvMAEPretrainer', img_size=32, **TINY_ARCH, masking='complementary',
                              data_preprocessor=dict(type='ImgDataPreprocessor', mean=[123.675, 116.28, 103.53],
                                                     std=[58.395, 57.12, 57.375]))).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    real = model.forward_mae

    def perfect(x, mask=None, generator=None):  # predicts the norm-pix target of every view exactly
        return real(x, mask, generator)._replace(pred=model.reconstruction_target(x).repeat(4, 1, 1))

    monkeypatch.setattr(model, 'forward_mae', perfect)
    panels = visualization.reconstruct(model, images, seed=3)
    assert panels.shape == (2, 9, 3, 32, 32)
    assert torch.equal(panels[:, 0], images)
    masked, pasted = panels[:, 1::2], panels[:, 2::2]
    assert (pasted.int() - images[:, None].int()).abs().max() <= 1
    visible = (masked != 127).any(dim=2)  # (B, V, H, W): pixels shown in each view
    assert (visible.sum(dim=1) == 1).all()  # one view shows each 16x16 block of a 32x32 image
    assert visualization.columns(4)[1:3] == ('view 1 masked', 'view 1 reconstruction + visible')
    monkeypatch.undo()
    ckpt = tmp_path / 'fast.pth'
    torch.save({'state_dict': model.state_dict()}, ckpt)
    img = tmp_path / 'img.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(img)
    cfg = write_tiny_config(tmp_path / 'fast.py', tmp_path, extra="model.update(masking='complementary')\n")
    width, _, caption = visualization.visualize(str(ckpt), [str(img)], str(tmp_path / 'v.png'), config=str(cfg),
                                                compare_untrained=True)
    assert width == (9 + 4) * 32 and '4 complementary views, 75% of each masked' in caption


def test_visualiser_takes_config_from_flag_never_from_files_next_to_checkpoint(tmp_path):
    model = tiny_model()
    ckpt = tmp_path / 'run' / 'plain.pth'
    ckpt.parent.mkdir()
    torch.save({'state_dict': model.state_dict()}, ckpt)  # no meta.cfg
    img = tmp_path / 'img.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(img)
    cfg = write_tiny_config(tmp_path / 'run' / 'tiny.py', tmp_path)  # a lone .py next to it is not a guess
    with pytest.raises(CheckpointError, match=r'plain\.pth stores no config .*pass --config'):
        visualization.visualize(str(ckpt), [str(img)], str(tmp_path / 'a.png'))
    assert not (tmp_path / 'a.png').exists()
    visualization.visualize(str(ckpt), [str(img)], str(tmp_path / 'b.png'), config=str(cfg), img_size=48)
    with Image.open(tmp_path / 'b.png') as png:
        assert png.size[0] == 4 * 48 and png.size[1] > visualization.label_height(48) + 48
    with pytest.raises(ValueError, match='img_size must be a multiple of 16, got 40'):
        visualization.visualize(str(ckpt), [str(img)], str(tmp_path / 'd.png'), config=str(cfg), img_size=40)
    shutil.move(str(cfg), tmp_path / 'elsewhere.py')
    visualization.visualize(str(ckpt), [str(img)], str(tmp_path / 'c.png'), config=str(tmp_path / 'elsewhere.py'))
    with Image.open(tmp_path / 'c.png') as png:
        assert png.size[0] == 4 * 32 and png.size[1] > visualization.label_height(32) + 32


def test_export_rejects_non_convmae_checkpoint(tmp_path):
    torch.save({'state_dict': {'conv.weight': torch.zeros(2, 2)}}, tmp_path / 'other.pth')
    with pytest.raises(CheckpointError, match='no ConvMAE encoder'):
        export_backbone(str(tmp_path / 'other.pth'), str(tmp_path / 'out.pth'))
    assert not (tmp_path / 'out.pth').exists()


def test_load_config_applies_the_shared_options(tmp_path):
    from convmae_backbone.apis.cli import load_config
    cfg_file = tmp_path / 'my_cfg.py'
    cfg_file.write_text("default_scope = 'mmseg'\nmodel = dict(type='X', depth=2)\n")
    cfg = load_config(str(cfg_file), {'model.depth': 5}, 'pytorch', scopes=('mmdet', 'mmseg'))
    assert cfg.model.depth == 5 and cfg.launcher == 'pytorch'
    assert cfg.work_dir == osp.join('work_dirs', 'my_cfg')
    assert load_config(str(cfg_file), work_dir='w').work_dir == 'w'
    with pytest.raises(ValueError, match=r"my_cfg.py: default_scope must be one of \('mmdet',\), got 'mmseg'"):
        load_config(str(cfg_file), scopes=('mmdet',))


def _training_config(argv, scopes=('mmengine', 'mmseg')):
    """The config a training tool accepting ``scopes`` runs for the command line ``argv``."""
    from argparse import ArgumentParser

    from convmae_backbone.apis import cli
    return cli.config_from_args(cli.parse_args(cli.add_common_args(ArgumentParser()), argv), scopes)


def test_training_options_behave_alike_for_every_scope(tmp_path, monkeypatch):
    cfg_file = tmp_path / 'seg_like.py'
    cfg_file.write_text("default_scope = 'mmseg'\n"
                        "optim_wrapper = dict(type='AmpOptimWrapper', loss_scale=512.0, optimizer=dict(lr=1.0))\n"
                        "param_scheduler = [dict(type='LinearLR', by_epoch=False, begin=0, end=5),\n"
                        "                   dict(type='CosineAnnealingLR', begin=0)]\n"
                        "train_cfg = dict(max_epochs=3)\n")
    with pytest.raises(ValueError, match=r'seg_like.py has no auto_scale_lr.base_batch_size; --auto-scale-lr'):
        _training_config([str(cfg_file), '--auto-scale-lr'])
    assert _training_config([str(cfg_file), '--amp']).optim_wrapper.type == 'BF16OptimWrapper'  # CPU: bf16
    det_file = tmp_path / 'det_like.py'
    det_file.write_text(cfg_file.read_text().replace("'mmseg'", "'mmdet'"))
    with pytest.raises(cli.ConfigError, match=r"--amp: no mixed precision available on device 'cpu' without bf16 "
                                              r"\(mmdet: mmcv's detection ops"):
        _training_config([str(det_file), '--amp'], ('mmdet',))
    with pytest.raises(ValueError, match=r'param_scheduler\[1\] \(CosineAnnealingLR\) begins at epoch 3 but '
                                         r'train_cfg.max_epochs is 3'):
        _training_config([str(cfg_file), '--cfg-options', 'param_scheduler.1.begin=3'])
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)  # only the config is built, nothing runs
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)  # asked by the logger of the warning
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: False)  # a pre-Ampere GPU: fp16
    cfg = _training_config([str(cfg_file), '--amp', '--resume', '--cfg-options', 'train_cfg.max_epochs=9'])
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper' and cfg.optim_wrapper.loss_scale == 512.0  # kept
    assert cfg.resume is True and cfg.load_from is None and cfg.train_cfg.max_epochs == 9


def test_downstream_configs_take_the_training_options():
    from helpers import BASE_CFG

    from convmae_backbone.apis.cli import DOWNSTREAM_SCOPES
    from convmae_backbone.testing import DET_CONFIG, SEG_CONFIG
    cfg = _training_config([DET_CONFIG, '--auto-scale-lr', '--resume', 'x/epoch_3.pth'], DOWNSTREAM_SCOPES)
    assert cfg.auto_scale_lr == dict(enable=True, base_batch_size=32) and cfg.load_from == 'x/epoch_3.pth'
    with pytest.raises(ValueError, match=osp.basename(SEG_CONFIG) + ' has no auto_scale_lr.base_batch_size'):
        _training_config([SEG_CONFIG, '--auto-scale-lr'], DOWNSTREAM_SCOPES)
    with pytest.raises(ValueError,
                       match=r"default_scope must be one of \('mmdet', 'mmseg', 'mmpretrain'\), got 'mmengine'"):
        _training_config([str(BASE_CFG)], DOWNSTREAM_SCOPES)


def test_build_runner_takes_runner_type_from_the_scope_registry(tmp_path):
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    from convmae_backbone.apis.cli import build_runner, load_config

    class MarkedRunner(Runner):
        pass

    RUNNERS.register_module(module=MarkedRunner, force=True)
    cfg_file = tmp_path / 'runner.py'
    cfg_file.write_text(f"default_scope = 'mmengine'\nmodel = dict(type='ConvMAEPretrainer', img_size=32, "
                        f"**{TINY_ARCH!r})\n")
    cfg = load_config(str(cfg_file), work_dir=str(tmp_path / 'work'))
    assert type(build_runner(cfg)) is Runner
    cfg.runner_type = 'MarkedRunner'
    assert type(build_runner(cfg)) is MarkedRunner


def test_tool_command_lines(tmp_path):
    """The tools are the package's functions behind the command line: the shared options, tool by tool."""
    import subprocess
    import sys

    from helpers import ROOT

    def usage(tool: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / 'tools' / tool), *args], capture_output=True,
                              text=True, timeout=120)

    train, test = usage('train.py', '--help').stdout, usage('test.py', '--help').stdout
    for option in ('--work-dir', '--cfg-options', '--launcher', '--local-rank'):
        assert option in train and option in test
    for option in ('--amp', '--auto-scale-lr', '--resume [CKPT]'):
        assert option in train and option not in test
    assert 'checkpoint' in test and '--show-dir' in test
    torch.save({'state_dict': {'conv.weight': torch.zeros(2, 2)}}, tmp_path / 'other.pth')
    failed = usage('export_backbone.py', str(tmp_path / 'other.pth'), str(tmp_path / 'out.pth'))
    assert failed.returncode != 0 and 'holds no ConvMAE encoder' in failed.stderr


def test_demo_reads_the_backbone_architecture_of_a_checkpoint(tmp_path, capsys):
    from mmengine.config import Config

    from convmae_backbone.testing import DEMO_CONFIG
    checkpoint_arch = load_tool('demo').checkpoint_arch
    from convmae_backbone.apis.export import encoder_state_dict
    demo_model = model_arch(Config.fromfile(DEMO_CONFIG).model)  # arch='demo' resolved
    arch = {k: demo_model[k] for k in ('img_size', 'embed_dims', 'depths', 'num_heads', 'mlp_ratios')}
    state = MODELS.build(dict(type='ConvMAEPretrainer', **arch, decoder_embed_dim=32, decoder_depth=1,
                              decoder_num_heads=1)).state_dict()
    expected = dict(arch, in_channels=3, patch_sizes=(4, 2, 2), conv_kernel_size=5)
    torch.save(encoder_state_dict(state), tmp_path / 'exported.pth')  # no config: the demo config's heads
    assert checkpoint_arch(str(tmp_path / 'exported.pth')) == expected and arch['num_heads'] == 4
    assert checkpoint_arch(str(tmp_path / 'exported.pth'), num_heads=8)['num_heads'] == 8
    meta = dict(cfg="model = dict(type='ConvMAEPretrainer', num_heads=2, decoder_num_heads=16)\n")
    torch.save(dict(meta=meta, state_dict=state), tmp_path / 'run.pth')  # the config the run recorded
    assert checkpoint_arch(str(tmp_path / 'run.pth')) == dict(expected, num_heads=2)
    torch.save(encoder_state_dict(tiny_model().state_dict()), tmp_path / 'unknown.pth')
    assert checkpoint_arch(str(tmp_path / 'unknown.pth'))['num_heads'] == 1  # 64-channel heads of 96
    assert 'number of heads not recorded' in capsys.readouterr().out
