"""Synthetic data and tiny configs for tests and the demo (nothing here is needed to train a real model).

* :func:`write_demo_images`: random views of the photographs shipped with scikit-image (an image folder);
* :func:`write_photo_jpegs`: ImageNet-like JPEGs (500x375, quality 90) made from the same photographs;
* :func:`write_coco_dataset`, :func:`write_ade_dataset`: tiny COCO-layout instance-segmentation and
  ADE20K-layout semantic-segmentation datasets (coloured rectangles and ellipses on textured backgrounds);
* :func:`tiny_det_config`, :func:`tiny_vitdet_config`, :func:`tiny_seg_config`: the full Mask R-CNN (FPN and
  simple-pyramid) and UperNet configs of ``configs/`` with a small backbone, small heads and a CPU runtime;
* :func:`run_train_tool`, :func:`read_val_metrics`: mmdet's / mmseg's own ``tools/train.py`` on a config, and
  the validation metrics it logged;
* :class:`TinyTeacher`: a small frozen-teacher stand-in for the feature-mimicking objective (CLIP and DINO
  weights cannot be downloaded in tests).
* :func:`write_tiny_detectron2_config`: a detectron2 LazyConfig of ``configs/detectron2`` with a small backbone,
  small heads, tiny images, a CPU runtime and given datasets (for ``tools/d2_train.py``).
"""
import importlib
import json
import math
import os
import os.path as osp
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.config import Config
from PIL import Image, ImageDraw
from torch import Tensor, nn

from .registry import register
from .resources import PACKAGE_DIR, config_path

DEMO_CONFIG = config_path('pretrain/convmae-tiny_demo.py')
DET_CONFIG = config_path('mmdet/mask-rcnn_convmae-b_fpn_lsj-25e_coco.py')
VITDET_CONFIG = config_path('mmdet/mask-rcnn_convmae-b_simplefpn_lsj-25e_coco.py')
SEG_CONFIG = config_path('mmseg/upernet_convmae-b_8xb2-160k_ade20k-512x512.py')

# Photographs shipped inside scikit-image (no download needed).
DEMO_PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'camera', 'coins', 'moon', 'immunohistochemistry',
               'hubble_deep_field', 'retina', 'clock', 'brick', 'grass', 'gravel')

DET_CLASSES = ('rectangle', 'ellipse')
# The tiny segmentation dataset reuses the first three ADE20K class names (ADE20KDataset only accepts its own
# names): 'wall' = background, 'building' = rectangles, 'sky' = ellipses. PNG values are 1..3 (0 = ignore),
# as in ADE20K with reduce_zero_label.
SEG_CLASSES = ('wall', 'building', 'sky')
SEG_PALETTE = [[120, 120, 120], [180, 120, 120], [6, 230, 230]]

#: The tiny architecture of the tests, the demo's fine-tuning configs and quick benchmarks (ConvViT keywords), its
#: decoder for the pretrainer, and the backbone keywords of the tiny downstream configs.
TINY_ENCODER = dict(embed_dims=(32, 48, 96), depths=(1, 1, 2), num_heads=4, mlp_ratios=(4, 4, 4))
TINY_DECODER = dict(decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4)
TINY_BACKBONE = dict(TINY_ENCODER, img_size=64)
TINY_DET_CHANNELS = 64  # pyramid and head channels of the tiny detection configs


