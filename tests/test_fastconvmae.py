"""Fast ConvMAE (complementary masking): parity with the official code in float64, the masks (official rule,
pipeline, validation), one pass of stages 1-2 per image, and the Fast ConvMAE config against the official recipe."""
import math
from pathlib import Path

import pytest
import torch
from helpers import TINY_ARCH, make_images, random_pretrainer, rel_err, write_tiny_config
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import PARAM_SCHEDULERS
from mmengine.structures import BaseDataElement
from PIL import Image

from convmae_backbone.apis import cli
from convmae_backbone.checkpoint import safe_torch_load
from convmae_backbone.datasets.transforms import PackMAEInputs, RandomBlockMask
from convmae_backbone.models import BlockMask, ConvMAEPretrainer
from convmae_backbone.models.arch import arch_settings
from convmae_backbone.models.masking import batch_masks, complementary_masks, num_views, random_mask

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / 'tests' / 'fixtures' / 'official_fastconvmae_small.pt'
FAST_CFG = ROOT / 'configs' / 'pretrain' / 'fastconvmae-b_8xb64-50e_in1k.py'


@pytest.fixture(scope='module')
def fast():
    """Outputs recorded from the official Fast ConvMAE (see tests/fixtures/README.md)."""
    return torch.load(FIXTURE, weights_only=True)


