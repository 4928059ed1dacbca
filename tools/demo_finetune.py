"""Fine-tune a small pretrained ConvMAE on tiny synthetic detection and segmentation datasets.

    python tools/demo_finetune.py --backbone work_dirs/demo/backbone.pth --work-dir work_dirs/demo_finetune

Writes a tiny COCO-layout instance-segmentation dataset and a tiny ADE20K-layout semantic-segmentation
dataset (coloured rectangles and ellipses on textured backgrounds), derives small Mask R-CNN and UperNet
configs from the two full configs in configs/ (same pipelines, heads and optimizers; shrunk sizes, channels
and schedules), trains each for a few iterations from the backbone weights with mmdet's / mmseg's runner,
evaluates, and prints bbox/segm mAP and mIoU.

The backbone architecture (embed dims, depths, MLP ratios, pretraining image size and, where the checkpoint
records its config, the number of heads) is read from the checkpoint. The helpers here are also used by
tests/test_downstream_train.py.
"""
import argparse
import glob
import json
import math
import os
import os.path as osp
import re
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DET_CONFIG = osp.join(REPO, 'configs', 'mmdet', 'mask-rcnn_convmae-b_fpn_lsj-25e_coco.py')
SEG_CONFIG = osp.join(REPO, 'configs', 'mmseg', 'upernet_convmae-b_8xb2-160k_ade20k-512x512.py')

DET_CLASSES = ('rectangle', 'ellipse')
# The tiny segmentation dataset reuses the first three ADE20K class names (ADE20KDataset only accepts its own
# names): 'wall' = background, 'building' = rectangles, 'sky' = ellipses. PNG values are 1..3 (0 = ignore),
# as in ADE20K with reduce_zero_label.
SEG_CLASSES = ('wall', 'building', 'sky')
SEG_PALETTE = [[120, 120, 120], [180, 120, 120], [6, 230, 230]]

TINY_BACKBONE = dict(img_size=64, embed_dims=(32, 48, 96), depths=(1, 1, 2), num_heads=4, mlp_ratios=(4, 4, 4))