# ------------------------------------------------------------------------------------------------- data
def write_demo_images(out_dir: str, views_per_photo: int = 40, size: int = 128, seed: int = 0,
                      val_views_per_photo: int = 10) -> int:
    """Write ``views_per_photo`` random square crops (``size`` pixels, JPEG) of each scikit-image sample photo
    into ``out_dir/train/<photo>/``, and ``val_views_per_photo`` other crops into ``out_dir/val/<photo>/`` (the
    k-NN monitor's task: which photograph is this crop from); grayscale photos stay grayscale. Pretraining
    reads only ``train/``. Returns the number of training views written."""
    from skimage import data as skdata  # optional dependency, only for the demo
    rngs = {'train': np.random.default_rng(seed), 'val': np.random.default_rng([seed, 1])}
    count = 0
    for name in DEMO_PHOTOS:
        photo = Image.fromarray(getattr(skdata, name)())
        w, h = photo.size
        for split, views in (('train', views_per_photo), ('val', val_views_per_photo)):
            rng = rngs[split]
            folder = osp.join(out_dir, split, name)
            os.makedirs(folder, exist_ok=True)
            for k in range(views):
                side = int(min(w, h) * rng.uniform(0.35, 1.0))
                x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
                view = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
                view.save(osp.join(folder, f'{name}_{k:03d}.jpg'), quality=92)
                count += split == 'train'
    return count


def write_photo_jpegs(out_dir: str, num_images: int, size: Tuple[int, int] = (500, 375), quality: int = 90,
                      seed: int = 0) -> List[str]:
    """Write ``num_images`` RGB JPEGs of ``size`` (width, height) at ``quality`` into ``out_dir/train/<photo>/``:
    random crops of the scikit-image photographs (cycling through :data:`DEMO_PHOTOS`) with the aspect ratio of
    ``size``, covering 50-100% of the photo's width, resized (bicubic) to ``size``. Returns the paths, sorted."""
    from skimage import data as skdata  # optional dependency, only for tests and benchmarks
    rng = np.random.default_rng(seed)
    photos = {name: Image.fromarray(getattr(skdata, name)()).convert('RGB') for name in DEMO_PHOTOS}
    paths = []
    for k in range(num_images):
        name = DEMO_PHOTOS[k % len(DEMO_PHOTOS)]
        photo = photos[name]
        w = min(photo.width, photo.height * size[0] / size[1]) * rng.uniform(0.5, 1.0)
        h = w * size[1] / size[0]
        x, y = rng.uniform(0, photo.width - w), rng.uniform(0, photo.height - h)
        folder = osp.join(out_dir, 'train', name)
        os.makedirs(folder, exist_ok=True)
        paths.append(osp.join(folder, f'{name}_{k:05d}.jpg'))
        photo.resize(size, Image.BICUBIC, box=(x, y, x + w, y + h)).save(paths[-1], quality=quality)
    return sorted(paths)


