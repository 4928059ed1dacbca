"""Pretraining (tools/pretrain.py, i.e. convmae_backbone.apis.cli) on mmengine's Runner: configs, command-line
options, overrides, a short run, export and reload of the backbone, its reconstructions."""
from argparse import ArgumentParser

import numpy as np
import pytest
import torch
from helpers import BASE_CFG, DEMO_CFG, TINY_ARCH, make_images, write_tiny_config
from mmengine.config import Config
from mmengine.registry import MODELS
from PIL import Image

from convmae_backbone.apis import cli
from convmae_backbone.checkpoint import safe_torch_load
from convmae_backbone.apis.export import export_backbone
from convmae_backbone.apis.visualization import label_height, visualize


def pretrain_config(argv):
    """The config tools/pretrain.py runs for the command line ``argv``."""
    args = cli.parse_args(cli.add_common_args(ArgumentParser()), argv)
    return cli.config_from_args(args, cli.PRETRAIN_SCOPES)


def test_base_config_builds_convmae_base():
    cfg = Config.fromfile(str(BASE_CFG))
    assert cfg.train_dataloader.batch_size == 128 and cfg.train_cfg.max_epochs == 1600
    assert cfg.optim_wrapper.optimizer.lr == pytest.approx(6e-4)  # 1.5e-4 * 1024 / 256
    assert cfg.optim_wrapper.optimizer.betas == (0.9, 0.95)
    model = MODELS.build(cfg.model)
    assert type(model).__name__ == 'ConvMAEPretrainer'
    assert model.pos_embed.shape == (1, 196, 768)
    assert (len(model.blocks1), len(model.blocks2), len(model.blocks3)) == (2, 2, 11)
    assert len(model.decoder_blocks) == 8 and model.decoder_pred.out_features == 768
    assert model.mask_token.shape == (1, 1, 512) and model.mask_ratio == 0.75 and model.norm_pix_loss
    assert model.data_preprocessor.mean.flatten().tolist() == pytest.approx([123.675, 116.28, 103.53])


def test_cli_options_resume_amp(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    cfg = pretrain_config([str(BASE_CFG), '--amp'])
    assert cfg.optim_wrapper.type == 'BF16OptimWrapper' and 'loss_scale' not in cfg.optim_wrapper  # CPU: bf16
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)  # only the config is built, nothing runs
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: False)  # a pre-Ampere GPU: fp16
    cfg = pretrain_config([str(BASE_CFG), '--amp', '--resume'])
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper' and cfg.optim_wrapper.loss_scale == 'dynamic'
    assert cfg.optim_wrapper.dtype == 'float16'
    assert cfg.resume is True and cfg.load_from is None
    with pytest.raises(ValueError, match=r'begins at epoch 40 but train_cfg.max_epochs is 30'):
        pretrain_config([str(BASE_CFG), '--cfg-options', 'train_cfg.max_epochs=30'])
    assert cfg.work_dir.endswith('convmae-b_8xb128-1600e_in1k')
    cfg = pretrain_config([str(BASE_CFG), '--resume', 'x/epoch_3.pth', '--work-dir', 'w', '--auto-scale-lr'])
    assert cfg.resume is True and cfg.load_from == 'x/epoch_3.pth' and cfg.work_dir == 'w'
    assert cfg.auto_scale_lr.enable is True and cfg.optim_wrapper.type == 'OptimWrapper'


def test_overrides_apply_and_schedulers_follow_max_epochs(tmp_path):
    from mmengine.runner import Runner
    make_images(tmp_path / 'data', n=6)
    cfg = pretrain_config([
        str(BASE_CFG), '--work-dir', str(tmp_path / 'work'), '--cfg-options',
        f'train_dataloader.dataset.data_root={tmp_path / "data"}', 'train_dataloader.batch_size=2',
        'train_dataloader.num_workers=0', 'train_dataloader.persistent_workers=False', 'train_cfg.max_epochs=50',
        'model.img_size=32', 'model.embed_dims=[32,48,96]', 'model.depths=[1,1,2]', 'model.num_heads=4',
        'model.decoder_embed_dim=64', 'model.decoder_depth=1', 'model.decoder_num_heads=4', 'model.mask_ratio=0.5',
        'experiment_name=overrides'])
    runner = Runner.from_cfg(cfg)
    assert runner.model.embed_dims == (32, 48, 96) and len(runner.model.blocks3) == 2
    assert runner.model.mask_ratio == 0.5
    assert runner.train_dataloader.batch_size == 2 and len(runner.train_dataloader) == 3
    assert runner.max_epochs == 50 and runner.max_iters == 150
    runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
    warmup, cosine = runner.build_param_scheduler(runner.param_schedulers)
    assert (warmup.begin, warmup.end) == (0, 40 * 3)  # 40 warm-up epochs, converted to iterations
    assert (cosine.begin, cosine.end, cosine.T_max) == (40 * 3, 50 * 3, 10 * 3)  # follows max_epochs
    groups = {id(p): g['weight_decay'] for g in runner.optim_wrapper.optimizer.param_groups for p in g['params']}
    named = dict(runner.model.named_parameters())
    assert groups[id(named['blocks3.0.attn.qkv.weight'])] == 0.05
    for no_decay in ('blocks3.0.norm1.weight', 'blocks3.0.attn.qkv.bias', 'mask_token'):
        assert groups[id(named[no_decay])] == 0.0, no_decay
    assert id(named['pos_embed']) not in groups  # fixed sin-cos embedding: not optimised at all
    optimizer = runner.optim_wrapper.optimizer
    assert type(optimizer).__name__ == 'AdamW' and optimizer.defaults['fused'] is True  # single-kernel update


