"""Masks as a function of the sample: drawn by the pipeline from the sample's seed, used by the pretrainer."""
import numpy as np
import pytest
import torch
from mmengine.dataset import pseudo_collate
from mmengine.registry import DATA_SAMPLERS, DATASETS
from PIL import Image

import convmae_backbone  # noqa: F401
from convmae_backbone import ConvMAEPretrainer
from convmae_backbone.datasets.transforms import RandomBlockMask
from convmae_backbone.models.masking import batch_masks, num_visible_tokens, random_mask
from helpers import TINY_ARCH

PIPELINE = [dict(type='LoadRGBImage'), dict(type='MAERandomResizedCrop', size=64),
            dict(type='MAERandomFlip', prob=0.5), dict(type='RandomBlockMask', input_size=64, mask_ratio=0.75),
            dict(type='PackMAEInputs')]
TINY = dict(TINY_ARCH, img_size=64)


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)).save(tmp_path / f'{i}.png')
    return DATASETS.build(dict(type='ImageFolderDataset', data_root=str(tmp_path), pipeline=PIPELINE))


def test_transform_draws_exact_count_and_checks_its_input():
    torch.manual_seed(0)
    out = RandomBlockMask(input_size=(64, 96), patch_size=16, mask_ratio=0.75)({})
    assert out['mask'].dtype == torch.bool and out['mask'].shape == (24,) and int((~out['mask']).sum()) == 6
    with pytest.raises(ValueError, match='multiples of patch_size 16'):
        RandomBlockMask(input_size=60)
    with pytest.raises(ValueError, match='mask_ratio'):
        RandomBlockMask(mask_ratio=1.0)
    with pytest.raises(ValueError, match=r'expects \(64, 64\) images \(put it after the crop\), got \(32, 48\)'):
        RandomBlockMask(input_size=64)(dict(img=Image.new('RGB', (48, 32))))


def test_transform_takes_numpy_and_pil_images_and_checks_their_size():
    """mmcv's LoadImageFromFile gives numpy (H, W, C) arrays (their ``.size`` is an int), PIL images (W, H)."""
    mask = RandomBlockMask(input_size=(32, 48), mask_ratio=0.5)
    for img in (np.zeros((32, 48, 3), np.uint8), np.zeros((32, 48), np.uint8), Image.new('RGB', (48, 32))):
        out = mask(dict(img=img))
        assert out['mask'].shape == (6,) and int((~out['mask']).sum()) == 3 and out['img'] is img
    with pytest.raises(ValueError, match=r'expects \(32, 48\) images \(put it after the crop\), got \(48, 32\)'):
        mask(dict(img=np.zeros((48, 32, 3), np.uint8)))
    with pytest.raises(TypeError, match=r'PIL image or a numpy array \(H, W\[, C\]\), got Tensor\(3, 32, 48\)'):
        mask(dict(img=torch.zeros(3, 32, 48)))


@pytest.mark.parametrize('ratio', [0.0, -0.1, 1.0, 1.5])
def test_mask_ratio_outside_the_open_interval_is_refused_everywhere(ratio):
    """0 masks nothing (the loss would be 0/0 = NaN), 1 leaves nothing to encode: refused by the transform, the
    model and the mask drawing, each naming mask_ratio and the interval."""
    match = rf'mask_ratio must be in the open interval \(0, 1\), got {ratio}'
    with pytest.raises(ValueError, match=match):
        RandomBlockMask(input_size=64, mask_ratio=ratio)
    with pytest.raises(ValueError, match=match):
        ConvMAEPretrainer(**TINY, mask_ratio=ratio)
    with pytest.raises(ValueError, match=match):
        random_mask(1, 16, ratio)


def test_visible_count_is_one_rule():
    assert num_visible_tokens(196, 0.75) == 49 and num_visible_tokens(16, 0.6) == 6  # int(6.4)
    assert int((~random_mask(3, 196, 0.75)).sum(dim=1).unique()) == 49
    with pytest.raises(ValueError, match=r'mask_ratio=0.9 leaves 0 of 4 tokens visible'):
        num_visible_tokens(4, 0.9)  # in range, but nothing left to encode on a 2x2 grid
    with pytest.raises(ValueError, match=r'mask_ratio=0.9 leaves 0 of 4 tokens visible'):
        RandomBlockMask(input_size=32, mask_ratio=0.9)
    model = ConvMAEPretrainer(**TINY, mask_ratio=0.5)
    with pytest.raises(ValueError, match=r'mask_ratio=0.5 leaves 0 of 1 tokens visible'):  # a 1x1 token grid
        model.forward_mae(torch.randn(1, 3, 16, 16))


