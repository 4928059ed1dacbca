"""Image classification on mmpretrain: parity of the fine-tuning model with the official ``ConvViT``
(``models_convvit.py``, global pool), the official fine-tuning and linear-probing recipes carried value by value
by the two configs, and both run end to end (mmpretrain's own train tool and this project's tools, ``--resume``,
evaluation) on a tiny generated image folder."""
import importlib
import os
import os.path as osp
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from PIL import Image

import convmae_backbone  # noqa: F401
from conftest import max_rel_err
from convmae_backbone import ConvMAEPretrainer
from convmae_backbone.checkpoint import safe_torch_load
from convmae_backbone.apis.convert import convert
from convmae_backbone.testing import TINY_ENCODER
from mmpretrain.registry import MODELS, OPTIM_WRAPPERS

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
FT_CONFIG = osp.join(REPO, 'configs', 'mmpretrain', 'convmae-b_8xb128-100e_in1k.py')
LIN_CONFIG = osp.join(REPO, 'configs', 'mmpretrain', 'convmae-b_linear-8xb2048-90e_in1k.py')
FIXTURE = Path(__file__).parent / 'fixtures' / 'official_downstream_small.pt'
NUM_CLASSES = 5


def build_classifier(model_cfg):
    """mmpretrain's model of a config, in mmpretrain's scope (whatever scope an earlier Runner left current)."""
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(model_cfg)


def shrink(cfg: Config, embed_dims, depths, num_heads, num_classes: int, img_size: int,
           mlp_ratios=None) -> Config:
    """Resize the model of a classification config through ``model.backbone`` and ``model.head`` only."""
    cfg.model.backbone.update(embed_dims=tuple(embed_dims), depths=tuple(depths), num_heads=num_heads,
                              drop_path_rate=0.0, img_size=img_size)
    if mlp_ratios is not None:
        cfg.model.backbone.mlp_ratios = tuple(mlp_ratios)
    cfg.model.head.update(num_classes=num_classes, in_channels=embed_dims[2])
    return cfg


# ----------------------------------------------------------------------------------------------- parity
@pytest.fixture(scope='module')
def official_cls():
    return torch.load(FIXTURE, weights_only=True)['cls']


def test_finetune_config_matches_official_logits_and_grads(official_cls, tmp_path):
    c = official_cls['config']
    cfg = shrink(Config.fromfile(FT_CONFIG), c['embed_dims'], c['depths'], c['num_heads'], c['num_classes'],
                 c['img_size'])
    cfg.model.backbone.init_cfg = None
    model = build_classifier(cfg.model)
    # the official checkpoint format, converted by tools/convert_official.py's logic, loads with strict keys
    official, path = str(tmp_path / 'official_finetuned.pth'), str(tmp_path / 'converted.pth')
    torch.save({'model': official_cls['state_dict']}, official)
    convert('cls', official, path)
    from mmengine.runner import load_checkpoint
    load_checkpoint(model, path, strict=True)
    model = model.double().train()

    images = official_cls['images'].double()
    logits = model(images, mode='tensor')
    assert logits.shape == official_cls['logits'].shape == (2, c['num_classes'])
    assert max_rel_err(logits, official_cls['logits']) < 1e-6

    g = torch.Generator().manual_seed(official_cls['grad_seed'])
    w = torch.randn(logits.shape, generator=g, dtype=torch.float64)
    (logits * w).sum().backward()
    params = dict(model.named_parameters())
    for name, ref in official_cls['grads'].items():
        ours = name.replace('head.', 'head.fc.', 1) if name.startswith('head.') else 'backbone.' + name
        assert max_rel_err(params[ours].grad, ref) < 1e-6, name


