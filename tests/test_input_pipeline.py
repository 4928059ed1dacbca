"""The fast pretraining input (DecodeRandomResizedCrop): the crop distribution of torchvision's RandomResizedCrop,
pixels close to full-decode-then-crop, the same draws per sample seed as LoadRGBImage + MAERandomResizedCrop."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF

from convmae_backbone.datasets import (DecodeRandomResizedCrop, LoadRGBImage, MAERandomFlip, MAERandomResizedCrop,
                                       PackMAEInputs, SkipUnreadable)
from convmae_backbone.datasets.decode import EncodedImage
from convmae_backbone.datasets.samplers import seeded_rngs
from convmae_backbone.datasets.transforms import draw_crop
from convmae_backbone.testing import write_photo_jpegs


def jpeg_bytes(width: int, height: int, seed: int = 0, mode: str = 'RGB') -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 / width, yy * 255 / height, rng.uniform(0, 255, (height, width))], -1)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).convert(mode).save(buf, 'JPEG', quality=90)
    return buf.getvalue()


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(np.sort(a), grid, side='right') / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side='right') / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def crop_stats(boxes, height: int, width: int):
    """(area fractions, log aspect ratios w / h) of (top, left, h, w) boxes."""
    b = np.asarray(boxes, dtype=np.float64)
    return b[:, 2] * b[:, 3] / (height * width), np.log(b[:, 3] / b[:, 2])


# the KS test at significance 1e-3: reject when D > 1.949 * sqrt((n + m) / (n m)); n = m = N
N = 1000
KS_CRITICAL = 1.949 * np.sqrt(2 / N)


def our_boxes(seed0: int, height: int, width: int, **kwargs):
    """Crop boxes that DecodeRandomResizedCrop uses (full-image pixels, after rounding to the reduced image) and
    the decode factors, over N sample seeds; a small output size, so that crops allow reductions by 2 and 4."""
    crop = DecodeRandomResizedCrop(size=64, **kwargs)
    boxes, factors = [], []
    for seed in range(seed0, seed0 + N):
        with seeded_rngs(seed):
            factor, _, box = crop.plan(height, width, factors=(1, 2, 4, 8))
        boxes.append(box)
        factors.append(factor)
    return boxes, np.asarray(factors)


def test_crop_scale_and_ratio_follow_torchvision_and_a_wrong_range_is_detected():
    height, width = 300, 400
    img = Image.new('RGB', (width, height))
    ref = [RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(N)]  # torch's own RNG
    ref_scale, ref_ratio = crop_stats(ref, height, width)

    boxes, factors = our_boxes(10 ** 6, height, width, scale=(0.2, 1.0))
    assert (factors > 1).mean() > 0.5 and set(factors) >= {2, 4}  # rounding in reduced images is exercised
    scale, ratio = crop_stats(boxes, height, width)
    assert ks_statistic(scale, ref_scale) < KS_CRITICAL
    assert ks_statistic(ratio, ref_ratio) < KS_CRITICAL
    assert scale.min() >= 0.19 and np.exp(ratio).min() >= 0.74 and np.exp(ratio).max() <= 1.35

    # the same test rejects a crop of another scale range or of another aspect-ratio range
    wrong_scale, _ = crop_stats(our_boxes(10 ** 6, height, width, scale=(0.3, 1.0))[0], height, width)
    assert ks_statistic(wrong_scale, ref_scale) > KS_CRITICAL
    _, wrong_ratio = crop_stats(our_boxes(10 ** 6, height, width, ratio=(2 / 3, 3 / 2))[0], height, width)
    assert ks_statistic(wrong_ratio, ref_ratio) > KS_CRITICAL


@pytest.mark.parametrize('height, width', [(300, 400), (375, 500), (20, 400), (400, 20), (7, 9), (1, 1)])
def test_draw_crop_is_torchvision_get_params(height, width):
    """The same boxes and the same RNG consumption as RandomResizedCrop.get_params, fallback included (the
    extreme shapes, where 10 attempts can fail)."""
    for seed in range(200):
        torch.manual_seed(seed)
        ours, state = draw_crop(height, width, (0.2, 1.0), (3 / 4, 4 / 3)), torch.get_rng_state()
        torch.manual_seed(seed)
        ref = RandomResizedCrop.get_params(Image.new('RGB', (width, height)), [0.2, 1.0], [3 / 4, 4 / 3])
        assert ours == tuple(ref) and torch.equal(state, torch.get_rng_state()), (seed, ours, ref)


def test_same_draws_as_load_then_random_resized_crop():
    """Per sample seed: the crop drawn from the header is torchvision's draw on the decoded image (at full-size
    decoding exactly that box; reduced decoding moves each edge by at most f / 2 pixels), and the RNG is left
    where LoadRGBImage + MAERandomResizedCrop leave it, so the flip and the mask that follow are the same."""
    data = jpeg_bytes(400, 300, seed=1)
    fast, load, old = DecodeRandomResizedCrop(size=96), LoadRGBImage(), MAERandomResizedCrop(size=96)
    factors = set()
    for seed in range(100):
        with seeded_rngs(seed):
            out = fast(dict(img_bytes=data))
            after_fast = torch.get_rng_state()
        with seeded_rngs(seed):
            loaded = load(dict(img_bytes=data))
            drawn = RandomResizedCrop.get_params(loaded['img'], [0.2, 1.0], [3 / 4, 4 / 3])
        with seeded_rngs(seed):
            old(load(dict(img_bytes=data)))
            assert torch.equal(torch.get_rng_state(), after_fast)
        f = out['decode_factor']
        factors.add(f)
        (t, l, h, w), (dt, dl, dh, dw) = out['crop_box'], drawn
        edges = np.abs(np.array([t - dt, l - dl, t + h - dt - dh, l + w - dl - dw]))
        assert edges.max() <= (0 if f == 1 else f / 2), (seed, f, out['crop_box'], drawn)
    assert factors == {1, 2}


def full_decode_reference(path: str, box) -> np.ndarray:
    """PIL's full decode, crop of ``box`` and bicubic resize: the official pipeline's pixels for that box."""
    with Image.open(path) as img:
        return np.asarray(TF.resized_crop(img.convert('RGB'), *box, [224, 224], InterpolationMode.BICUBIC))


@pytest.mark.parametrize('decoder', ['simplejpeg', 'pil'])
def test_pixels_match_full_decode_then_crop_on_photographs(tmp_path, decoder):
    """On ImageNet-like JPEGs of real photographs (500x375 and, so that reduced decoding happens, 1000x750),
    against PIL decoding in full and cropping the same box, in 8-bit levels: at f = 1 mean |error| <= 0.4 per image
    and <= 0.05 on average, max 12 (measured: 0.23, 0.02, 6; the largest where a crop narrower than 224 is
    enlarged); decoded at 1/2 or 1/4, mean |error| <= 1.5 per image and <= 0.6 on average, RMSE <= 2.5
    (measured: 0.68, 0.38, 1.16)."""
    paths = (write_photo_jpegs(str(tmp_path / 'a'), 14) +
             write_photo_jpegs(str(tmp_path / 'b'), 14, size=(1000, 750), seed=1))
    crop = DecodeRandomResizedCrop(224, decoder=decoder)
    errors = {1: [], 2: []}
    for k, path in enumerate(paths):
        for seed in range(3):
            with seeded_rngs(100 * k + seed):
                out = crop(dict(img_path=path))
            assert out['img'].shape == (224, 224, 3) and out['img'].dtype == np.uint8
            diff = np.abs(out['img'].astype(np.float64) - full_decode_reference(path, out['crop_box']))
            errors[min(out['decode_factor'], 2)].append((diff.mean(), diff.max(), np.sqrt((diff ** 2).mean())))
    full, reduced = np.asarray(errors[1]), np.asarray(errors[2])
    assert len(full) > 40 and len(reduced) > 10
    assert full[:, 0].max() <= 0.4 and full[:, 0].mean() <= 0.05 and full[:, 1].max() <= 12
    assert reduced[:, 0].max() <= 1.5 and reduced[:, 0].mean() <= 0.6 and reduced[:, 2].max() <= 2.5


def test_decoders_agree_and_other_formats_and_modes_decode(tmp_path):
    rgb = jpeg_bytes(90, 70)
    for factor in (1, 2, 4, 8):  # simplejpeg and PIL draft: the same libjpeg-turbo pixels
        a, b = EncodedImage(rgb, 'simplejpeg').decode(factor), EncodedImage(rgb, 'pil').decode(factor)
        assert a.shape == (-(-70 // factor), -(-90 // factor), 3) and np.array_equal(a, b)
    gray, cmyk = jpeg_bytes(90, 70, mode='L'), jpeg_bytes(90, 70, mode='CMYK')
    png = io.BytesIO()
    Image.open(io.BytesIO(rgb)).save(png, 'PNG')
    for data, factors in ((gray, (1, 2, 4, 8)), (cmyk, (1,)), (png.getvalue(), (1,))):
        image = EncodedImage(data)
        assert image.size == (70, 90) and image.factors == factors
        with Image.open(io.BytesIO(data)) as ref:
            assert np.array_equal(image.decode(), np.asarray(ref.convert('RGB')))
        with seeded_rngs(0):
            out = DecodeRandomResizedCrop(size=32)(dict(img_bytes=data))
        assert out['img'].shape == (32, 32, 3)


def test_unreadable_and_oversized_files_are_skipped_with_a_warning(tmp_path, monkeypatch):
    data = jpeg_bytes(80, 60)
    (tmp_path / 'truncated.jpg').write_bytes(data[:len(data) // 2])
    (tmp_path / 'text.jpg').write_bytes(b'\xff\xd8\xff not really a jpeg')
    (tmp_path / 'big.jpg').write_bytes(data)
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)  # 80x60 > 2 x 1000 pixels: a decompression bomb
    crop = DecodeRandomResizedCrop(size=32)
    before = SkipUnreadable.num_skipped()
    for name in ('truncated.jpg', 'text.jpg', 'big.jpg'):
        with seeded_rngs(0):
            assert crop(dict(img_path=str(tmp_path / name))) is None
    assert SkipUnreadable.num_skipped() - before == 3
    monkeypatch.undo()
    with seeded_rngs(0):  # bytes without a name: a bad one is skipped, and the next good one still loads
        assert crop(dict(img_bytes=b'\xff\xd8\xff garbage')) is None
        assert crop(dict(img_bytes=data))['img'].shape == (32, 32, 3)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match='interpolation'):
        DecodeRandomResizedCrop(interpolation='nearest')
    with pytest.raises(ValueError, match='decoder'):
        DecodeRandomResizedCrop(decoder='cv2')
    with pytest.raises(ValueError, match='scale'):
        DecodeRandomResizedCrop(scale=(0.5, 0.2))


def test_flip_and_pack_of_arrays():
    with seeded_rngs(0):
        out = DecodeRandomResizedCrop(size=32)(dict(img_bytes=jpeg_bytes(64, 48)))
    flipped = MAERandomFlip(prob=1.0)(dict(img=out['img']))['img']
    packed = PackMAEInputs()(dict(img=flipped))['inputs']
    assert packed.dtype == torch.uint8 and packed.shape == (3, 32, 32) and packed.is_contiguous()
    assert torch.equal(packed, torch.from_numpy(out['img'][:, ::-1].copy()).permute(2, 0, 1))