# ----------------------------------------------------------------------------------------------- data
def _textured_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth random colour field plus stripes and pixel noise, uint8 (h, w, 3)."""
    coarse = rng.uniform(40, 200, size=(4, 4, 3))
    field = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 14)
    stripes = 18 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    img = field + stripes[..., None] + rng.normal(0, 8, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_polygon(kind: str, box: Tuple[float, float, float, float], n: int = 24) -> List[float]:
    x0, y0, x1, y1 = box
    if kind == 'rectangle':
        return [x0, y0, x1, y0, x1, y1, x0, y1]
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        pts += [cx + rx * math.cos(t), cy + ry * math.sin(t)]
    return pts


def _polygon_area(poly: Sequence[float]) -> float:
    xs, ys = np.asarray(poly[0::2]), np.asarray(poly[1::2])
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def _draw_scene(rng: np.random.Generator, h: int, w: int, max_shapes: int = 3):
    """A textured image with 1..max_shapes non-overlapping shapes; returns (image, [(kind, polygon, bbox)])."""
    img = Image.fromarray(_textured_background(rng, h, w))
    draw = ImageDraw.Draw(img)
    shapes, taken = [], []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
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
    """COCO layout: ``train/``, ``val/`` JPEGs and ``annotations/instances_{train,val}.json`` (polygons)."""
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
    """ADE20K layout: ``images/{training,validation}/*.jpg`` and ``annotations/.../*.png`` (values 1..3)."""
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


# -------------------------------------------------------------------------------------------- configs
def _transform(pipeline: list, type_name: str) -> dict:
    for t in pipeline:
        if t['type'] == type_name:
            return t
    raise KeyError(f'no {type_name} in pipeline {[t["type"] for t in pipeline]}')


def _tiny_backbone(cfg_backbone: dict, backbone: dict, checkpoint: Optional[str]) -> None:
    depth3 = backbone['depths'][2]
    cfg_backbone.update(backbone)
    cfg_backbone['drop_path_rate'] = 0.0
    cfg_backbone['init_cfg'] = dict(type='Pretrained', checkpoint=checkpoint) if checkpoint else None
    if cfg_backbone.get('window_size'):
        cfg_backbone['window_size'] = 2  # the 16x16 windows of the full model would exceed tiny maps
        cfg_backbone['global_attn_indexes'] = (depth3 - 1,)


def _tiny_runtime(cfg, work_dir: str, lr: float, seed: int) -> None:
    cfg.work_dir = work_dir
    cfg.optim_wrapper.type = 'OptimWrapper'  # no AMP on CPU
    cfg.optim_wrapper.optimizer.lr = lr
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint.update(interval=1, max_keep_ckpts=1)
    cfg.env_cfg.cudnn_benchmark = False
    cfg.randomness = dict(seed=seed, deterministic=False)
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[key].update(num_workers=0, persistent_workers=False)


def tiny_det_config(data_root: str, work_dir: str, backbone: Optional[dict] = None,
                    checkpoint: Optional[str] = None, image_size: int = 128, max_epochs: int = 1,
                    batch_size: int = 2, lr: float = 2e-4, warmup_iters: int = 2, seed: int = 0):
    """The full Mask R-CNN config with a small backbone, 64-channel FPN/heads, BN and the tiny COCO dataset.

    Kept from the full config: LSJ pipeline (at ``image_size``), windowed stage 3 with rel-pos bias, 2-conv
    RPN, 4conv1fc box head, AdamW with its weight-decay rules, warm-up + cosine schedule, CocoMetric.
    """
    from mmengine.config import Config
    cfg = Config.fromfile(DET_CONFIG)
    backbone = dict(TINY_BACKBONE if backbone is None else backbone)
    dims, ch, norm = backbone['embed_dims'], 64, dict(type='BN', requires_grad=True)
    model = cfg.model
    _tiny_backbone(model.backbone, backbone, checkpoint)
    model.neck.update(in_channels=[dims[0], dims[1], dims[2], dims[2]], out_channels=ch, norm_cfg=norm)
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
    cfg.train_dataloader.batch_size = batch_size

    cfg.train_cfg.update(max_epochs=max_epochs, val_interval=max_epochs)
    cfg.param_scheduler[0].end = warmup_iters
    cfg.param_scheduler[1].end = max_epochs
    _tiny_runtime(cfg, work_dir, lr, seed)
    return cfg


def tiny_seg_config(data_root: str, work_dir: str, backbone: Optional[dict] = None,
                    checkpoint: Optional[str] = None, crop: int = 64, max_iters: int = 8, batch_size: int = 2,
                    lr: float = 2e-4, warmup_iters: int = 2, seed: int = 0):
    """The full UperNet config with a small backbone, 64-channel heads, BN and the tiny ADE20K dataset.

    Kept from the full config: ADE20K pipeline (crops of ``crop``), rel-pos bias, layer scale, AdamW with
    layer-wise lr decay, warm-up + poly schedule, sliding-window test, IoUMetric.
    """
    from mmengine.config import Config
    cfg = Config.fromfile(SEG_CONFIG)
    backbone = dict(TINY_BACKBONE if backbone is None else backbone)
    dims, norm = backbone['embed_dims'], dict(type='BN', requires_grad=True)
    model = cfg.model
    _tiny_backbone(model.backbone, backbone, checkpoint)
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
    cfg.train_dataloader.batch_size = batch_size

    cfg.train_cfg.update(max_iters=max_iters, val_interval=max_iters)
    cfg.param_scheduler[0].end = warmup_iters
    cfg.param_scheduler[1].update(begin=warmup_iters, end=max_iters)
    _tiny_runtime(cfg, work_dir, lr, seed)
    cfg.default_hooks.checkpoint.interval = max_iters
    return cfg


# ---------------------------------------------------------------------------------- backbone inference
def infer_backbone(path: str, num_heads: Optional[int] = None) -> dict:
    """ConvMAE kwargs (img_size, embed_dims, depths, num_heads, mlp_ratios) of the encoder in ``path``.

    Shapes give everything but the number of heads. That comes from ``num_heads``, else from the config an
    mmengine checkpoint records in ``meta.cfg``, else from the pretraining config in configs/pretrain/ with
    the same architecture, else 32-channel heads are assumed.
    """
    from convmae_backbone.checkpoint import safe_torch_load
    from convmae_backbone.models.weights import extract_state_dict
    ckpt = safe_torch_load(path)
    state = extract_state_dict(ckpt)
    dims = tuple(int(state[f'patch_embed{i}.proj.weight'].shape[0]) for i in (1, 2, 3))
    depths = tuple(1 + max(int(m.group(1)) for k in state for m in [re.match(rf'blocks{i}\.(\d+)\.', k)] if m)
                   for i in (1, 2, 3))
    ratios = tuple(state[f'blocks{i}.0.mlp.fc1.weight'].shape[0] / dims[i - 1] for i in (1, 2, 3))
    img_size = 16 * int(round(state['pos_embed'].shape[1] ** 0.5))
    arch = dict(img_size=img_size, embed_dims=dims, depths=depths,
                mlp_ratios=tuple(int(r) if float(r).is_integer() else float(r) for r in ratios))
    for source in (lambda: num_heads, lambda: _heads_from_meta(ckpt), lambda: _heads_from_pretrain_configs(arch)):
        heads = source()
        if heads is not None:
            break
    else:
        heads = max(1, dims[2] // 32)
        print(f'[demo_finetune] number of heads not recorded for {path}; assuming {heads}')
    return dict(arch, num_heads=int(heads))


def _heads_from_meta(ckpt) -> Optional[int]:
    cfg_text = ckpt.get('meta', {}).get('cfg') if isinstance(ckpt, dict) else None
    if not isinstance(cfg_text, str):
        return None
    match = re.search(r'\bnum_heads\s*=\s*(\d+)', cfg_text)  # the encoder's (decoder_num_heads does not match)
    return int(match.group(1)) if match else None


def _heads_from_pretrain_configs(arch: dict) -> Optional[int]:
    """num_heads of the configs/pretrain/ config whose model has exactly this architecture."""
    from mmengine.config import Config
    pattern = osp.join(REPO, 'configs', 'pretrain', '*.py')
    for path in sorted(glob.glob(pattern)):
        try:
            model = Config.fromfile(path).model
        except Exception:  # noqa: BLE001 - an unrelated broken config must not stop the demo
            continue
        if (model.get('img_size') == arch['img_size'] and tuple(model.get('embed_dims', ())) == arch['embed_dims']
                and tuple(model.get('depths', ())) == arch['depths']):
            return int(model['num_heads'])
    return None


# ------------------------------------------------------------------------------------------- running
def run_train_tool(scope: str, config_path: str, work_dir: str, extra: Sequence[str] = (),
                   timeout: float = 600) -> subprocess.CompletedProcess:
    """Run mmdet's or mmseg's own ``tools/train.py`` (shipped in the package's ``.mim``) on a config file."""
    import importlib
    pkg_dir = osp.dirname(importlib.import_module(scope).__file__)
    tool = osp.join(pkg_dir, '.mim', 'tools', 'train.py')
    cmd = [sys.executable, tool, config_path, '--work-dir', work_dir, *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get('PYTHONPATH')) if p))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=work_dir)


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


def finetune(scope: str, cfg, work_dir: str) -> Dict[str, float]:
    os.makedirs(work_dir, exist_ok=True)
    path = osp.join(work_dir, 'config.py')
    cfg.dump(path)
    start = time.time()
    proc = run_train_tool(scope, path, work_dir)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f'{scope} fine-tuning failed (exit {proc.returncode}); config: {path}')
    metrics = read_val_metrics(work_dir)
    print(f'[demo_finetune] {scope}: trained and evaluated in {time.time() - start:.0f}s')
    return metrics


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--backbone', required=True, help='pretrained ConvMAE weights (any supported format)')
    parser.add_argument('--work-dir', default='work_dirs/demo_finetune')
    parser.add_argument('--num-heads', type=int, help='stage-3 heads of the pretrained model (if not recorded)')
    parser.add_argument('--det-epochs', type=int, default=20, help='epochs over the 8 detection images')
    parser.add_argument('--seg-iters', type=int, default=60, help='segmentation iterations')
    parser.add_argument('--det-lr', type=float, default=1e-3, help='AdamW lr of the detector')
    parser.add_argument('--seg-lr', type=float, default=2e-4, help='AdamW lr of the segmentor heads')
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args()


def main():
    args = parse_args()
    start = time.time()
    work_dir = osp.abspath(args.work_dir)
    backbone = infer_backbone(args.backbone, args.num_heads)
    print(f'[demo_finetune] backbone from {args.backbone}: {backbone}')
    coco = write_coco_dataset(osp.join(work_dir, 'data', 'coco'), seed=args.seed)
    ade = write_ade_dataset(osp.join(work_dir, 'data', 'ade'), seed=args.seed + 1)
    checkpoint = osp.abspath(args.backbone)

    det_cfg = tiny_det_config(coco, osp.join(work_dir, 'mask_rcnn'), backbone, checkpoint,
                              max_epochs=args.det_epochs, lr=args.det_lr, warmup_iters=4, seed=args.seed)
    det = finetune('mmdet', det_cfg, osp.join(work_dir, 'mask_rcnn'))
    seg_cfg = tiny_seg_config(ade, osp.join(work_dir, 'upernet'), backbone, checkpoint,
                              max_iters=args.seg_iters, lr=args.seg_lr, seed=args.seed)
    seg = finetune('mmseg', seg_cfg, osp.join(work_dir, 'upernet'))

    print('[demo_finetune] results on the synthetic validation sets:')
    print(f"  Mask R-CNN: bbox mAP {det['coco/bbox_mAP']:.3f}  bbox mAP@50 {det['coco/bbox_mAP_50']:.3f}  "
          f"segm mAP {det['coco/segm_mAP']:.3f}  segm mAP@50 {det['coco/segm_mAP_50']:.3f}")
    print(f"  UperNet:    mIoU {seg['mIoU']:.2f}  aAcc {seg['aAcc']:.2f}  mAcc {seg['mAcc']:.2f}")
    print(f'[demo_finetune] done in {time.time() - start:.0f}s; work dir {work_dir}')


if __name__ == '__main__':
    main()