# ----------------------------------------------------------------------------------------------- recipes
def test_finetune_config_carries_the_official_recipe():
    cfg = Config.fromfile(FT_CONFIG)
    assert cfg.default_scope == 'mmpretrain'
    bb = cfg.model.backbone
    assert (bb.type, bb.img_size, bb.arch) == ('ConvMAE', 224, 'base')  # ConvMAE-Base (models/arch.py)
    assert not {'embed_dims', 'depths', 'num_heads', 'mlp_ratios'} & set(bb)
    assert bb.drop_path_rate == 0.1 and bb.out_type == 'avg_featmap' and bb.init_cfg.type == 'Pretrained'
    assert cfg.model.type == 'ImageClassifier' and cfg.model.neck is None
    head = cfg.model.head
    assert (head.type, head.num_classes, head.in_channels) == ('LinearClsHead', 1000, 768)
    assert head.loss == dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original')
    assert head.init_cfg == [dict(type='TruncNormal', layer='Linear', std=2e-5)]
    assert cfg.model.train_cfg.augments == [dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)]
    assert cfg.data_preprocessor.num_classes == 1000
    assert cfg.data_preprocessor.mean == [123.675, 116.28, 103.53]
    assert cfg.data_preprocessor.std == [58.395, 57.12, 57.375] and cfg.data_preprocessor.to_rgb

    # total batch 1024 = 8 x 128; lr = 5e-4 * 1024 / 256
    assert cfg.train_dataloader.batch_size == 128 and cfg.auto_scale_lr.base_batch_size == 1024
    ow = cfg.optim_wrapper
    assert ow.type == 'AmpOptimWrapper' and ow.constructor == 'ConvMAELayerDecayOptimWrapperConstructor'
    assert ow.optimizer == dict(type='AdamW', lr=2e-3, betas=(0.9, 0.999), weight_decay=0.05)
    assert ow.paramwise_cfg == dict(layer_decay_rate=0.65, decay_position=False)
    assert 'clip_grad' not in ow
    warm, cos = cfg.param_scheduler
    assert (warm.type, warm.begin, warm.end, warm.by_epoch, warm.convert_to_iter_based) == \
        ('LinearLR', 0, 5, True, True)
    assert (cos.type, cos.begin, cos.end, cos.by_epoch, cos.convert_to_iter_based) == \
        ('CosineAnnealingLR', 5, 100, True, True)
    assert cos.eta_min_ratio * ow.optimizer.lr == pytest.approx(1e-6, rel=1e-12)
    assert cfg.train_cfg.max_epochs == 100

    train = {t['type']: t for t in cfg.train_dataloader.dataset.pipeline}
    assert list(train) == ['LoadImageFromFile', 'RandomResizedCrop', 'RandomFlip', 'RandAugment',
                           'RandomErasing', 'PackInputs']
    assert train['RandomResizedCrop'] == dict(type='RandomResizedCrop', scale=224, backend='pillow',
                                              interpolation='bicubic')
    assert train['RandomFlip']['prob'] == 0.5
    ra = train['RandAugment']  # rand-m9-mstd0.5-inc1
    assert (ra.policies, ra.num_policies, ra.total_level, ra.magnitude_level, ra.magnitude_std) == \
        ('timm_increasing', 2, 10, 9, 0.5)
    assert ra.hparams.interpolation == 'bicubic'
    re = train['RandomErasing']
    assert (re.erase_prob, re.mode, re.min_area_ratio, re.max_area_ratio) == (0.25, 'rand', 0.02, 1 / 3)
    test = [t for t in cfg.val_dataloader.dataset.pipeline]
    assert test[1] == dict(type='ResizeEdge', scale=256, edge='short', backend='pillow', interpolation='bicubic')
    assert test[2] == dict(type='CenterCrop', crop_size=224)
    assert (cfg.val_evaluator.type, tuple(cfg.val_evaluator.topk)) == ('Accuracy', (1, 5))
    assert cfg.test_dataloader.dataset.pipeline == cfg.val_dataloader.dataset.pipeline
    assert {'NonFiniteLossHook', 'ReseedHook'} <= {h['type'] for h in cfg.custom_hooks}


