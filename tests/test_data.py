"""Image-folder dataset and MAE pretraining pipeline: listing, robustness, mode conversion, output format."""
import logging
import os

import numpy as np
import pytest
import torch
from mmengine.logging import MMLogger
from mmengine.registry import DATASETS
from PIL import Image

import convmae_backbone  # noqa: F401  (registers the dataset and transforms)
from convmae_backbone.datasets import LoadRGBImage, image_folder, list_images, to_rgb8

PIPELINE = [dict(type='LoadRGBImage'), dict(type='MAERandomResizedCrop', size=32, scale=(0.2, 1.0)),
            dict(type='MAERandomFlip', prob=0.5), dict(type='PackMAEInputs')]


def photo(h: int = 48, w: int = 40, seed: int = 0) -> np.ndarray:
    """A smooth random RGB uint8 image (H, W, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
    return np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


def build(root, **kwargs):
    return DATASETS.build(dict(type='ImageFolderDataset', data_root=str(root), pipeline=PIPELINE, **kwargs))


def test_recursive_listing_case_insensitive_and_subdir(tmp_path):
    files = ['train/a/x.jpg', 'train/a/deep/y.PNG', 'train/b/z.JpEg', 'train/b/w.bmp', 'train/c/v.tif',
             'train/c/u.TIFF', 'train/c/t.webp']
    for i, f in enumerate(files):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(seed=i)).save(tmp_path / f)
    (tmp_path / 'train/a/notes.txt').write_text('not an image')
    (tmp_path / 'outside.jpg').write_bytes(b'')  # outside train/: ignored when train/ exists
    listed = list_images(str(tmp_path / 'train'))
    assert sorted(os.path.relpath(p, tmp_path) for p in listed) == sorted(files)
    ds = build(tmp_path)
    assert len(ds) == len(files)
    assert ds.image_dir == str(tmp_path / 'train')
    flat = build(tmp_path / 'train' / 'c')  # a flat folder without train/
    assert len(flat) == 3


def test_output_is_chw_uint8_crop(tmp_path):
    Image.fromarray(photo(20, 24)).save(tmp_path / 'small.png')  # smaller than the crop: upsampled
    ds = build(tmp_path)
    out = ds[0]
    assert set(out) == {'inputs'}
    assert out['inputs'].dtype == torch.uint8 and out['inputs'].shape == (3, 32, 32)
    assert out['inputs'].float().std() > 5  # real content, not a blank image


@pytest.mark.parametrize('mode', ['L', 'LA', 'RGBA', 'P', 'I;16', 'I', 'CMYK', '1'])
def test_modes_convert_to_rgb8(tmp_path, mode):
    rgb = Image.fromarray(photo())
    if mode == 'I;16':
        gray = np.asarray(rgb.convert('L'), dtype=np.uint16) * 257
        img = Image.fromarray(gray)  # 16-bit grayscale
        assert img.mode.startswith('I;16')
        path = tmp_path / 'img16.png'
    elif mode == 'I':
        img = Image.fromarray(np.asarray(rgb.convert('L'), dtype=np.int32) * 257)
        path = tmp_path / 'img32.tif'
    else:
        img = rgb.convert(mode)
        path = tmp_path / ('img.jpg' if mode == 'CMYK' else 'img.png')
    img.save(path)
    with Image.open(path) as reloaded:
        out = to_rgb8(reloaded)
        assert out.mode == 'RGB' and out.size == img.size
    if mode in ('I;16', 'I'):  # the 16-bit range is scaled to 8 bits, not clipped
        expected = np.asarray(rgb.convert('L'))
        assert np.abs(np.asarray(out)[..., 0].astype(int) - expected).max() <= 1
    sample = build(tmp_path)[0]
    assert sample['inputs'].shape == (3, 32, 32) and sample['inputs'].dtype == torch.uint8


@pytest.mark.parametrize('mode', ['I;16', 'I', 'F'])
def test_wide_grayscale_converts_in_bands_as_the_whole_image(monkeypatch, mode):
    """16-bit, 32-bit and float grayscale is converted in bands of CONVERT_PIXELS pixels (4 bands of 7 rows here,
    the last partial): the pixels of the whole-image float64 conversion (65535 -> 255, floats in [0, 1] -> 255)."""
    monkeypatch.setattr(image_folder, 'CONVERT_PIXELS', 7 * 50)
    rng = np.random.default_rng(0)
    if mode == 'I;16':
        values = rng.integers(0, 65536, (23, 50)).astype(np.uint16)
    elif mode == 'I':
        values = rng.integers(-1000, 70000, (23, 50)).astype(np.int32)  # beyond 0..65535: clipped
    else:
        values = rng.uniform(-0.1, 1.0, (23, 50)).astype(np.float32)
        values[0, :4] = np.array([0.5, 1.5, 2.5, 254.5], np.float32) / 255  # (near) ties of the rounding
    img = Image.fromarray(values)
    assert img.mode == mode
    whole = values.astype(np.float64)
    if mode == 'I;16' or (mode == 'I' and whole.max() > 255):
        whole = whole / 257.0
    elif mode == 'F' and whole.max() <= 1.0:
        whole = whole * 255.0
    expected = np.clip(np.rint(whole), 0, 255).astype(np.uint8)
    out = np.asarray(to_rgb8(img))
    assert out.shape == (23, 50, 3) and out.dtype == np.uint8
    assert all(np.array_equal(out[..., c], expected) for c in range(3))
    assert len(np.unique(expected)) > 100  # the full range, not a constant


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_bad_files_are_skipped_with_warning(tmp_path):
    Image.fromarray(photo()).save(tmp_path / 'good.jpg')
    full = (tmp_path / 'good.jpg').read_bytes()
    (tmp_path / 'truncated.jpg').write_bytes(full[:len(full) // 2])
    (tmp_path / 'text.png').write_text('this is not a png')
    (tmp_path / 'empty.webp').write_bytes(b'')
    ds = build(tmp_path)
    assert len(ds) == 4
    bad = {str(tmp_path / n) for n in ('truncated.jpg', 'text.png', 'empty.webp')}
    handler = _Records()
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    before = LoadRGBImage.num_skipped()
    try:
        for _ in range(3):
            for i in range(len(ds)):
                out = ds[i]  # a bad index is replaced by another (the good) image
                assert out['inputs'].shape == (3, 32, 32)
    finally:
        logger.removeHandler(handler)
    warned = [m for m in handler.messages if 'skipped unreadable image' in m]
    assert len(warned) == 3  # one warning per bad file, each naming it
    assert {b for b in bad for m in warned if repr(b) in m} == bad
    assert LoadRGBImage.num_skipped() - before == 3
    assert f'{LoadRGBImage.num_skipped()} bad file(s) skipped so far' in warned[-1]


def test_missing_and_empty_data_root_fail_naming_the_path(tmp_path):
    missing = tmp_path / 'nope'
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build(missing)
    empty = tmp_path / 'empty'
    (empty / 'train').mkdir(parents=True)
    (empty / 'train' / 'readme.txt').write_text('no images here')
    with pytest.raises(FileNotFoundError, match='holds no images'):
        build(empty)


def test_demo_images_are_real_photos(tmp_path):
    from convmae_backbone.testing import DEMO_PHOTOS, write_demo_images
    n = write_demo_images(str(tmp_path), views_per_photo=2, size=48, seed=1)
    assert n == 2 * len(DEMO_PHOTOS)
    files = list_images(str(tmp_path / 'train'))
    assert len(files) == n
    with Image.open(files[0]) as img:
        assert img.size == (48, 48)
        assert np.asarray(img).std() > 5


def test_seeded_samples_are_reproducible_and_leave_global_rng_alone(tmp_path):
    from mmengine.registry import DATA_SAMPLERS
    for i in range(6):
        Image.fromarray(photo(64, 64, seed=i)).save(tmp_path / f'{i}.png')
    ds = build(tmp_path)
    sampler = DATA_SAMPLERS.build(dict(type='SeededSampler', shuffle=True, seed=7), default_args=dict(dataset=ds))
    epoch0 = list(sampler)
    assert sorted(i for i, _ in epoch0) == list(range(6))
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert {s for _, s in epoch0}.isdisjoint({s for _, s in epoch1})  # new augmentation seeds every epoch

    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = ds[epoch0[0]]['inputs']
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is not consumed
    torch.manual_seed(12345)
    assert torch.equal(ds[epoch0[0]]['inputs'], first)  # same (index, seed) -> same crop and flip
    idx, seed = epoch0[0]
    crops = {ds[(idx, seed + k)]['inputs'].float().sum().item() for k in range(1, 6)}
    assert len(crops) > 1  # other seeds give other crops


def test_transforms_are_mmcv_transforms_found_from_every_scope(tmp_path):
    import importlib

    from mmcv.transforms import BaseTransform
    from mmengine.registry import TRANSFORMS, DefaultScope
    Image.fromarray(photo(48, 40)).save(tmp_path / 'a.png')
    pipelines = {}
    for scope in ('mmengine', 'mmdet', 'mmseg'):
        registry = TRANSFORMS if scope == 'mmengine' else importlib.import_module(f'{scope}.registry').TRANSFORMS
        with DefaultScope.overwrite_default_scope(scope):
            pipelines[scope] = [registry.build(t) for t in PIPELINE]
    for transform in pipelines['mmengine']:
        assert isinstance(transform, BaseTransform)
    load, crop, flip, pack = pipelines['mmseg']
    loaded = load(dict(img_path=str(tmp_path / 'a.png')))
    assert loaded['img'].size == (40, 48)
    assert np.array_equal(np.asarray(type(flip)(prob=1.0)(dict(img=loaded['img']))['img']),
                          np.asarray(loaded['img'])[:, ::-1])
    assert type(flip)(prob=0.0)(dict(img=loaded['img']))['img'] is loaded['img']
    packed = pack(crop(dict(img=loaded['img'])))
    assert set(packed) == {'inputs'} and packed['inputs'].shape == (3, 32, 32)