def view_masks(fast) -> torch.Tensor:
    """The fixture's view-major (V*B, L) masks as (B, V, L)."""
    masks = fast['masks']
    b = fast['images'].shape[0]
    return masks.reshape(masks.shape[0] // b, b, -1).transpose(0, 1)


def official_model(fast, sparse: bool, norm_pix_loss: bool) -> ConvMAEPretrainer:
    c = fast['config']
    model = ConvMAEPretrainer(embed_dims=c['embed_dim'], depths=c['depth'], num_heads=c['num_heads'],
                              mlp_ratios=c['mlp_ratio'], decoder_embed_dim=c['decoder_embed_dim'],
                              decoder_depth=c['decoder_depth'], decoder_num_heads=c['decoder_num_heads'],
                              mask_ratio=c['mask_ratio'], norm_pix_loss=norm_pix_loss, sparse=sparse,
                              masking='complementary')
    model.load_state_dict(fast['state_dict'], strict=True)
    return model.double()


@pytest.mark.parametrize('norm_pix_loss', [True, False], ids=['norm_pix', 'raw'])
@pytest.mark.parametrize('sparse', [True, False], ids=['sparse', 'dense'])
def test_official_fastconvmae_parity(fast, sparse, norm_pix_loss):
    """Loss, prediction of every view, latent and gradients match the official Fast ConvMAE in float64 (< 1e-6;
    the fixture stores float32), on both paths; views come back view-major as officially."""
    model = official_model(fast, sparse, norm_pix_loss)
    tag = 'norm_pix' if norm_pix_loss else 'raw'
    imgs, masks = fast['images'].double(), view_masks(fast)
    out = model.forward_mae(imgs, masks, from_ratio=True)
    loss, pred, mask = out.loss, out.pred, out.mask
    loss.backward()
    assert torch.equal(mask, fast['masks']) and pred.shape == fast['pred'].shape == (8, 196, 768)
    assert rel_err(loss, fast[f'loss_{tag}']) < 1e-6
    assert rel_err(pred, fast['pred']) < 1e-6
    params = dict(model.named_parameters())
    assert len(fast[f'grads_{tag}']) == 15
    for name, grad in fast[f'grads_{tag}'].items():
        assert rel_err(params[name].grad, grad) < 1e-6, name
    with torch.no_grad():
        latent = model.forward_encoder(imgs.repeat(4, 1, 1, 1), BlockMask.from_views(masks, (14, 14)))
    assert rel_err(latent, fast[f'latent_{tag}']) < 1e-6


def test_complementary_masks_follow_the_official_rule(fast):
    """View k keeps the tokens at places 49k .. 49k+48 of one random permutation per image: the fixture's masks
    from its permutations, and ours from the same noise as the official ``random_masking``."""
    ids_shuffle = fast['ids_shuffle']
    view_of = ids_shuffle.argsort(dim=1) // 49
    official = torch.stack([view_of != k for k in range(4)], dim=1)  # (B, V, L)
    assert torch.equal(official, view_masks(fast))
    noise = torch.rand(3, 196, generator=torch.Generator().manual_seed(7))
    shuffle = noise.argsort(dim=1)
    ours = complementary_masks(3, 196, 0.75, generator=torch.Generator().manual_seed(7))
    for k in range(4):
        keep = torch.zeros(3, 196, dtype=torch.bool).scatter_(1, shuffle[:, 49 * k:49 * (k + 1)], True)
        assert torch.equal(ours[:, k], ~keep)
    assert torch.equal(ours[:, 0], random_mask(3, 196, 0.75, generator=torch.Generator().manual_seed(7)))


@pytest.mark.parametrize('ratio, length, views', [(0.75, 196, 4), (0.75, 24, 4), (0.5, 15, 2), (0.8, 23, 5)])
def test_complementary_masks_partition_the_grid(ratio, length, views):
    masks = complementary_masks(6, length, ratio)
    visible = ~masks
    assert masks.shape == (6, views, length) and num_views(ratio) == views
    assert (visible.sum(-1) == int(length * (1 - ratio))).all()
    assert (visible.sum(1) <= 1).all()  # disjoint
    # every token is visible in one view, except the last L - V*Lv of the permutation: masked in all
    assert (visible.sum(dim=(1, 2)) == views * int(length * (1 - ratio))).all()


@pytest.mark.parametrize('ratio, cause', [(0.6, 'whole number'), (0.0, r'open interval \(0, 1\)'),
                                          (0.7, 'whole number')])
def test_complementary_masking_needs_a_whole_number_of_views(ratio, cause):
    with pytest.raises(ValueError, match=cause):
        ConvMAEPretrainer(img_size=32, **TINY_ARCH, masking='complementary', mask_ratio=ratio)
    with pytest.raises(ValueError, match=cause):
        RandomBlockMask(input_size=32, mask_ratio=ratio, masking='complementary')


def test_sparse_equals_dense_and_each_position_is_computed_once():
    """64x96 images (a 4x6 grid, 6 visible tokens per view): sparse == dense in float64 (values and gradients),
    drawn masks come back view-major, and the sparse stage-1/2 blocks see each H/4 position of each image once."""
    sparse, dense = random_pretrainer(True, masking='complementary'), random_pretrainer(False, masking='complementary')
    dense.load_state_dict(sparse.state_dict())
    imgs = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seen = []
    sparse.blocks1[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    out = sparse.forward_mae(imgs, generator=torch.Generator().manual_seed(2))
    loss, pred, mask = out.loss, out.pred, out.mask
    assert pred.shape == (12, 24, 768) and mask.shape == (12, 24)
    masks = mask.reshape(4, 3, 24).transpose(0, 1)
    assert ((~masks).sum(1) == 1).all()  # the views of every image partition its grid
    assert seen == [(12, 6, 4, 4, 32)] and 12 * 6 * 4 * 4 == 3 * 16 * 24  # every H/4 position once
    loss.backward()
    out = dense.forward_mae(imgs, masks)
    loss_d, pred_d = out.loss, out.pred
    loss_d.backward()
    assert rel_err(loss, loss_d) < 1e-12 and rel_err(pred, pred_d) < 1e-12
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters()):
        if p.requires_grad:
            assert q.grad.abs().max() > 0 and rel_err(p.grad, q.grad) < 1e-10, name


def test_each_view_is_block_wise_convmae_with_its_mask():
    """Per view, complementary masking computes exactly block-wise ConvMAE with that view's mask; the loss is the
    mean over the masked tokens of all views."""
    fast, block = random_pretrainer(True, masking='complementary'), random_pretrainer(True)
    block.load_state_dict(fast.state_dict())
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    masks = complementary_masks(2, 16, 0.75, generator=torch.Generator().manual_seed(4))
    out = fast.forward_mae(imgs, masks)
    loss, pred = out.loss, out.pred
    total, count = 0.0, 0
    for k in range(4):
        out = block.forward_mae(imgs, masks[:, k])
        loss_k, pred_k = out.loss, out.pred
        assert rel_err(pred[2 * k:2 * k + 2], pred_k) < 1e-12
        total, count = total + loss_k * masks[:, k].sum(), count + masks[:, k].sum()
    assert rel_err(loss, total / count) < 1e-12


@pytest.mark.parametrize('make, match', [
    (lambda: torch.zeros(2, 16, dtype=torch.bool), r'mask must have shape \(B, V, L\) = \(2, 4, 16\)'),
    (lambda: complementary_masks(2, 16, 0.75).flip(0)[:, :3], r'\(B, V, L\)'),
    (lambda: random_mask(8, 16, 0.75).reshape(2, 4, 16), 'must be disjoint'),
])
def test_bad_view_masks_raise_value_error(make, match):
    model = ConvMAEPretrainer(img_size=64, **TINY_ARCH, masking='complementary')
    with pytest.raises(ValueError, match=match):
        model.forward_mae(torch.randn(2, 3, 64, 64), make())


def test_pipeline_draws_the_views_from_the_sample_seed():
    """RandomBlockMask(masking='complementary') draws (V, L) from torch's RNG (seeded per sample by
    SeededSampler): the same seed gives the same views whatever else the process drew; the batch's masks reach
    the model as (B, V, L) and train it through the mmengine entry point."""
    transform = RandomBlockMask(input_size=(64, 96), mask_ratio=0.75, masking='complementary')
    samples = []
    for seed in (5, 6, 5):
        torch.manual_seed(seed)
        torch.rand(seed)  # whatever else the process draws after seeding, the sample's seed decides
        torch.manual_seed(seed)
        samples.append(PackMAEInputs()(transform(dict(img=Image.new('RGB', (96, 64), (10, 20, 30))))))
    masks = [s['data_samples'].mask for s in samples]
    assert masks[0].shape == (4, 24) and torch.equal(masks[0], masks[2]) and not torch.equal(masks[0], masks[1])
    assert ((~masks[0]).sum(0) == 1).all()
    assert "masking='complementary'" in repr(transform)
    data_samples = [s['data_samples'] for s in samples]
    assert batch_masks(data_samples).shape == (3, 4, 24)
    model = ConvMAEPretrainer(img_size=64, **TINY_ARCH, masking='complementary')
    inputs = torch.stack([s['inputs'] for s in samples]).float()
    out = model(inputs, data_samples, mode='loss')
    out['loss_rec'].backward()
    assert out['loss_rec'].isfinite() and model.blocks1[0].attn.weight.grad.abs().max() > 0
    overlapping = BaseDataElement(mask=random_mask(4, 24, 0.75))  # 6 visible per view, views overlap
    with pytest.raises(ValueError, match=r'disjoint .*RandomBlockMask\) must use the same'):
        model(inputs, data_samples[:2] + [overlapping], mode='loss')


# ------------------------------------------------------------------------------------------------ the recipe
def official_lr(epoch: float, lr: float, warmup: int = 10, epochs: int = 50, min_lr: float = 0.0) -> float:
    """Alpha-VL/FastConvMAE util/lr_sched.py: linear warm-up from 0, then half-cycle cosine, per iteration."""
    if epoch < warmup:
        return lr * epoch / warmup
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


def test_fastconvmae_config_is_the_official_recipe():
    """configs/pretrain/fastconvmae-b_8xb64-50e_in1k.py against Alpha-VL/FastConvMAE PRETRAIN.md (8 GPUs x 64,
    --model fastconvmae_convvit_base_patch16 --norm_pix_loss --mask_ratio 0.75 --epochs 50 --warmup_epochs 10
    --blr 6.0e-4 --weight_decay 0.05), main_pretrain.py (lr = blr * batch / 256, AdamW betas (0.9, 0.95), crop
    scale (0.2, 1.0) bicubic, flip, ImageNet mean/std) and models_fastconvmae.py (ConvMAE-Base, decoder 512-d, 8
    blocks, 16 heads), value by value."""
    cfg = Config.fromfile(str(FAST_CFG))
    m = cfg.model
    assert m.type == 'ConvMAEPretrainer' and m.masking == 'complementary' and m.get('sparse', True) is True
    assert arch_settings(m.arch) == dict(patch_sizes=(4, 2, 2), embed_dims=(256, 384, 768), depths=(2, 2, 11),
                                         num_heads=12, mlp_ratios=(4, 4, 4))
    assert 'embed_dims' not in m and m.img_size == 224 and m.get('conv_kernel_size', 5) == 5
    assert (m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads) == (512, 8, 16)
    assert m.mask_ratio == 0.75 and m.norm_pix_loss is True and m.loss_type == 'mse'
    assert m.get('multiscale_fusion', True) is True and m.drop_path_rate == 0.0
    pre = m.data_preprocessor
    assert pre.mean == [123.675, 116.28, 103.53] and pre.std == [58.395, 57.12, 57.375]  # 255 x timm's
    pipeline = {t['type']: t for t in cfg.train_dataloader.dataset.pipeline}
    crop = pipeline['MAERandomResizedCrop']
    assert crop['size'] == 224 and tuple(crop['scale']) == (0.2, 1.0) and crop['interpolation'] == 'bicubic'
    assert pipeline['MAERandomFlip']['prob'] == 0.5
    masks = pipeline['RandomBlockMask']
    assert masks['masking'] == 'complementary' and masks['mask_ratio'] == 0.75 and masks['input_size'] == 224
    assert cfg.train_dataloader.batch_size == 64 and cfg.train_dataloader.drop_last is True
    opt = cfg.optim_wrapper.optimizer
    total_batch = 8 * 64
    assert opt.type == 'AdamW' and opt.lr == pytest.approx(6.0e-4 * total_batch / 256)
    assert tuple(opt.betas) == (0.9, 0.95) and opt.weight_decay == 0.05
    assert cfg.auto_scale_lr.base_batch_size == total_batch
    assert cfg.train_cfg.max_epochs == 50
    assert 'clip_grad' not in cfg.optim_wrapper and cfg.optim_wrapper.get('accumulative_counts', 1) == 1


def test_fastconvmae_schedule_and_weight_decay_groups_are_official():
    """The Runner's lr at every iteration of a 50-epoch run equals the official per-iteration schedule (within
    mmengine's warm-up: a start at 1e-4 of the peak, the peak one iteration early), and weight decay applies to exactly the parameters the
    official timm ``add_weight_decay`` decays (not 1-D, not ``.bias``; the mask token too)."""
    cfg = Config.fromfile(str(FAST_CFG))
    model = ConvMAEPretrainer(img_size=32, **TINY_ARCH)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    decay = {id(p): g['weight_decay'] for g in wrapper.optimizer.param_groups for p in g['params']}
    for name, p in model.named_parameters():
        if p.requires_grad:
            official = 0.0 if p.ndim == 1 or name.endswith('.bias') else 0.05
            assert decay[id(p)] == official, name
    assert decay[id(model.mask_token)] == 0.05
    iters = 40  # per epoch (2502 on ImageNet at batch 512)
    lr = cfg.optim_wrapper.optimizer.lr
    schedulers = [PARAM_SCHEDULERS.build(dict(s, optimizer=wrapper, epoch_length=iters) if s.get(
        'convert_to_iter_based') else dict(s, optimizer=wrapper)) for s in
        [dict(s, end=s.get('end', cfg.train_cfg.max_epochs)) for s in cfg.param_scheduler]]
    for it in range(50 * iters):
        got = wrapper.optimizer.param_groups[0]['lr']
        # LinearLR starts at 1e-4 of the lr and reaches it one iteration before the warm-up's end
        assert got == pytest.approx(official_lr(it / iters, lr), abs=(1e-4 + 1 / (10 * iters)) * lr), it
        for s in schedulers:
            s.step()


def test_short_fastconvmae_run_on_the_runner(tmp_path):
    """tools/pretrain.py with complementary masks from the pipeline: the Runner trains, and the checkpoint is an
    ordinary ConvMAE pretraining checkpoint (it loads strictly into a block-wise pretrainer)."""
    extra = ("model.update(masking='complementary')\n"
             "next(t for t in train_pipeline if t['type'] == 'RandomBlockMask').update(masking='complementary')\n")
    cfg = write_tiny_config(tmp_path / 'fast.py', make_images(tmp_path / 'data'), max_epochs=2, extra=extra)
    runner = cli.pretrain([str(cfg), '--work-dir', str(tmp_path / 'work'), '--cfg-options', 'experiment_name=fast'])
    assert runner.model.num_views == 4
    losses = runner.message_hub.get_scalar('train/loss').data[0]
    assert len(losses) == 4 and all(math.isfinite(v) and v > 0 for v in losses)  # 2 epochs x 2 iterations
    state = safe_torch_load(tmp_path / 'work' / 'epoch_2.pth')['state_dict']
    ConvMAEPretrainer(img_size=32, **TINY_ARCH).load_state_dict(state, strict=True)
