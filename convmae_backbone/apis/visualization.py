"""What a ConvMAE pretraining checkpoint reconstructs (``tools/visualize_reconstruction.py``).

One row per image: original | masked input | reconstruction | reconstruction with the visible blocks pasted
back; for a complementary-masking (Fast ConvMAE) model: original, then per view its masked input and its
reconstruction with the view's visible blocks pasted back. With a norm-pix model the predicted patches are un-normalised with each target patch's own mean and
variance, as in MAE.
"""
import math
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.config import Config
from mmengine.registry import MODELS
from PIL import Image

from ..checkpoint import (CheckpointError, checkpoint_weights, literal_assignments, safe_torch_load,
                          unregistered_types)
from ..datasets import to_rgb8
from ..models import ConvMAEPretrainer
from ..models.pretrainer import RECONSTRUCTION_LOSS
from ..models.arch import check_arch, check_weights_fill, infer_arch, model_arch, parameter_floor
from ..models.masking import upsample_mask
from ..models.utils import unpatchify
from ..models.weights import extract_state_dict, holds_decoder, is_pretraining_only


def stored_config(ckpt: dict, source: str = 'checkpoint') -> Optional[Config]:
    """``Config(model=...)`` of the config text mmengine stores in a loaded checkpoint's ``meta.cfg``, read without
    executing it (:func:`..checkpoint.literal_assignments`), or None if there is none. Raises
    :class:`CheckpointError` naming ``source`` if its ``model`` is not a literal (e.g. it calls a function)."""
    text = (ckpt.get('meta') or {}).get('cfg') if isinstance(ckpt, dict) else None
    if not isinstance(text, str) or not text:
        return None
    values, refused = literal_assignments(text, f'meta.cfg of {source}')
    model = values.get('model')
    unknown = unregistered_types(model, 'model')
    why = (f'is not a literal ({refused["model"]})' if 'model' in refused else 'assigns no model' if model is None
           else f'assigns model a {type(model).__name__}, not a dict' if not isinstance(model, dict) else
           f'names types no registry holds, which mmengine would import by name ({", ".join(unknown[:3])})'
           if unknown else None)
    if why is None:
        try:
            return Config(dict(model=model))
        except Exception as exc:  # noqa: BLE001 - mmengine's ConfigDict refuses some keys in many ways
            why = f'is not a config ({type(exc).__name__}: {str(exc)[:200]})'
    raise CheckpointError(f'the config stored in {source} (meta.cfg) {why}; config text in a checkpoint is never '
                          f'executed: pass --config')


NEEDS = ('give a checkpoint written by tools/pretrain.py, or an official ConvMAE pretraining checkpoint with '
         '--config')