def test_finetune_optimizer_groups_follow_official_layer_ids():
    """The optimizer the fine-tuning config builds: lr scale 0.65 ** (num_layers + 1 - layer id) with layer 0 =
    patch embeddings, pos_embed, blocks1, blocks2; blocks3.i = i + 1; fc_norm and head = num_layers + 1; no
    weight decay for 1-D parameters and pos_embed (util/lr_decay.py, models_convvit.no_weight_decay)."""
    from mmengine.optim import build_optim_wrapper
    cfg = shrink(Config.fromfile(FT_CONFIG), **TINY_ENCODER, num_classes=NUM_CLASSES, img_size=32)
    cfg.model.backbone.init_cfg = None
    model = build_classifier(cfg.model)
    cfg.optim_wrapper.type = 'OptimWrapper'  # AMP needs a GPU; the groups are the same
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    assert isinstance(wrapper, OPTIM_WRAPPERS.get('OptimWrapper'))
    lr = cfg.optim_wrapper.optimizer.lr
    seen = set()
    for group in wrapper.optimizer.param_groups:
        for name, p in zip(group['param_names'], group['params']):
            rel = name[len('backbone.'):] if name.startswith('backbone.') else None
            if rel is None or rel.startswith('fc_norm'):
                layer = 3
            elif rel.startswith('blocks3.'):
                layer = int(rel.split('.')[1]) + 1
            else:
                assert rel.startswith(('patch_embed', 'pos_embed', 'blocks1', 'blocks2')), name
                layer = 0
            assert group['lr'] == pytest.approx(lr * 0.65 ** (3 - layer), rel=1e-12), name
            no_decay = p.ndim == 1 or rel == 'pos_embed'
            assert group['weight_decay'] == (0.0 if no_decay else 0.05), name
            seen.add(name)
    assert seen == {n for n, _ in model.named_parameters()}


def test_linear_probe_config_carries_the_official_recipe():
    cfg = Config.fromfile(LIN_CONFIG)
    bb = cfg.model.backbone
    assert (bb.type, bb.arch) == ('ConvMAE', 'base') and 'embed_dims' not in bb
    assert bb.frozen_stages == 3 and bb.out_type == 'avg_featmap' and bb.drop_path_rate == 0.0
    assert cfg.model.neck == dict(type='ClsBatchNormNeck', input_features=768, affine=False, eps=1e-6)
    head = cfg.model.head
    assert (head.type, head.num_classes, head.in_channels) == ('LinearClsHead', 1000, 768)
    assert head.loss == dict(type='CrossEntropyLoss')
    assert head.init_cfg == [dict(type='TruncNormal', layer='Linear', std=0.01)]
    assert 'train_cfg' not in cfg.model  # no mixup / cutmix
    assert cfg.train_dataloader.batch_size == 2048 and cfg.auto_scale_lr.base_batch_size == 16384
    ow = cfg.optim_wrapper
    assert ow.optimizer == dict(type='LARS', lr=0.1 * 16384 / 256, momentum=0.9, weight_decay=0.0)
    assert ow.paramwise_cfg.custom_keys == {'.bias': dict(lars_exclude=True)}
    assert 'constructor' not in ow
    warm, cos = cfg.param_scheduler
    assert (warm.type, warm.begin, warm.end) == ('LinearLR', 0, 10)
    assert (cos.type, cos.begin, cos.end, cos.eta_min) == ('CosineAnnealingLR', 10, 90, 0.0)
    assert cfg.train_cfg.max_epochs == 90
    train = [t['type'] for t in cfg.train_dataloader.dataset.pipeline]
    assert train == ['LoadImageFromFile', 'RandomResizedCrop', 'RandomFlip', 'PackInputs']
    assert cfg.train_dataloader.dataset.pipeline[1] == dict(type='RandomResizedCrop', scale=224,
                                                            backend='pillow', interpolation='bicubic')
    test = cfg.val_dataloader.dataset.pipeline
    assert test[1] == dict(type='ResizeEdge', scale=256, edge='short', backend='pillow', interpolation='bicubic')
    assert test[2] == dict(type='CenterCrop', crop_size=224)
    assert (cfg.val_evaluator.type, tuple(cfg.val_evaluator.topk)) == ('Accuracy', (1, 5))


def test_full_size_configs_build_convmae_base_classifiers():
    """Both configs build ConvMAE-Base classifiers for 1000 classes at 224 px; the probe trains 768 x 1000 + 1000
    parameters."""
    for path in (FT_CONFIG, LIN_CONFIG):
        cfg = Config.fromfile(path)
        cfg.model.backbone.init_cfg = None
        model = build_classifier(cfg.model).eval()
        with torch.no_grad():
            assert model(torch.zeros(1, 3, 224, 224), mode='tensor').shape == (1, 1000)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if path == LIN_CONFIG:
            assert trainable == 768 * 1000 + 1000
        else:
            assert trainable == sum(p.numel() for p in model.parameters()) > 85_000_000


