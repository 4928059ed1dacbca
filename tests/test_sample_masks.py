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
from convmae_backbone.models.masking import batch_masks

PIPELINE = [dict(type='LoadRGBImage'), dict(type='MAERandomResizedCrop', size=64),
            dict(type='MAERandomFlip', prob=0.5), dict(type='RandomBlockMask', input_size=64, mask_ratio=0.75),
            dict(type='PackMAEInputs')]
TINY = dict(img_size=64, embed_dims=(32, 48, 96), depths=(1, 1, 2), num_heads=4, decoder_embed_dim=64,
            decoder_depth=1, decoder_num_heads=4)


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


def test_pretrainer_uses_the_batch_masks(dataset):
    torch.manual_seed(0)
    model = ConvMAEPretrainer(**TINY, data_preprocessor=dict(type='ImgDataPreprocessor', mean=[127.5] * 3,
                                                             std=[64.0] * 3))
    data = model.data_preprocessor(pseudo_collate([dataset[(i, 10 + i)] for i in range(4)]), training=True)
    expected = batch_masks(data['data_samples'])
    assert expected.shape == (4, 16)
    pred, mask = model(data['inputs'], data['data_samples'], mode='tensor')
    assert torch.equal(mask, expected)
    loss1 = model(data['inputs'], data['data_samples'], mode='loss')['loss']
    loss2 = model.forward_mae(data['inputs'], expected)[0]
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
