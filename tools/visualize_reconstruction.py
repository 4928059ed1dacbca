"""Show what a ConvMAE pretraining checkpoint reconstructs.

    python tools/visualize_reconstruction.py CKPT IMAGE [IMAGE ...] --out FILE.png
        [--config CFG] [--img-size N] [--seed S] [--mask-ratio R] [--scale K]

One row per image: original | masked input | reconstruction | reconstruction with the visible blocks pasted
back. Each image is resized (shorter side) and centre-cropped to N x N (default: the model's img_size). With a
norm-pix model the predicted patches are un-normalised with each target patch's own mean and variance, as in
MAE. The model is built from ``--config``, else from the config stored in the checkpoint (mmengine writes it
to ``meta.cfg``), else from the single ``*.py`` next to the checkpoint. The PNG is
(rows * N * K) x (4 * N * K) pixels.
"""
import argparse
import glob
import os.path as osp
import sys
from typing import List, Optional

import numpy as np
import torch
from mmengine.config import Config
from PIL import Image

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import convmae_backbone  # noqa: E402,F401
from convmae_backbone.checkpoint import CheckpointError, safe_torch_load  # noqa: E402
from convmae_backbone.data import to_rgb8  # noqa: E402
from convmae_backbone.models.masking import upsample_mask  # noqa: E402
from convmae_backbone.models.utils import patchify, unpatchify  # noqa: E402
from convmae_backbone.models.weights import extract_state_dict  # noqa: E402


def find_config(ckpt_path: str, ckpt: dict, config: Optional[str]) -> Config:
    """``config``, else the config text in the checkpoint's meta, else the single .py next to the checkpoint."""
    if config:
        return Config.fromfile(config)
    text = (ckpt.get('meta') or {}).get('cfg') if isinstance(ckpt, dict) else None
    if text:
        return Config.fromstring(text, '.py')
    candidates = glob.glob(osp.join(osp.dirname(osp.abspath(ckpt_path)), '*.py'))
    if len(candidates) == 1:
        return Config.fromfile(candidates[0])
    raise CheckpointError(f'{ckpt_path} stores no config and there is no single *.py next to it '
                          f'({len(candidates)} found); pass --config')


def build_model(ckpt_path: str, config: Optional[str] = None, mask_ratio: Optional[float] = None):
    """The ConvMAEPretrainer of the config, with the checkpoint's weights, in eval mode."""
    from mmengine.registry import MODELS
    ckpt = safe_torch_load(ckpt_path)
    cfg = find_config(ckpt_path, ckpt, config)
    model_cfg = cfg.model.copy()
    if mask_ratio is not None:
        model_cfg.mask_ratio = mask_ratio
    model = MODELS.build(model_cfg)
    model.load_state_dict(extract_state_dict(ckpt), strict=True)
    return model.eval()


def load_square(path: str, size: int) -> torch.Tensor:
    """Image file -> uint8 (3, size, size): shorter side resized to ``size`` (bicubic), centre crop."""
    with Image.open(path) as img:
        img = to_rgb8(img)
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """images uint8 (B, 3, H, W) -> uint8 panels (B, 4, 3, H, W): original, masked, reconstruction, pasted."""
    pre = model.data_preprocessor
    x = pre(dict(inputs=list(images)), False)['inputs']  # normalised float (B, 3, H, W)
    generator = torch.Generator().manual_seed(seed)
    _, pred, mask = model.forward_mae(x, generator=generator)  # pred (B, L, 768), mask (B, L) True=masked
    p = model.patch_size
    hw = (x.shape[2] // p, x.shape[3] // p)
    if model.norm_pix_loss:
        target = patchify(x, p)
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    recon = unpatchify(pred, hw, p, channels=x.shape[1])
    pixel_mask = upsample_mask(mask.to(x.dtype), hw, p)  # (B, 1, H, W), 1 = masked

    def to_uint8(t: torch.Tensor) -> torch.Tensor:
        return (t * pre.std + pre.mean).round().clamp(0, 255).to(torch.uint8)

    original = images.to(torch.uint8)
    masked = (original.float() * (1 - pixel_mask) + 127 * pixel_mask).to(torch.uint8)
    recon8 = to_uint8(recon)
    pasted = (recon8.float() * pixel_mask + original.float() * (1 - pixel_mask)).to(torch.uint8)
    return torch.stack([original, masked, recon8, pasted], dim=1)


def save_grid(panels: torch.Tensor, out: str, scale: int = 1) -> tuple:
    """uint8 (B, 4, 3, H, W) -> PNG with one row per image; returns the PNG's (width, height)."""
    b, n, c, h, w = panels.shape
    grid = panels.permute(0, 3, 1, 4, 2).reshape(b * h, n * w, c).numpy()
    img = Image.fromarray(grid)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(out)
    return img.size


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description='visualise ConvMAE reconstructions')
    parser.add_argument('checkpoint')
    parser.add_argument('images', nargs='+')
    parser.add_argument('--out', required=True, help='output PNG')
    parser.add_argument('--config', help='model config (default: the one stored with the checkpoint)')
    parser.add_argument('--img-size', type=int, help='input size, a multiple of 16 (default: model img_size)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random mask')
    parser.add_argument('--mask-ratio', type=float, help="override the model's mask ratio")
    parser.add_argument('--scale', type=int, default=1, help='integer upscaling of the PNG')
    args = parser.parse_args(argv)
    model = build_model(args.checkpoint, args.config, args.mask_ratio)
    size = args.img_size or model.pos_grid[0] * model.patch_size
    if size % model.patch_size:
        parser.error(f'--img-size must be a multiple of {model.patch_size}, got {size}')
    images = torch.stack([load_square(p, size) for p in args.images])
    width, height = save_grid(reconstruct(model, images, args.seed), args.out, args.scale)
    print(f'wrote {args.out} ({width}x{height}, {len(args.images)} image(s), mask ratio {model.mask_ratio})')
    return args.out


if __name__ == '__main__':
    main()
