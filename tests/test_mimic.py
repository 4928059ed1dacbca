"""MR-MAE-style feature mimicking (``ConvMAEPretrainer(mimic=...)``): the objective on small local teachers (CLIP and
DINO weights cannot be downloaded here), the teachers' isolation from training and checkpoints, the tools (1 and 2
gloo processes, --amp, --resume), the visualiser and the k-NN monitor on such a model, and the config."""
import os
import random
import subprocess
import sys

import pytest
import torch
from helpers import BASE_CFG, ROOT, TINY_ARCH, make_images, write_tiny_config
from mmengine.config import Config
from mmengine.registry import MODELS

from convmae_backbone.apis import visualization
from convmae_backbone.checkpoint import safe_torch_load
from convmae_backbone.engine.knn import KNNMonitorHook
from convmae_backbone.models import ConvMAEPretrainer
from convmae_backbone.models.masking import random_mask, upsample_mask
from convmae_backbone.models.weights import is_pretraining_only
from convmae_backbone.resources import config_path
from convmae_backbone.testing import TinyTeacher

PREPROCESSOR = dict(type='ImgDataPreprocessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375])
#: two local teachers: ViT-like tokens at H/8 with a class token (resampled to H/16), and a map at H/16
TEACHERS = dict(
    vit=dict(model=dict(type='TinyTeacher', patch_size=8, seed=1), cls_token=True, mean=[127.5] * 3, std=[64.0] * 3),
    cnn=dict(model=dict(type='TinyTeacher', embed_dim=20, patch_size=16, seed=2, output='map'), distance='cosine',
             norm='l2', head_hidden=32))


def pretrainer(mimic=None, seed: int = 0, **kwargs) -> ConvMAEPretrainer:
    """A float64 tiny pretrainer at 64x64 whose every parameter is random (LayerNorms and biases included)."""
    torch.manual_seed(seed)
    model = ConvMAEPretrainer(img_size=64, **TINY_ARCH, mimic=mimic, data_preprocessor=PREPROCESSOR, **kwargs)
    model = model.double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if 'norm' in name else 0.1))
    return model


def with_weights(weight: float) -> dict:
    return dict(teachers={name: dict(cfg, weight=weight) for name, cfg in TEACHERS.items()})