def describe_weights(ckpt) -> str:
    """What a loaded checkpoint holds, in words: 'a ConvMAE pretraining model', 'a detector (...)',
    'a ConvMAE encoder without the decoder (...)', or its top-level key prefixes."""
    weights = checkpoint_weights(ckpt) if isinstance(ckpt, dict) else {}
    raw = {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    if not raw:
        return 'no tensors'
    keys = [k[len('module.'):] if k.startswith('module.') else k for k in raw]
    tops = sorted({k.split('.')[0] for k in keys})
    if any(k.startswith(('decode_head.', 'auxiliary_head.')) for k in keys):
        return f'a segmentor: {", ".join(tops)}'
    if any(k.startswith(('roi_head.', 'rpn_head.', 'bbox_head.')) for k in keys):
        return f'a detector: {", ".join(tops)}'
    state = extract_state_dict(ckpt)
    has_encoder = 'pos_embed' in state and any(k.startswith('blocks3.') for k in state)
    if has_encoder and holds_decoder(state):
        return 'a ConvMAE pretraining model'
    if has_encoder:
        return 'a ConvMAE encoder without the decoder (a backbone export or a fine-tuned backbone)'
    if any(k.startswith('layer1.') for k in keys):
        return f'a ResNet-like network: {", ".join(tops[:8])}'
    return f'a model with top-level weights {", ".join(tops[:8])}{" ..." if len(tops) > 8 else ""}'


def check_pretraining_checkpoint(ckpt_path: str, ckpt) -> None:
    """Raise :class:`CheckpointError` naming the file, what it holds and what is needed unless the loaded
    checkpoint ``ckpt`` holds a ConvMAE pretraining model (encoder and decoder)."""
    kind = describe_weights(ckpt)
    if kind != 'a ConvMAE pretraining model':
        raise CheckpointError(f'{ckpt_path} is not a ConvMAE pretraining checkpoint (it holds {kind}); {NEEDS}')


def find_config(ckpt_path: str, ckpt: dict, config: Optional[str] = None) -> Config:
    """``config``, else the config text mmengine stores in the checkpoint's ``meta.cfg``; raises
    :class:`CheckpointError` if there is neither. Never guessed from other files."""
    if config:
        return Config.fromfile(config)
    stored = stored_config(ckpt, ckpt_path)
    if stored is not None:
        return stored
    raise CheckpointError(f'{ckpt_path} stores no config (no meta.cfg, e.g. an official pretraining checkpoint); '
                          f'pass --config with the pretraining config of the model')


def pretraining_model_config(ckpt_path: str, ckpt: dict, config: Optional[str] = None,
                             mask_ratio: Optional[float] = None) -> Config:
    """The model config of a loaded ConvMAE pretraining checkpoint (:func:`check_pretraining_checkpoint`,
    :func:`find_config`), with ``mask_ratio`` if given."""
    check_pretraining_checkpoint(ckpt_path, ckpt)
    model_cfg = find_config(ckpt_path, ckpt, config).model.copy()
    if mask_ratio is not None:
        model_cfg.mask_ratio = mask_ratio
    return model_cfg


def check_config_sizes(model_cfg: Mapping[str, Any], state: Mapping[str, torch.Tensor], source: str) -> None:
    """Before a ConvMAEPretrainer is built from the config stored in checkpoint ``source``, raise
    :class:`CheckpointError` unless the sizes it gives are those of the weights ``state`` (encoder names): the
    encoder's shape fields (:func:`..models.arch.check_arch`), the position-embedding grid, the decoder's width
    and depth; and unless the weights store at least what the encoder of their shapes holds
    (:func:`..models.arch.check_weights_fill`)."""
    where = f'the config stored in {source} (meta.cfg)'
    try:
        inferred = infer_arch(state)
        check_arch(model_arch(model_cfg), inferred, source)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f'{where} does not fit its weights: {exc}') from None
    check_weights_fill(parameter_floor(inferred), state, source, 'the encoder its shapes claim')
    tokens = int(state['pos_embed'].shape[1])
    decoder = state.get('decoder_embed.weight')
    claimed = dict(decoder_depth=len({k.split('.')[1] for k in state if k.startswith('decoder_blocks.')}),
                   decoder_embed_dim=None if decoder is None else int(decoder.shape[0]))
    grid = model_cfg.get('pos_embed_grid') or model_cfg.get('img_size', inferred['img_size'])
    try:
        stride = math.prod(inferred['patch_sizes'])
        side = (grid, grid) if isinstance(grid, int) else tuple(grid)
        cells = math.prod(side) if model_cfg.get('pos_embed_grid') else math.prod(s // stride for s in side)
        differing = [f'{k}: config {model_cfg[k]!r}, checkpoint {v!r}' for k, v in claimed.items()
                     if k in model_cfg and model_cfg[k] != v]
    except TypeError as exc:
        raise CheckpointError(f'{where} gives sizes that are not numbers: {exc}') from None
    if cells != tokens:
        differing.append(f'position grid: config {grid!r} ({cells} tokens), checkpoint {tokens} tokens')
    if differing:
        raise CheckpointError(f'{where} does not fit its weights, refused before building: ' + '; '.join(differing))


def build_model(ckpt_path: str, config: Optional[str] = None,
                mask_ratio: Optional[float] = None, weights: bool = True) -> ConvMAEPretrainer:
    """The ConvMAEPretrainer of the checkpoint's config (:func:`pretraining_model_config`) in eval mode, with the
    checkpoint's weights (``weights=False``: randomly initialised). Raises :class:`CheckpointError` for anything
    but a ConvMAE pretraining checkpoint. A model trained with ``mimic`` is built without it (the reconstruction
    needs no teacher, whose weights may not be at hand): its ``mimic_heads`` weights are not loaded."""
    ckpt = safe_torch_load(ckpt_path)
    model_cfg = pretraining_model_config(ckpt_path, ckpt, config, mask_ratio)
    model_cls = MODELS.get(model_cfg.get('type'))
    if not (isinstance(model_cls, type) and issubclass(model_cls, ConvMAEPretrainer)):
        raise CheckpointError(f'the config of {ckpt_path} builds a {model_cfg.get("type")!r}, not a '
                              f'ConvMAEPretrainer; {NEEDS}')
    model_cfg.pop('init_cfg', None)  # the weights come from the checkpoint; nothing else is read
    model_cfg.pop('mimic', None)
    state = extract_state_dict(ckpt)
    if not config:
        check_config_sizes(model_cfg, state, ckpt_path)
    try:
        model = MODELS.build(model_cfg)
    except (TypeError, ValueError, KeyError, AssertionError) as exc:  # e.g. an unknown keyword
        where = config or f'the config stored in {ckpt_path} (meta.cfg)'
        raise CheckpointError(f'{where} does not build a ConvMAEPretrainer: {type(exc).__name__}: '
                              f'{str(exc)[:300]}') from None
    if weights:
        own = model.state_dict()
        state = {k: v for k, v in extract_state_dict(ckpt).items() if k in own or not is_pretraining_only(k)}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = ' '.join(str(exc).splitlines()[:3])[:400]
            raise CheckpointError(f'{ckpt_path} does not fit the model of its config ({first}); pass the '
                                  f'--config it was trained with') from exc
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
def reconstruct(model: ConvMAEPretrainer, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """images uint8 (B, 3, H, W) -> uint8 panels (B, 4, 3, H, W): original, masked, reconstruction, pasted; for V
    complementary views (B, 1 + 2V, 3, H, W): original, then masked and pasted of every view (:func:`columns`).
    The random masks are drawn from ``seed``."""
    pre = model.data_preprocessor
    x = pre(dict(inputs=list(images)), False)['inputs']  # normalised float (B, 3, H, W)
    generator = torch.Generator().manual_seed(seed)
    out = model.forward_mae(x, generator=generator)
    pred, mask = out.pred, out.mask  # pred (V*B, L, p*p*3), mask (V*B, L) True=masked
    views = pred.shape[0] // x.shape[0]  # view-major: row k*B + b is view k of image b
    x = x.repeat(views, 1, 1, 1)
    p = model.patch_size
    hw = (x.shape[2] // p, x.shape[3] // p)
    recon = unpatchify(model.predicted_pixels(pred, x), hw, p, channels=x.shape[1])
    pixel_mask = upsample_mask(mask.to(x.dtype), hw, p)  # (V*B, 1, H, W), 1 = masked

    original = images.to(torch.uint8).repeat(views, 1, 1, 1)
    masked = (original.float() * (1 - pixel_mask) + 127 * pixel_mask).to(torch.uint8)
    recon8 = (recon * pre.std + pre.mean).round().clamp(0, 255).to(torch.uint8)
    pasted = (recon8.float() * pixel_mask + original.float() * (1 - pixel_mask)).to(torch.uint8)
    if views == 1:
        return torch.stack([original, masked, recon8, pasted], dim=1)
    b = images.shape[0]
    per_view = [t for k in range(views) for t in (masked[k * b:(k + 1) * b], pasted[k * b:(k + 1) * b])]
    return torch.stack([original[:b], *per_view], dim=1)


def columns(views: int = 1) -> Tuple[str, ...]:
    """Column labels of :func:`reconstruct`'s panels for a model with ``views`` masks per image."""
    if views == 1:
        return COLUMNS
    return ('original', *[label for k in range(1, views + 1) for label in (f'view {k} masked',
                                                                           f'view {k} reconstruction + visible')])


@torch.no_grad()
def reconstruction_error(model: ConvMAEPretrainer, images: torch.Tensor, seed: int = 0) -> float:
    """The model's reconstruction loss (e.g. norm-pix MSE over the masked patches) on images uint8 (B, 3, H, W),
    with the mask drawn from ``seed`` (by a generator on the model's device; on CPU as in :func:`reconstruct`): the
    same masks for any model of the same input size on the same device."""
    x = model.data_preprocessor(dict(inputs=list(images)), False)['inputs']
    out = model.forward_mae(x, generator=torch.Generator(x.device).manual_seed(seed))
    return float(out.losses[RECONSTRUCTION_LOSS])


#: Column labels of the figure; a fifth column shows an untrained model's reconstruction + visible blocks.
COLUMNS = ('original', 'masked', 'reconstruction', 'reconstruction + visible')
UNTRAINED_COLUMN = 'untrained + visible'


def _font(size: int):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)


def label_height(panel_width: int) -> int:
    """Height in pixels of the label band above columns ``panel_width`` pixels wide."""
    return _font_size(panel_width) + 10


def _font_size(panel_width: int) -> int:
    return int(min(20, max(9, panel_width // 13)))


def save_grid(panels: torch.Tensor, out: str, scale: int = 1, labels: Sequence[str] = COLUMNS,
              caption: Sequence[str] = ()) -> Tuple[int, int]:
    """uint8 (B, C, 3, H, W) -> PNG: a band of column ``labels`` (one per C), one row per image upscaled
    ``scale`` times, then the ``caption`` lines (wrapped to the width). Returns the PNG's (width, height):
    ``(C * W * scale, label_height(W * scale) + B * H * scale + caption band)``."""
    import textwrap

    from PIL import ImageDraw
    b, n, c, h, w = panels.shape
    if len(labels) != n:
        raise ValueError(f'{n} columns but {len(labels)} labels')
    grid = Image.fromarray(panels.permute(0, 3, 1, 4, 2).reshape(b * h, n * w, c).numpy())
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    panel_w = w * scale
    size = _font_size(panel_w)
    font, top = _font(size), label_height(panel_w)
    chars = max(20, int(grid.width / (0.55 * size)))
    lines = [part for line in caption for part in textwrap.wrap(line, chars)]
    bottom = (len(lines) * (size + 4) + 10) if lines else 0
    img = Image.new('RGB', (grid.width, top + grid.height + bottom), 'white')
    img.paste(grid, (0, top))
    draw = ImageDraw.Draw(img)
    for i, label in enumerate(labels):
        draw.text((i * panel_w + panel_w / 2, top / 2), label, fill='black', font=font, anchor='mm')
    for i, line in enumerate(lines):
        draw.text((6, top + grid.height + 5 + i * (size + 4)), line, fill='black', font=font)
    img.save(out)
    return img.size


def titled_row(images: Sequence[np.ndarray], title: str, out: str, gap: int = 8) -> Tuple[int, int]:
    """uint8 RGB arrays (H_i, W_i, 3) -> PNG ``out``: scaled to the height of the first, side by side, under
    ``title`` (wrapped). Returns its (width, height)."""
    import textwrap

    from PIL import ImageDraw
    height = images[0].shape[0]
    tiles = [Image.fromarray(a).resize((round(a.shape[1] * height / a.shape[0]), height), Image.BICUBIC)
             for a in images]
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    size = 16
    lines = textwrap.wrap(title, max(20, int(width / (0.55 * size))))
    top = len(lines) * (size + 4) + 10
    img = Image.new('RGB', (width, top + height), 'white')
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((6, 5 + i * (size + 4)), line, fill='black', font=_font(size))
    x = 0
    for tile in tiles:
        img.paste(tile, (x, top))
        x += tile.width + gap
    img.save(out)
    return img.size


def visualize(ckpt_path: str, images: Sequence[str], out: str, config: Optional[str] = None,
              img_size: Optional[int] = None, seed: int = 0, mask_ratio: Optional[float] = None,
              scale: int = 1, compare_untrained: bool = False) -> Tuple[int, int, str]:
    """Write the labelled reconstruction grid (:func:`reconstruct`, :func:`save_grid`) of the image files
    ``images`` to the PNG ``out``, each resized and centre-cropped to ``img_size`` (default: the model's), with
    a caption giving the reconstruction error (:func:`reconstruction_error`) of the model and, with
    ``compare_untrained``, that of the same architecture randomly initialised (seed 0) on the same masks, whose
    reconstruction + visible blocks become a fifth column. Returns the PNG's (width, height) and the caption."""
    model = build_model(ckpt_path, config, mask_ratio)
    size = img_size or model.pos_grid[0] * model.patch_size
    if size % model.patch_size:
        raise ValueError(f'img_size must be a multiple of {model.patch_size}, got {size}')
    batch = torch.stack([load_square(p, size) for p in images])
    views = getattr(model, 'num_views', 1)
    panels, labels = reconstruct(model, batch, seed), columns(views)
    grid = size // model.patch_size
    loss_name = f'{"norm-pix " if model.norm_pix_loss else ""}{model.loss_type.upper()}'
    error = reconstruction_error(model, batch, seed)
    caption = f'{loss_name} over the masked patches: trained {error:.3f}'
    if compare_untrained:
        torch.manual_seed(0)
        untrained = build_model(ckpt_path, config, mask_ratio, weights=False)
        caption += f', untrained (random init, same masks) {reconstruction_error(untrained, batch, seed):.3f}'
        pasted = slice(3, None) if views == 1 else slice(2, None, 2)  # reconstruction + visible column(s)
        panels = torch.cat([panels, reconstruct(untrained, batch, seed)[:, pasted]], dim=1)
        labels = labels + ((UNTRAINED_COLUMN,) if views == 1 else
                           tuple(f'untrained view {k} + visible' for k in range(1, views + 1)))
    masked = (f'{model.mask_ratio:.0%} masked (grey)' if views == 1 else
              f'{views} complementary views, {model.mask_ratio:.0%} of each masked (grey)')
    caption += f'. {size}x{size} px inputs, {grid}x{grid} patches of {model.patch_size} px, {masked}.'

    width, height = save_grid(panels, out, scale, labels, [caption])
    return width, height, caption