def test_short_run_checkpoint_export_and_backbone_load(tmp_path):
    from convmae_backbone import ConvMAE
    cfg = write_tiny_config(tmp_path / 'tiny.py', make_images(tmp_path / 'data'), max_epochs=2)
    work = tmp_path / 'work'
    runner = cli.pretrain([str(cfg), '--work-dir', str(work), '--cfg-options', 'experiment_name=short_run'])
    losses = runner.message_hub.get_scalar('train/loss').data[0]
    assert len(losses) == 4 and np.isfinite(losses).all() and losses.min() > 0  # 2 epochs x 2 iterations
    assert (work / 'last_checkpoint').read_text().strip() == str(work / 'epoch_2.pth')
    ckpt = safe_torch_load(work / 'epoch_2.pth')
    assert ckpt['meta']['epoch'] == 2 and ckpt['meta']['iter'] == 4
    state = ckpt['state_dict']

    export_backbone(str(work / 'epoch_2.pth'), str(tmp_path / 'backbone.pth'))
    exported = torch.load(tmp_path / 'backbone.pth', weights_only=True)
    assert sorted({k.split('.')[0] for k in exported}) == ['blocks1', 'blocks2', 'blocks3', 'patch_embed1',
                                                           'patch_embed2', 'patch_embed3', 'patch_embed4',
                                                           'pos_embed']
    backbone = ConvMAE(img_size=32, embed_dims=(32, 48, 96), depths=(1, 1, 2), num_heads=4,
                       init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'backbone.pth')))
    fresh = backbone.blocks3[1].mlp.fc1.weight.detach().clone()
    backbone.init_weights()
    for key in ('patch_embed1.proj.weight', 'blocks3.1.mlp.fc1.weight', 'blocks2.0.conv1.weight', 'pos_embed'):
        if key in state:
            assert torch.equal(backbone.state_dict()[key], state[key]), key
    assert not torch.equal(fresh, backbone.blocks3[1].mlp.fc1.weight)  # really loaded

    export_backbone(str(work / 'epoch_2.pth'), str(tmp_path / 'official.pth'), official=True)
    official = torch.load(tmp_path / 'official.pth', weights_only=True)
    assert set(official) == {'model'} and set(official['model']) == set(state)
    pretrainer = MODELS.build(dict(type='ConvMAEPretrainer', img_size=32, **TINY_ARCH))
    pretrainer.load_state_dict(official['model'], strict=True)
    assert torch.equal(pretrainer.decoder_pred.weight, state['decoder_pred.weight'])

    images = sorted((tmp_path / 'data').rglob('*.jpg'))[:3]
    out = tmp_path / 'rec.png'
    width, height, caption = visualize(str(work / 'epoch_2.pth'), list(map(str, images)), str(out), scale=2)
    top = label_height(64)  # the band of column labels
    assert width == 4 * 32 * 2 and height > top + 3 * 32 * 2 and 'masked patches: trained' in caption
    with Image.open(out) as png:
        assert png.size == (width, height)
        grid = np.asarray(png.convert('RGB'))
    first_row = grid[top:top + 64]
    original, masked, _, pasted = (first_row[:, i * 64:(i + 1) * 64] for i in range(4))
    grey = (masked == 127).all(axis=-1)
    assert 0.6 < grey.mean() < 0.9  # 75 % of the blocks are masked
    assert np.array_equal(pasted[~grey], original[~grey])  # visible blocks pasted back unchanged


def test_demo_config_inherits_base():
    cfg = Config.fromfile(str(DEMO_CFG))
    assert cfg.model.type == 'ConvMAEPretrainer' and cfg.model.img_size % 16 == 0
    assert cfg.model.norm_pix_loss and cfg.model.mask_ratio == 0.75
    assert cfg.optim_wrapper.optimizer.betas == (0.9, 0.95)
    assert cfg.default_hooks.checkpoint.type == 'AtomicCheckpointHook'
    assert {h['type'] for h in cfg.custom_hooks} == {'NonFiniteLossHook', 'ReseedHook', 'PlainParamGroupsHook',
                                                     'ReconstructionMonitorHook'}
    crop = next(t for t in cfg.train_dataloader.dataset.pipeline if t.type.endswith('RandomResizedCrop'))
    assert crop.size == cfg.model.img_size
    model = MODELS.build(cfg.model)
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