def test_linear_probe_model_trains_only_the_head():
    cfg = shrink(Config.fromfile(LIN_CONFIG), **TINY_ENCODER, num_classes=NUM_CLASSES, img_size=32)
    cfg.model.neck.input_features = TINY_ENCODER['embed_dims'][2]
    cfg.model.backbone.init_cfg = None
    model = build_classifier(cfg.model)
    model.init_weights()
    model.train()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ['head.fc.bias', 'head.fc.weight']
    assert not model.backbone.fc_norm.training and model.neck.bn.training
    assert torch.equal(model.backbone.fc_norm.weight, torch.ones(TINY_ENCODER['embed_dims'][2]))
    assert model.head.fc.weight.std().item() == pytest.approx(0.01, rel=0.3)


def test_avg_featmap_output_and_errors():
    from convmae_backbone import ConvMAE
    m = ConvMAE(img_size=32, **TINY_ENCODER, out_type='avg_featmap').eval()
    x = torch.randn(2, 3, 40, 56)
    (out,) = m(x)
    s3 = m.forward_features(m.pad_to_patch(x))[2][:, :, :3, :4]  # ceil(40/16) x ceil(56/16) real tokens
    torch.testing.assert_close(out, m.fc_norm(s3.mean(dim=(2, 3))))
    assert m.fc_norm.eps == 1e-6 and out.shape == (2, TINY_ENCODER['embed_dims'][2])
    with pytest.raises(ValueError, match='out_type'):
        ConvMAE(img_size=32, **TINY_ENCODER, out_type='cls_token')
    assert not hasattr(ConvMAE(img_size=32, **TINY_ENCODER), 'fc_norm')


# ----------------------------------------------------------------------------------------------- end to end
def write_class_folder(root: str, per_class=(3, 2), size: int = 40, seed: int = 0) -> str:
    """<root>/{train,val}/class<c>/*.png, NUM_CLASSES classes, each with its own colour and stripes."""
    g = torch.Generator().manual_seed(seed)
    for split, n in zip(('train', 'val'), per_class):
        for c in range(NUM_CLASSES):
            folder = osp.join(root, split, f'class{c}')
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                img = torch.rand(size, size, 3, generator=g) * 60
                img[..., c % 3] += 120 + 20 * (c // 3)
                img[:, c::6] += 50
                Image.fromarray(img.clamp(0, 255).byte().numpy()).save(osp.join(folder, f'{i}.png'))
    return root


def tiny_config(path: str, data_root: str, work_dir: str, pretrained, max_epochs: int = 2) -> str:
    """The config shrunk to a 32-px, 5-class problem on CPU; written next to the work dir."""
    cfg = shrink(Config.fromfile(path), **TINY_ENCODER, num_classes=NUM_CLASSES, img_size=32)
    if cfg.model.get('neck'):
        cfg.model.neck.input_features = TINY_ENCODER['embed_dims'][2]
    cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint=pretrained) if pretrained else None
    cfg.data_preprocessor.num_classes = NUM_CLASSES
    for name, split, shuffle in (('train_dataloader', 'train', True), ('val_dataloader', 'val', False),
                                 ('test_dataloader', 'val', False)):
        pipeline = cfg[name].dataset.pipeline
        for t in pipeline:
            if t['type'] == 'RandomResizedCrop':
                t['scale'] = 32
            elif t['type'] == 'ResizeEdge':
                t['scale'] = 36
            elif t['type'] == 'CenterCrop':
                t['crop_size'] = 32
        cfg[name] = dict(batch_size=5, num_workers=0, persistent_workers=False, drop_last=shuffle,
                         sampler=dict(type='DefaultSampler', shuffle=shuffle),
                         dataset=dict(type='CustomDataset', data_root=data_root, data_prefix=split,
                                      pipeline=pipeline))
    cfg.optim_wrapper.type = 'OptimWrapper'  # AMP needs a GPU
    warm, cos = cfg.param_scheduler
    warm.end, cos.begin, cos.end = 1, 1, max_epochs
    cfg.train_cfg.max_epochs = max_epochs
    cfg.default_hooks.logger.interval = 1
    cfg.randomness = dict(seed=0, diff_rank_seed=True, deterministic=True)
    cfg.work_dir = work_dir
    os.makedirs(work_dir, exist_ok=True)
    out = osp.join(work_dir, osp.basename(path).replace('convmae-b', 'convmae-tiny'))
    cfg.dump(out)
    return out


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return write_class_folder(str(tmp_path_factory.mktemp('cls_data')))


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    """A tiny ConvMAE pretraining checkpoint in mmengine's format (encoder, fusion and decoder weights)."""
    torch.manual_seed(0)
    model = ConvMAEPretrainer(img_size=32, **TINY_ENCODER, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=4)
    path = str(tmp_path_factory.mktemp('pretrain') / 'pretrain.pth')
    torch.save(dict(meta=dict(epoch=1), state_dict=model.state_dict()), path)
    return path, model.state_dict()


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get('PYTHONPATH')) if p))