@pytest.mark.parametrize('sparse,masking', [(True, 'block'), (False, 'block'), (True, 'complementary')])
def test_mimic_weight_zero_gives_todays_loss_and_gradients_exactly(sparse, masking):
    plain = pretrainer(sparse=sparse, masking=masking)
    mimic = pretrainer(with_weights(0.0), sparse=sparse, masking=masking)
    missing, unexpected = mimic.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith('mimic_heads.') for k in missing)
    imgs = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    mask = (random_mask(2, 16, 0.75, generator=gen) if masking == 'block' else
            torch.stack([torch.roll(torch.arange(16) // 4 != k, 5) for k in range(4)])[None].expand(2, -1, -1))
    ref, out = plain.forward_mae(imgs, mask), mimic.forward_mae(imgs, mask)
    assert set(out.losses) == {'loss_rec', 'loss_mimic_vit', 'loss_mimic_cnn'} and set(ref.losses) == {'loss_rec'}
    assert all(out.losses[k] == 0 for k in ('loss_mimic_vit', 'loss_mimic_cnn'))
    assert torch.equal(out.loss, ref.loss) and torch.equal(out.pred, ref.pred)
    ref.loss.backward()
    out.loss.backward()
    grads = dict(mimic.named_parameters())
    for name, p in plain.named_parameters():
        if p.grad is not None:
            assert torch.equal(grads[name].grad, p.grad), name
    # with weight 1 the same model's mimic terms are positive and move the encoder's gradients
    mimic.zero_grad()
    for teacher in mimic.teachers.values():
        teacher.weight = 1.0
    out = mimic.forward_mae(imgs, mask)
    assert all(out.losses[k] > 0 for k in ('loss_mimic_vit', 'loss_mimic_cnn'))
    out.loss.backward()
    assert not torch.equal(mimic.blocks3[0].attn.qkv.weight.grad, plain.blocks3[0].attn.qkv.weight.grad)


@pytest.mark.parametrize('sparse', [True, False])
def test_mimic_loss_reads_only_the_visible_positions_of_the_input(sparse):
    model = pretrainer(with_weights(1.0), sparse=sparse)
    imgs = torch.randn(2, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    mask = random_mask(2, 16, 0.75, generator=torch.Generator().manual_seed(0))
    out = model.forward_mae(imgs, mask)
    for name in ('loss_mimic_vit', 'loss_mimic_cnn'):
        grad, = torch.autograd.grad(out.losses[name], imgs, retain_graph=True)
        masked = upsample_mask(mask, (4, 4), 16).expand_as(grad)  # (B, 3, H, W), True under masked tokens
        assert grad[masked].abs().max() == 0, name
        per_token = grad.abs().sum(dim=1, keepdim=True).reshape(2, 4, 16, 4, 16).sum(dim=(2, 4)).flatten(1)
        assert (per_token[~mask] > 0).all(), name  # every visible token's pixels move the mimic loss


def test_reconstruction_term_ignores_the_visible_patches():
    model = pretrainer(with_weights(1.0))
    imgs = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    mask = random_mask(2, 16, 0.75, generator=torch.Generator().manual_seed(1))
    pred = model.forward_mae(imgs, mask).pred.detach().requires_grad_()
    grad, = torch.autograd.grad(model.forward_loss(imgs, pred, mask), pred)
    assert grad[~mask].abs().max() == 0 and (grad[mask].abs().sum(dim=-1) > 0).all()


def test_teachers_are_frozen_outside_the_module_tree_and_follow_dtype():
    model = pretrainer(with_weights(1.0))
    teachers = {name: t.module for name, t in model.teachers.items()}
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in teachers.items()}
    assert all(isinstance(m, TinyTeacher) for m in teachers.values())
    assert all(p.dtype == torch.float64 for m in teachers.values() for p in m.parameters())  # .double() moved them
    model.train()
    assert model.training and all(not m.training for m in teachers.values())
    teacher_params = {id(p) for m in teachers.values() for p in m.parameters()}
    assert not teacher_params & {id(p) for p in model.parameters()}
    assert all(not p.requires_grad for m in teachers.values() for p in m.parameters())
    # the state holds the encoder and the pretraining modules, nothing of a teacher
    assert all(model.stage_of(k) is not None or is_pretraining_only(k) for k in model.state_dict())
    heads = sorted({k.split('.')[1] for k in model.state_dict() if k.startswith('mimic_heads.')})
    assert heads == ['cnn', 'vit'] and model.mimic_heads.vit.out_features == 24
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.forward_mae(torch.randn(2, 3, 64, 64, dtype=torch.float64)).loss.backward()
    optimizer.step()
    model.init_weights()  # the encoder's initialisation sweep never reaches a teacher
    for name, m in teachers.items():
        assert all(torch.equal(v, before[name][k]) for k, v in m.state_dict().items()), name
        assert not m.training


def test_teacher_features_are_resampled_to_the_stage3_grid_with_their_normalisation():
    model = pretrainer(with_weights(1.0))
    vit = model.teachers['vit']
    pixels = torch.rand(2, 3, 64, 64, dtype=torch.float64) * 255
    imgs = (pixels - model.data_preprocessor.mean) / model.data_preprocessor.std
    inputs = vit.inputs(imgs, model.data_preprocessor.mean, model.data_preprocessor.std)
    torch.testing.assert_close(inputs, (pixels - 127.5) / 64.0)
    patches, cls = vit.targets(inputs, (4, 4))
    tokens = vit.module.forward_features(inputs)  # (B, 1 + 8*8, 24)
    fine = tokens[:, 1:].transpose(1, 2).reshape(2, 24, 8, 8)
    pooled = torch.nn.functional.interpolate(fine, size=(4, 4), mode='bilinear', align_corners=False)  # 2x2 means
    torch.testing.assert_close(pooled, fine.reshape(2, 24, 4, 2, 4, 2).mean(dim=(3, 5)))
    expected = torch.nn.functional.layer_norm(pooled.flatten(2).transpose(1, 2), (24,), eps=1e-6)
    torch.testing.assert_close(patches, expected)
    assert cls.shape == (2, 24) and torch.allclose(cls.mean(-1), torch.zeros(2, dtype=cls.dtype), atol=1e-12)


@pytest.mark.parametrize('teacher,match', [
    (dict(model=dict(type='TinyTeacher'), distance='l1'), "distance must be one of"),
    (dict(model=dict(type='TinyTeacher'), norm='batch'), "norm must be one of"),
    (dict(model=dict(type='TinyTeacher'), weight=-1), "weight must be a finite number"),
    (dict(model=dict(type='TinyTeacher'), layer=3), r"unknown keys \['layer'\]"),
    (dict(model=dict(type='TinyTeacher', output='map'), cls_token=True), 'has no class token'),
    (dict(model=dict(type='TinyTeacher'), timm='vit_tiny_patch16_224'), "exactly one of 'timm'"),
    (dict(model=dict(type='TinyTeacher'), mean=[0, 0, 0]), 'both mean and std'),
])
def test_bad_teacher_configs_are_named(teacher, match):
    with pytest.raises(ValueError, match=match):
        ConvMAEPretrainer(img_size=64, **TINY_ARCH, mimic=dict(teachers=dict(t=teacher)))


def test_mr_convmae_config_builds_with_its_timm_teachers():
    """The CLIP ViT-B/16 and DINO ViT-B/16 teachers by their timm names, here without their weights (no download)."""
    cfg = Config.fromfile(config_path('mr-convmae-b_8xb128-200e_in1k'))
    assert cfg.train_cfg.max_epochs == 200 and cfg.model.mask_ratio == 0.75
    teachers = cfg.model.mimic.teachers
    assert {n: t.timm for n, t in teachers.items()} == {'clip': 'vit_base_patch16_clip_224.openai',
                                                          'dino': 'vit_base_patch16_224.dino'}
    assert all(t.pretrained for t in teachers.values())
    for t in teachers.values():
        t.pretrained = False
    model = MODELS.build(cfg.model)
    assert model.embed_dims == (256, 384, 768)
    assert {n: t.num_features for n, t in model.teachers.items()} == {'clip': 768, 'dino': 768}
    clip, dino = model.teachers['clip'], model.teachers['dino']
    assert clip.mean == pytest.approx([255 * m for m in (0.48145466, 0.4578275, 0.40821073)])
    assert dino.mean == pytest.approx([123.675, 116.28, 103.53])
    assert (clip.weight, clip.distance, clip.norm, clip.cls_token) == (1.0, 'l2', 'layer', False)
    patches, _ = clip.targets(torch.zeros(1, 3, 224, 224), (14, 14))
    assert patches.shape == (1, 196, 768)
    assert {k.split('.')[1] for k in model.state_dict() if k.startswith('mimic_heads.')} == {'clip', 'dino'}


def test_knn_monitor_on_a_mimic_model_equals_the_plain_encoder(tmp_path):
    from test_knn import _fake_runner, _write_folder
    root = _write_folder(str(tmp_path / 'data'), per_class=(2, 1))
    torch.manual_seed(0)
    kwargs = dict(img_size=32, embed_dims=(16, 32, 48), depths=(1, 1, 1), num_heads=4, decoder_embed_dim=16,
                  decoder_depth=1, decoder_num_heads=2, data_preprocessor=PREPROCESSOR)
    plain = ConvMAEPretrainer(**kwargs)
    mimic = ConvMAEPretrainer(**kwargs, mimic=with_weights(1.0))
    mimic.load_state_dict(plain.state_dict(), strict=False)
    mimic.train()
    expected = KNNMonitorHook(data_root=root, k=2, batch_size=2).evaluate(_fake_runner(plain), step=0)
    assert KNNMonitorHook(data_root=root, k=2, batch_size=2).evaluate(_fake_runner(mimic), step=0) == expected
    assert mimic.training and all(not t.module.training for t in mimic.teachers.values())


# --------------------------------------------------------------------------------------------- the tools
MIMIC_EXTRA = f'''
custom_imports = dict(imports=['convmae_backbone.testing'], allow_failed_imports=False)
model = dict(img_size=32, **{TINY_ARCH!r}, mimic=dict(teachers={TEACHERS!r}))
'''  # (a second `model =` in the file replaces the tiny one of write_tiny_config, so the tiny sizes are restated)


def run(cmd, timeout: float = 600) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', PYTHON=sys.executable,
               PORT=str(29500 + random.randrange(2000)))
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope='module')
def mimic_runs(tmp_path_factory):
    """tools/pretrain.py with two tiny teachers and --amp, 2 epochs: one process, the same resumed from its first
    epoch, and two gloo processes (tools/dist_pretrain.sh) of half the batch."""
    tmp = tmp_path_factory.mktemp('mimic')
    cfg = write_tiny_config(tmp / 'tiny.py', make_images(tmp / 'data'), max_epochs=2, extra=MIMIC_EXTRA)
    pretrain = [sys.executable, ROOT / 'tools' / 'pretrain.py', cfg]
    logs = dict(one=run([*pretrain, '--amp', '--work-dir', tmp / 'one']))
    logs['resumed'] = run([*pretrain, '--amp', '--work-dir', tmp / 'resumed', '--resume', tmp / 'one' / 'epoch_1.pth'])
    logs['two'] = run(['bash', ROOT / 'tools' / 'dist_pretrain.sh', cfg, 2, '--amp', '--work-dir', tmp / 'two',
                       '--cfg-options', 'train_dataloader.batch_size=2'])
    return tmp, logs


def test_mimic_pretraining_runs_logs_each_term_and_resumes_exactly(mimic_runs):
    tmp, logs = mimic_runs
    assert 'distributed on CPU: gloo, rank 0 of 2' in logs['two'] and 'resumed epoch' in logs['resumed']
    for log in logs.values():
        assert all(f'{term}: ' in log for term in ('loss_rec', 'loss_mimic_vit', 'loss_mimic_cnn'))
    ref, resumed = safe_torch_load(tmp / 'one' / 'epoch_2.pth'), safe_torch_load(tmp / 'resumed' / 'epoch_2.pth')
    two = safe_torch_load(tmp / 'two' / 'epoch_2.pth')
    assert ref['meta']['iter'] == resumed['meta']['iter'] == two['meta']['iter'] == 4
    assert set(resumed['state_dict']) == set(ref['state_dict'])
    for key, value in ref['state_dict'].items():
        assert torch.equal(resumed['state_dict'][key], value), key
    first = safe_torch_load(tmp / 'one' / 'epoch_1.pth')['state_dict']
    assert not torch.equal(first['mimic_heads.vit.weight'], ref['state_dict']['mimic_heads.vit.weight'])
    plain = ConvMAEPretrainer(img_size=32, **TINY_ARCH).state_dict()
    model = ConvMAEPretrainer(img_size=32, **TINY_ARCH, mimic=dict(teachers=TEACHERS))
    for ckpt in (ref, two):  # no teacher tensor: the model's own weights and the two heads, nothing else
        assert {k for k in ckpt['state_dict'] if not k.startswith('mimic_heads.')} == set(plain)
        assert {k.split('.')[1] for k in ckpt['state_dict'] if k.startswith('mimic_heads.')} == {'vit', 'cnn'}
        assert "type='TinyTeacher'" in ckpt['meta']['cfg']  # the teachers' config is kept
        in_optimizer = sum(len(g['params']) for g in ckpt['optimizer']['param_groups'])
        assert in_optimizer in (len(list(model.parameters())),
                                sum(p.requires_grad for p in model.parameters()))  # no teacher parameter


def test_visualiser_reads_a_mimic_checkpoint(mimic_runs, tmp_path):
    tmp, _ = mimic_runs
    ckpt = str(tmp / 'one' / 'epoch_2.pth')
    model = visualization.build_model(ckpt)
    assert not model.teachers and not hasattr(model, 'mimic_heads')
    saved = safe_torch_load(ckpt)['state_dict']
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    images = sorted(str(p) for p in (tmp / 'data').rglob('*.jpg'))[:2]
    width, _, caption = visualization.visualize(ckpt, images, str(tmp_path / 'grid.png'), img_size=32)
    assert (tmp_path / 'grid.png').is_file() and width > 0 and caption


def test_fusion_off_checkpoint_visualises(tmp_path):
    """A pretraining checkpoint of the multiscale_fusion=False ablation holds no stage1/2_output_decode: it is a
    pretraining model all the same (it was refused as 'an encoder without the decoder')."""
    torch.manual_seed(0)
    cfg = dict(type='ConvMAEPretrainer', img_size=32, **TINY_ARCH, multiscale_fusion=False,
               data_preprocessor=PREPROCESSOR)
    model = MODELS.build(cfg)
    path = tmp_path / 'fusion_off.pth'
    torch.save(dict(state_dict=model.state_dict(), meta=dict(cfg=Config(dict(model=cfg)).pretty_text)), path)
    ckpt = safe_torch_load(str(path))
    assert visualization.describe_weights(ckpt) == 'a ConvMAE pretraining model'
    built = visualization.build_model(str(path))
    assert not built.multiscale_fusion
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in built.state_dict().items())
    image = tmp_path / 'img.png'
    from PIL import Image
    Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(image)
    width, height, caption = visualization.visualize(str(path), [str(image)], str(tmp_path / 'grid.png'))
    assert (tmp_path / 'grid.png').is_file() and width > 0
    error = visualization.reconstruction_error(built, visualization.load_square(str(image), 32)[None])
    assert f'masked patches: trained {error:.3f}' in caption
    # an encoder export (no decoder) is still refused
    encoder = {k: v for k, v in model.state_dict().items() if model.stage_of(k) is not None}
    assert visualization.describe_weights(dict(state_dict=encoder)).startswith('a ConvMAE encoder without')