def _textured_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth random colour field plus stripes and pixel noise, uint8 (h, w, 3)."""
    coarse = rng.uniform(40, 200, size=(4, 4, 3))
    field = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 14)
    stripes = 18 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    img = field + stripes[..., None] + rng.normal(0, 8, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_polygon(kind: str, box: Tuple[float, float, float, float]) -> List[float]:
    """Flat [x0, y0, x1, y1, ...] outline of a rectangle, or a 24-gon ellipse, filling ``box``."""
    x0, y0, x1, y1 = box
    if kind == 'rectangle':
        return [x0, y0, x1, y0, x1, y1, x0, y1]
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    pts = []
    for k in range(24):
        t = 2 * math.pi * k / 24
        pts += [cx + rx * math.cos(t), cy + ry * math.sin(t)]
    return pts


def _polygon_area(poly: Sequence[float]) -> float:
    xs, ys = np.asarray(poly[0::2]), np.asarray(poly[1::2])
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def _draw_scene(rng: np.random.Generator, h: int, w: int):
    """A textured image with 1..3 non-overlapping shapes; returns (uint8 (h, w, 3), [(kind, polygon, bbox)])."""
    img = Image.fromarray(_textured_background(rng, h, w))
    draw = ImageDraw.Draw(img)
    shapes, taken = [], []
    for _ in range(int(rng.integers(1, 4))):
        for _attempt in range(20):
            bw, bh = rng.uniform(0.22, 0.45) * w, rng.uniform(0.22, 0.45) * h
            x0, y0 = rng.uniform(2, w - bw - 2), rng.uniform(2, h - bh - 2)
            box = (x0, y0, x0 + bw, y0 + bh)
            if all(box[2] < t[0] or box[0] > t[2] or box[3] < t[1] or box[1] > t[3] for t in taken):
                break
        else:
            continue
        taken.append(box)
        kind = DET_CLASSES[int(rng.integers(len(DET_CLASSES)))]
        # Rectangles in warm, ellipses in cold colours, so appearance carries the class.
        colour = (tuple(int(c) for c in rng.integers([170, 20, 20], [255, 110, 90])) if kind == 'rectangle'
                  else tuple(int(c) for c in rng.integers([20, 60, 170], [90, 160, 255])))
        poly = _shape_polygon(kind, box)
        draw.polygon(poly, fill=colour, outline=(0, 0, 0))
        shapes.append((kind, poly, box))
    return np.asarray(img), shapes


def write_coco_dataset(root: str, num_train: int = 8, num_val: int = 4, size: Tuple[int, int] = (128, 128),
                       seed: int = 0) -> str:
    """COCO layout under ``root``: ``train/``, ``val/`` JPEGs of ``size`` (h, w) and
    ``annotations/instances_{train,val}.json`` (polygons, :data:`DET_CLASSES`). Returns ``root``."""
    rng = np.random.default_rng(seed)
    h, w = size
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(DET_CLASSES)]
    ann_id = 1
    for split, count in (('train', num_train), ('val', num_val)):
        os.makedirs(osp.join(root, split), exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            img, shapes = _draw_scene(rng, h, w)
            name = f'{split}_{i:04d}.jpg'
            Image.fromarray(img).save(osp.join(root, split, name), quality=95)
            images.append(dict(id=i + 1, file_name=name, height=h, width=w))
            for kind, poly, (x0, y0, x1, y1) in shapes:
                annotations.append(dict(id=ann_id, image_id=i + 1, category_id=DET_CLASSES.index(kind) + 1,
                                        bbox=[x0, y0, x1 - x0, y1 - y0], area=_polygon_area(poly),
                                        segmentation=[poly], iscrowd=0))
                ann_id += 1
        os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
        with open(osp.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
            json.dump(dict(images=images, annotations=annotations, categories=categories), f)
    return root


def write_ade_dataset(root: str, num_train: int = 8, num_val: int = 4, size: Tuple[int, int] = (96, 128),
                      seed: int = 1) -> str:
    """ADE20K layout under ``root``: ``images/{training,validation}/*.jpg`` of ``size`` (h, w) and
    ``annotations/.../*.png`` (values 1..3, :data:`SEG_CLASSES`). Returns ``root``."""
    rng = np.random.default_rng(seed)
    h, w = size
    for split, count in (('training', num_train), ('validation', num_val)):
        os.makedirs(osp.join(root, 'images', split), exist_ok=True)
        os.makedirs(osp.join(root, 'annotations', split), exist_ok=True)
        for i in range(count):
            img, shapes = _draw_scene(rng, h, w)
            label = Image.new('L', (w, h), 1)  # background 'wall'
            draw = ImageDraw.Draw(label)
            for kind, poly, _ in shapes:
                draw.polygon(poly, fill=2 if kind == 'rectangle' else 3)
            stem = f'ADE_{split}_{i:08d}'
            Image.fromarray(img).save(osp.join(root, 'images', split, stem + '.jpg'), quality=95)
            label.save(osp.join(root, 'annotations', split, stem + '.png'))
    return root


# ---------------------------------------------------------------------------------------------- configs
def _transform(pipeline: list, type_name: str) -> dict:
    for t in pipeline:
        if t['type'] == type_name:
            return t
    raise KeyError(f'no {type_name} in pipeline {[t["type"] for t in pipeline]}')


def _tiny_model_and_runtime(cfg: Config, backbone: Optional[dict], checkpoint: Optional[str], work_dir: str,
                            lr: float, warmup_iters: int, seed: int) -> dict:
    """The parts both tiny configs shrink alike: the backbone (``backbone`` keywords, weights from
    ``checkpoint``), warm-up, and a CPU runtime. Returns the backbone keywords used."""
    backbone = dict(TINY_BACKBONE if backbone is None else backbone)
    cfg_backbone = cfg.model.backbone
    cfg_backbone.update(backbone, drop_path_rate=0.0)
    cfg_backbone['init_cfg'] = dict(type='Pretrained', checkpoint=checkpoint) if checkpoint else None
    if cfg_backbone.get('window_size'):
        cfg_backbone['window_size'] = 2  # the 16x16 windows of the full model would exceed tiny maps
        cfg_backbone['global_attn_indexes'] = (backbone['depths'][2] - 1,)
    cfg.param_scheduler[0].end = warmup_iters
    cfg.work_dir = work_dir
    cfg.optim_wrapper.type = 'OptimWrapper'  # no AMP on CPU
    cfg.optim_wrapper.optimizer.lr = lr
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint.update(interval=1, max_keep_ckpts=1)
    cfg.env_cfg.cudnn_benchmark = False
    cfg.randomness = dict(seed=seed, deterministic=False)
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[key].update(num_workers=0, persistent_workers=False)
    cfg.train_dataloader.batch_size = 2
    return backbone


def tiny_det_config(data_root: str, work_dir: str, backbone: Optional[dict] = None,
                    checkpoint: Optional[str] = None, image_size: int = 128, max_epochs: int = 1,
                    lr: float = 2e-4, warmup_iters: int = 2, seed: int = 0) -> Config:
    """The full Mask R-CNN config with a small backbone (``backbone``: ConvMAE keywords, default
    :data:`TINY_BACKBONE`), 64-channel FPN/heads, BN, batch 2 and the tiny COCO dataset at ``data_root``.

    Kept from the full config: LSJ pipeline (at ``image_size``), windowed stage 3 with rel-pos bias, 2-conv
    RPN, 4conv1fc box head, AdamW with its weight-decay rules, warm-up + cosine schedule, CocoMetric.
    """
    cfg = Config.fromfile(DET_CONFIG)
    dims = _tiny_model_and_runtime(cfg, backbone, checkpoint, work_dir, lr, warmup_iters, seed)['embed_dims']
    norm = dict(type='BN', requires_grad=True)
    cfg.model.neck.update(in_channels=[dims[0], dims[1], dims[2], dims[2]], out_channels=TINY_DET_CHANNELS,
                          norm_cfg=norm)
    _tiny_mask_rcnn(cfg, data_root, image_size, norm)
    cfg.train_cfg.update(max_epochs=max_epochs, val_interval=max_epochs)
    cfg.param_scheduler[1].end = max_epochs
    return cfg


def tiny_vitdet_config(data_root: str, work_dir: str, backbone: Optional[dict] = None,
                       checkpoint: Optional[str] = None, image_size: int = 96, max_iters: int = 4,
                       lr: float = 2e-4, warmup_iters: int = 2, seed: int = 0) -> Config:
    """The full ViTDet-style Mask R-CNN config with a small backbone (``backbone``: ConvMAE keywords, default
    :data:`TINY_BACKBONE`, whose ``img_size`` becomes the grid of ``pos_embed``), 64-channel pyramid and heads,
    batch 2, ``max_iters`` iterations and the tiny COCO dataset at ``data_root``.

    Kept from the full config: the H/16 map alone, windows of 4 tokens padded with zeros (a 96 input's 6x6 grid
    pads to 8x8) and one global block, decomposed relative position with global tables for ``image_size``,
    the simple pyramid, LN heads, LSJ pipeline (at ``image_size``), AdamW with layer decay 0.8 and the ViTDet
    rules, warm-up + steps (at 3/4 and 7/8 of the iterations), CocoMetric.
    """
    cfg = Config.fromfile(VITDET_CONFIG)
    tiny = _tiny_model_and_runtime(cfg, backbone, checkpoint, work_dir, lr, warmup_iters, seed)
    cfg.model.backbone.update(img_size=image_size, pos_embed_grid=tiny['img_size'] // 16, window_size=4)
    cfg.model.neck.update(in_channels=tiny['embed_dims'][2], out_channels=TINY_DET_CHANNELS)
    _tiny_mask_rcnn(cfg, data_root, image_size, cfg.model.roi_head.bbox_head.norm_cfg)
    cfg.optim_wrapper.paramwise_cfg.num_layers = tiny['depths'][2]
    cfg.train_cfg.update(max_iters=max_iters, val_interval=max_iters)
    cfg.param_scheduler[1].update(end=max_iters, milestones=[max_iters * 3 // 4, max_iters * 7 // 8])
    cfg.default_hooks.checkpoint.interval = max_iters
    return cfg


def _tiny_mask_rcnn(cfg: Config, data_root: str, image_size: int, norm: dict) -> None:
    """Shrink the Mask R-CNN heads of a full detection config to :data:`TINY_DET_CHANNELS` channels with
    ``norm``, and point its data at the tiny COCO set at ``data_root`` with ``image_size`` LSJ."""
    ch = TINY_DET_CHANNELS
    model = cfg.model
    model.rpn_head.update(in_channels=ch, feat_channels=ch)
    roi = model.roi_head
    roi.bbox_roi_extractor.out_channels = ch
    roi.mask_roi_extractor.out_channels = ch
    roi.bbox_head.update(in_channels=ch, conv_out_channels=ch, fc_out_channels=128, norm_cfg=norm,
                         num_classes=len(DET_CLASSES))
    roi.mask_head.update(in_channels=ch, conv_out_channels=ch, norm_cfg=norm, num_classes=len(DET_CLASSES))
    model.train_cfg.rpn_proposal.update(nms_pre=500, max_per_img=200)
    model.train_cfg.rcnn.sampler.num = 64
    model.test_cfg.rpn.update(nms_pre=500, max_per_img=100)
    size = (image_size, image_size)
    model.data_preprocessor.batch_augments[0]['size'] = size
    model.data_preprocessor.pad_size_divisor = 32  # the full configs pad test images to 1024x1024

    metainfo = dict(classes=DET_CLASSES)
    train_set = cfg.train_dataloader.dataset.dataset  # inside the base's RepeatDataset
    train_set.update(data_root=data_root, ann_file='annotations/instances_train.json',
                     data_prefix=dict(img='train/'), metainfo=metainfo)
    _transform(train_set.pipeline, 'RandomResize')['scale'] = size
    _transform(train_set.pipeline, 'RandomCrop')['crop_size'] = size
    for key in ('val_dataloader', 'test_dataloader'):
        cfg[key].dataset.update(data_root=data_root, ann_file='annotations/instances_val.json',
                                data_prefix=dict(img='val/'), metainfo=metainfo)
        _transform(cfg[key].dataset.pipeline, 'Resize')['scale'] = size
    for key in ('val_evaluator', 'test_evaluator'):
        cfg[key].ann_file = osp.join(data_root, 'annotations', 'instances_val.json')


def tiny_seg_config(data_root: str, work_dir: str, backbone: Optional[dict] = None,
                    checkpoint: Optional[str] = None, max_iters: int = 8, lr: float = 2e-4,
                    seed: int = 0) -> Config:
    """The full UperNet config with a small backbone (``backbone``: ConvMAE keywords, default
    :data:`TINY_BACKBONE`), 64-channel heads, BN, batch 2, 64x64 crops and the tiny ADE20K dataset at
    ``data_root``.

    Kept from the full config: ADE20K pipeline, rel-pos bias, layer scale, AdamW with layer-wise lr decay,
    warm-up (2 iterations) + poly schedule, sliding-window test, IoUMetric.
    """
    cfg = Config.fromfile(SEG_CONFIG)
    warmup_iters, crop = 2, 64
    backbone = _tiny_model_and_runtime(cfg, backbone, checkpoint, work_dir, lr, warmup_iters, seed)
    dims, norm = backbone['embed_dims'], dict(type='BN', requires_grad=True)
    model = cfg.model
    crop_size = (crop, crop)
    model.data_preprocessor.size = crop_size
    model.decode_head.update(in_channels=[dims[0], dims[1], dims[2], dims[2]], channels=64, norm_cfg=norm,
                             num_classes=len(SEG_CLASSES))
    model.auxiliary_head.update(in_channels=dims[2], channels=32, norm_cfg=norm, num_classes=len(SEG_CLASSES))
    model.test_cfg.update(crop_size=crop_size, stride=(crop * 2 // 3, crop * 2 // 3))
    cfg.optim_wrapper.paramwise_cfg.num_layers = backbone['depths'][2]

    metainfo = dict(classes=SEG_CLASSES, palette=SEG_PALETTE)
    scale = (4 * crop, crop)  # the full config's (2048, 512) for 512 crops
    cfg.train_dataloader.dataset.update(data_root=data_root, metainfo=metainfo)
    _transform(cfg.train_dataloader.dataset.pipeline, 'RandomResize')['scale'] = scale
    _transform(cfg.train_dataloader.dataset.pipeline, 'RandomCrop')['crop_size'] = crop_size
    for key in ('val_dataloader', 'test_dataloader'):
        cfg[key].dataset.update(data_root=data_root, metainfo=metainfo)
        _transform(cfg[key].dataset.pipeline, 'Resize')['scale'] = scale

    cfg.train_cfg.update(max_iters=max_iters, val_interval=max_iters)
    cfg.param_scheduler[1].update(begin=warmup_iters, end=max_iters)
    cfg.default_hooks.checkpoint.interval = max_iters
    return cfg


#: The tiny encoder as the official ViTDet-style ``ConvViT`` arguments (windows of 2 tokens in block 0).
TINY_D2_NET = dict(img_size=TINY_BACKBONE['img_size'], embed_dim=TINY_ENCODER['embed_dims'],
                   depth=TINY_ENCODER['depths'], num_heads=TINY_ENCODER['num_heads'], window_size=2,
                   window_block_indexes=[0], drop_path_rate=0.0)
_TINY_D2_CONFIG = """\
# {base} with the tiny encoder, small heads, {size}x{size} images and a CPU runtime (convmae_backbone.testing)
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig
from detectron2.layers import ShapeSpec

_base = LazyConfig.load({base!r})
model, dataloader, optimizer, lr_multiplier, train = (_base.model, _base.dataloader, _base.optimizer,
                                                      _base.lr_multiplier, _base.train)
model.backbone.net.update({net!r})
model.backbone.square_pad = {size}
model.proposal_generator.update(pre_nms_topk=(200, 100), post_nms_topk=(100, 50), batch_size_per_image=64)
model.roi_heads.update(num_classes={num_classes}, batch_size_per_image=32)
model.roi_heads.box_head.update(conv_dims=[16], fc_dims=[32])
model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=32)
model.roi_heads.mask_head.conv_dims = [16]
dataloader.train.dataset.names = {train_set!r}
dataloader.test.dataset.names = {test_set!r}
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(min_scale=0.5, max_scale=1.5, target_height={size}, target_width={size}),
    L(T.FixedSizeCrop)(crop_size=({size}, {size}), pad=False),
]
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length={size}, max_size={size})]
dataloader.train.update(total_batch_size=2, num_workers=0)
dataloader.test.num_workers = 0
train.update(device='cpu', max_iter={max_iter}, eval_period={max_iter}, log_period=1)
train.amp.enabled = False
train.ddp.fp16_compression = False
train.checkpointer = dict(period={checkpoint_period}, max_to_keep=10)
"""


def write_tiny_detectron2_config(path: str, train_set: str, test_set: str, max_iter: int = 4,
                                 checkpoint_period: int = 2, num_classes: int = len(DET_CLASSES),
                                 size: int = 64) -> str:
    """Write (to ``path``) ``configs/detectron2/mask_rcnn_vitdet_convmae_b_25ep.py`` with :data:`TINY_D2_NET`,
    small heads, LSJ at ``size`` pixels, batch 2, ``max_iter`` CPU iterations (checkpoints every
    ``checkpoint_period``, evaluation at the end) on the registered datasets ``train_set`` / ``test_set``.
    Returns ``path``."""
    text = _TINY_D2_CONFIG.format(base=config_path('detectron2/mask_rcnn_vitdet_convmae_b_25ep.py'),
                                  net=TINY_D2_NET, size=size, num_classes=num_classes, train_set=train_set,
                                  test_set=test_set, max_iter=max_iter, checkpoint_period=checkpoint_period)
    with open(path, 'w') as f:
        f.write(text)
    return path


# ---------------------------------------------------------------------------------------------- running
def child_env() -> dict:
    """This environment with the folder this package is imported from on ``PYTHONPATH`` (for subprocesses that
    import it)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(PACKAGE_DIR.parent),
                                                                   os.environ.get('PYTHONPATH')) if p))


def run_train_tool(scope: str, config_path: str, work_dir: str, extra: Sequence[str] = (),
                   echo: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run mmdet's or mmseg's own ``tools/train.py`` (shipped in the package's ``.mim``) on a config file, in
    ``work_dir`` (10 minutes at most), its output captured; lines starting with ``echo`` are also printed as
    they come."""
    tool = osp.join(osp.dirname(importlib.import_module(scope).__file__), '.mim', 'tools', 'train.py')
    cmd = [sys.executable, tool, config_path, '--work-dir', work_dir, *extra]
    if echo is None:
        return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600, cwd=work_dir)
    lines = []
    with subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=work_dir) as proc:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(echo):
                print(line, end='', flush=True)
        rc = proc.wait(timeout=600)
    return subprocess.CompletedProcess(cmd, rc, ''.join(lines), '')


def read_val_metrics(work_dir: str) -> Dict[str, float]:
    """The last validation entry of the newest run's ``vis_data/scalars.json`` (mmengine's LocalVisBackend)."""
    runs = sorted(d for d in os.listdir(work_dir) if osp.isfile(osp.join(work_dir, d, 'vis_data', 'scalars.json')))
    if not runs:
        raise FileNotFoundError(f'no vis_data/scalars.json under {work_dir}')
    metrics = {}
    with open(osp.join(work_dir, runs[-1], 'vis_data', 'scalars.json')) as f:
        for line in f:
            entry = json.loads(line)
            if not any(k in entry for k in ('lr', 'loss')):  # training lines carry lr/loss
                metrics = entry
    return metrics


# ------------------------------------------------------------------------------------------------ teacher
@register('MODELS')
class TinyTeacher(nn.Module):
    """A small ViT-like teacher with timm's interface (``forward_features``, ``num_features``,
    ``num_prefix_tokens``, ``cls_token``) for tests of feature mimicking: a ``patch_size`` patch embedding, a
    non-linearity and a LayerNorm; the class token is its parameter plus the mean of the patch tokens. Its
    weights are drawn from ``seed``, not from the global RNG, so that every build (each DDP process, a resumed
    run) is the same teacher.

    ``output='tokens'``: forward_features (B, 3, H, W) -> (B, 1 + (H/p)*(W/p), C); ``'map'``: (B, C, H/p, W/p),
    without class token.
    """

    def __init__(self, embed_dim: int = 24, patch_size: int = 8, in_channels: int = 3, seed: int = 0,
                 output: str = 'tokens'):
        super().__init__()
        if output not in ('tokens', 'map'):
            raise ValueError(f"output must be 'tokens' or 'map', got {output!r}")
        self.num_features, self.output = embed_dim, output
        self.num_prefix_tokens = 1 if output == 'tokens' else 0
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if output == 'tokens' else None
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)

    def forward_features(self, x: Tensor) -> Tensor:
        t = self.norm(torch.tanh(self.patch_embed(x).permute(0, 2, 3, 1)))  # (B, h, w, C)
        if self.output == 'map':
            return t.permute(0, 3, 1, 2)
        t = t.flatten(1, 2)
        return torch.cat([self.cls_token + t.mean(dim=1, keepdim=True), t], dim=1)