def mmpretrain_tool(name: str) -> str:
    return osp.join(osp.dirname(importlib.import_module('mmpretrain').__file__), '.mim', 'tools', f'{name}.py')


def run(cmd, cwd) -> str:
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=600, env=_env(),
                          cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def val_metrics(work_dir: str) -> dict:
    """The last validation entry of the run's vis_data/scalars.json."""
    import json
    runs = sorted(d for d in os.listdir(work_dir) if osp.isfile(osp.join(work_dir, d, 'vis_data', 'scalars.json')))
    metrics = {}
    with open(osp.join(work_dir, runs[-1], 'vis_data', 'scalars.json')) as f:
        for line in f:
            entry = json.loads(line)
            if 'accuracy/top1' in entry:
                metrics = entry
    return metrics


@pytest.fixture(scope='module')
def finetuned(tmp_path_factory, data_root, pretrained):
    """Two fine-tuning epochs through mmpretrain's own train tool: (config, work dir, log)."""
    ckpt, _ = pretrained
    work = str(tmp_path_factory.mktemp('ft'))
    config = tiny_config(FT_CONFIG, data_root, work, ckpt)
    log = run([mmpretrain_tool('train'), config, '--work-dir', work], cwd=work)
    return config, work, log


def test_finetune_with_mmpretrain_train_tool_then_our_test_tool(tmp_path, finetuned, pretrained):
    config, work, log = finetuned
    ckpt, pre_state = pretrained
    assert f'ConvMAE weights from {ckpt}' in log
    metrics = val_metrics(work)
    assert 0.0 <= metrics['accuracy/top1'] <= 100.0 and metrics['accuracy/top5'] >= metrics['accuracy/top1']

    state = safe_torch_load(osp.join(work, 'epoch_2.pth'))
    by_layer = {g['layer_id']: g for g in state['optimizer']['param_groups']}
    assert sorted(by_layer) == [0, 1, 2, 3]
    for layer_id, g in by_layer.items():
        assert g['initial_lr'] == pytest.approx(2e-3 * 0.65 ** (3 - layer_id), rel=1e-9)
    key = 'blocks3.1.attn.qkv.weight'
    assert not torch.equal(state['state_dict']['backbone.' + key], pre_state[key])
    assert (state['state_dict']['backbone.' + key] - pre_state[key]).abs().max() < 0.1

    preds = str(tmp_path / 'preds.pkl')
    test_log = run([osp.join(REPO, 'tools', 'test.py'), config, osp.join(work, 'epoch_2.pth'), '--work-dir',
                    str(tmp_path / 'test'), '--out', preds], cwd=str(tmp_path))
    assert 'accuracy/top1' in test_log and 'accuracy/top5' in test_log
    import pickle
    with open(preds, 'rb') as f:
        results = pickle.load(f)
    assert len(results) == 2 * NUM_CLASSES and results[0]['pred_score'].shape == (NUM_CLASSES,)