def test_mask_is_a_function_of_index_and_seed(dataset):
    torch.manual_seed(0)
    a = dataset[(3, 1234)]
    torch.manual_seed(99)  # whatever the global RNG holds
    b = dataset[(3, 1234)]
    assert torch.equal(a['data_samples'].mask, b['data_samples'].mask)
    assert torch.equal(a['inputs'], b['inputs'])
    masks = {tuple(dataset[(3, 1234 + k)]['data_samples'].mask.tolist()) for k in range(8)}
    assert len(masks) > 1  # other seeds, other masks
    assert all(sum(not v for v in m) == 4 for m in masks)  # 16 tokens, 4 visible


def test_masks_do_not_depend_on_world_size(dataset, monkeypatch):
    """Every (index, mask) pair that ranks 0 and 1 of 2 processes see is the one a single process sees."""
    import mmengine.dataset.sampler as sampler_module

    def masks_of(rank: int, world: int) -> dict:
        monkeypatch.setattr(sampler_module, 'get_dist_info', lambda: (rank, world))
        sampler = DATA_SAMPLERS.build(dict(type='SeededSampler', shuffle=True, seed=5), default_args=dict(
            dataset=dataset))
        sampler.set_epoch(2)
        return {key[0]: dataset[key]['data_samples'].mask for key in sampler}

    single = masks_of(0, 1)
    split = {**masks_of(0, 2), **masks_of(1, 2)}
    assert sorted(split) == sorted(single) == list(range(8))
    for idx, mask in single.items():
        assert torch.equal(split[idx], mask), idx


def test_loader_of_the_pretraining_config_sends_a_batch_as_two_tensors(dataset):
    """The base config's ``collate_fn`` (``mae_collate``) stacks the images where the pipeline runs and the masks
    too: the batch crosses from a loader worker as one (B, 3, H, W) uint8 tensor and one (B, L) bool tensor whose
    rows the data samples hold; the pretrainer trains on that batch with those masks (and compiled, with the data
    preprocessor, in tests/test_compile.py)."""
    from mmengine.config import Config
    from mmengine.registry import FUNCTIONS

    from convmae_backbone import config_path

    collate_cfg = Config.fromfile(config_path('pretrain/convmae-b_8xb128-1600e_in1k.py')).train_dataloader.collate_fn
    samples = [dataset[(i, 10 + i)] for i in range(4)]
    loader = torch.utils.data.DataLoader(samples, batch_size=4, num_workers=1,
                                         collate_fn=FUNCTIONS.get(collate_cfg['type']))
    batch = next(iter(loader))
    assert isinstance(batch['inputs'], torch.Tensor) and batch['inputs'].shape == (4, 3, 64, 64)
    assert batch['inputs'].dtype == torch.uint8
    masks = [s.mask for s in batch['data_samples']]
    storage = masks[0].untyped_storage().data_ptr()
    assert all(m.shape == (16,) and m.dtype == torch.bool and m.untyped_storage().data_ptr() == storage
               for m in masks)  # rows of one tensor
    assert torch.equal(torch.stack(masks), torch.stack([s['data_samples'].mask for s in samples]))
    model = ConvMAEPretrainer(**TINY, data_preprocessor=dict(type='ImgDataPreprocessor', mean=[127.5] * 3,
                                                             std=[64.0] * 3))
    data = model.data_preprocessor(batch, training=True)
    _, mask = model(data['inputs'], data['data_samples'], mode='tensor')
    assert torch.equal(mask, torch.stack(masks))
    assert FUNCTIONS.get(collate_cfg['type'])([dict(inputs=torch.zeros(1))])['inputs'].shape == (1, 1)  # no masks


def test_pretrainer_uses_the_batch_masks(dataset):
    torch.manual_seed(0)
    model = ConvMAEPretrainer(**TINY, data_preprocessor=dict(type='ImgDataPreprocessor', mean=[127.5] * 3,
                                                             std=[64.0] * 3))
    data = model.data_preprocessor(pseudo_collate([dataset[(i, 10 + i)] for i in range(4)]), training=True)
    expected = batch_masks(data['data_samples'])
    assert expected.shape == (4, 16)
    pred, mask = model(data['inputs'], data['data_samples'], mode='tensor')
    assert torch.equal(mask, expected)
    loss1 = model(data['inputs'], data['data_samples'], mode='loss')['loss_rec']
    loss2 = model.forward_mae(data['inputs'], expected).loss
    assert torch.equal(loss1, loss2)
    _, own = model(data['inputs'], None, mode='tensor')  # without masks it draws its own
    assert own.shape == (4, 16) and ((~own).sum(1) == 4).all() and not torch.equal(own, expected)

    wrong = ConvMAEPretrainer(**dict(TINY, img_size=64), mask_ratio=0.5)
    with pytest.raises(ValueError, match=r"exactly 8 of 16 tokens visible; got \[4, 4, 4, 4\]: the model has "
                                         r"mask_ratio=0.5, masking='block'; the data pipeline \(RandomBlockMask\) "
                                         r"must use the same"):
        wrong(data['inputs'], data['data_samples'], mode='loss')
    with pytest.raises(ValueError, match='some data samples'):
        batch_masks([data['data_samples'][0], dict()])