def test_show_dir_paints_every_test_image_for_a_classifier(tmp_path, finetuned):
    """tools/test.py --show-dir on an mmpretrain config: its VisualizationHook (enable=False in the config) draws
    every test image into <work dir>/<show dir> (the 2 file names of each class folder: 2 files)."""
    config, work, _ = finetuned
    run([osp.join(REPO, 'tools', 'test.py'), config, osp.join(work, 'epoch_2.pth'), '--work-dir',
         str(tmp_path / 'test'), '--show-dir', 'painted'], cwd=str(tmp_path))
    painted = sorted(os.listdir(tmp_path / 'test' / 'painted'))
    assert painted == ['0.png_0.png', '1.png_0.png']  # mmpretrain names them <image file name>_<step>.png
    with Image.open(tmp_path / 'test' / 'painted' / painted[0]) as img:
        assert img.size[0] >= 32 and img.size[1] >= 32


def test_linear_probe_with_our_tools_keeps_the_encoder_frozen(tmp_path, data_root, pretrained):
    ckpt, pre_state = pretrained
    work = str(tmp_path / 'lin')
    config = tiny_config(LIN_CONFIG, data_root, work, ckpt)
    log = run([osp.join(REPO, 'tools', 'train.py'), config, '--work-dir', work], cwd=work)
    assert f'ConvMAE weights from {ckpt}' in log
    metrics = val_metrics(work)
    assert 0.0 <= metrics['accuracy/top1'] <= 100.0
    ckpt2 = safe_torch_load(osp.join(work, 'epoch_2.pth'))
    state = ckpt2['state_dict']
    assert not torch.equal(state['head.fc.weight'],
                           safe_torch_load(osp.join(work, 'epoch_1.pth'))['state_dict']['head.fc.weight'])
    # LARS: the bias skips the trust ratio (util/lars.py: parameters with ndim <= 1)
    excluded = [g for g in ckpt2['optimizer']['param_groups'] if g.get('lars_exclude')]
    assert excluded and all(g['weight_decay'] == 0.0 for g in ckpt2['optimizer']['param_groups'])
    for key, value in pre_state.items():  # every encoder weight is the pretrained one
        if 'backbone.' + key in state:
            assert torch.equal(state['backbone.' + key], value), key
    assert torch.equal(state['backbone.fc_norm.weight'], torch.ones(TINY_ENCODER['embed_dims'][2]))
    assert torch.equal(state['backbone.fc_norm.bias'], torch.zeros(TINY_ENCODER['embed_dims'][2]))
    assert 'neck.bn.weight' not in state and state['neck.bn.running_mean'].abs().sum() > 0
    test_log = run([mmpretrain_tool('test'), config, osp.join(work, 'epoch_2.pth'), '--work-dir',
                    str(tmp_path / 'test')], cwd=str(tmp_path))
    assert 'accuracy/top1' in test_log


def test_finetune_resume_equals_uninterrupted_run(tmp_path, finetuned):
    """Mixup/CutMix, RandAugment and random erasing included: one epoch (mmpretrain's tool, stopped early by
    max_epochs=1, which our tools refuse as a schedule ending inside the cosine), then --resume for the second
    through this project's tools/train.py, ends with the weights of the uninterrupted two-epoch run."""
    config, full, _ = finetuned
    split = str(tmp_path / 'split')
    os.makedirs(split)
    train = osp.join(REPO, 'tools', 'train.py')
    run([mmpretrain_tool('train'), config, '--work-dir', split, '--cfg-options', 'train_cfg.max_epochs=1'],
        cwd=split)
    assert not osp.isfile(osp.join(split, 'epoch_2.pth'))
    log = run([train, config, '--work-dir', split, '--resume'], cwd=split)
    assert 'resumed epoch: 1' in log
    resumed = safe_torch_load(osp.join(split, 'epoch_2.pth'))['state_dict']
    reference = safe_torch_load(osp.join(full, 'epoch_2.pth'))['state_dict']
    at_resume = safe_torch_load(osp.join(split, 'epoch_1.pth'))['state_dict']
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key
    assert not torch.equal(at_resume['head.fc.weight'], reference['head.fc.weight'])  # epoch 2 did train
