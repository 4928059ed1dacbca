"""The end-to-end CPU demo (``tools/demo.py``, ``tools/demo_finetune.py``, ``make demo``).

Pretraining part (:func:`run_demo`): random views of the photographs shipped with scikit-image, a small ConvMAE
pretrained on them (``configs/pretrain/convmae-tiny_demo.py``), its reconstructions and exported backbone.

Fine-tuning part (:func:`finetune_demo`): a tiny COCO-layout instance-segmentation dataset and a tiny
ADE20K-layout semantic-segmentation dataset (coloured rectangles and ellipses on textured backgrounds), small
Mask R-CNN and UperNet configs derived from the two full configs in ``configs/`` (same pipelines, heads and
optimizers; shrunk sizes, channels and schedules), trained for a few iterations from the backbone weights
with mmdet's / mmseg's own train tools, and their validation metrics.

It reads the configs of a checkout (``configs/`` next to this package).
"""
import glob
import json
import math
import os
import os.path as osp
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from PIL import Image, ImageDraw

from .checkpoint import safe_torch_load
from .models.arch import check_arch, infer_arch
from .models.weights import extract_state_dict

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = osp.join(REPO, 'configs')
DEMO_CONFIG = osp.join(CONFIGS, 'pretrain', 'convmae-tiny_demo.py')
DET_CONFIG = osp.join(CONFIGS, 'mmdet', 'mask-rcnn_convmae-b_fpn_lsj-25e_coco.py')
SEG_CONFIG = osp.join(CONFIGS, 'mmseg', 'upernet_convmae-b_8xb2-160k_ade20k-512x512.py')

# Photographs shipped inside scikit-image (no download needed).
DEMO_PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'camera', 'coins', 'moon', 'immunohistochemistry',
               'hubble_deep_field', 'retina', 'clock', 'brick', 'grass', 'gravel')

DET_CLASSES = ('rectangle', 'ellipse')
# The tiny segmentation dataset reuses the first three ADE20K class names (ADE20KDataset only accepts its own
# names): 'wall' = background, 'building' = rectangles, 'sky' = ellipses. PNG values are 1..3 (0 = ignore),
# as in ADE20K with reduce_zero_label.
SEG_CLASSES = ('wall', 'building', 'sky')
SEG_PALETTE = [[120, 120, 120], [180, 120, 120], [6, 230, 230]]

TINY_BACKBONE = dict(img_size=64, embed_dims=(32, 48, 96), depths=(1, 1, 2), num_heads=4, mlp_ratios=(4, 4, 4))


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
    ch, norm = 64, dict(type='BN', requires_grad=True)
    model = cfg.model
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
    model.data_preprocessor.pad_size_divisor = 32  # the full config pads test images to 1024x1024

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

    cfg.train_cfg.update(max_epochs=max_epochs, val_interval=max_epochs)
    cfg.param_scheduler[1].end = max_epochs
    return cfg


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


# ------------------------------------------------------------------------------- backbone of a checkpoint
def checkpoint_arch(path: str, num_heads: Optional[int] = None) -> dict:
    """ConvMAE keywords of the encoder in checkpoint file ``path`` (:func:`.models.arch.infer_arch`).

    The number of heads is ``num_heads``, else that of the config an mmengine checkpoint records in
    ``meta.cfg``, else that of the ``configs/pretrain/`` config with the same architecture and image size
    (the demo's exported backbone), else :func:`.models.arch.infer_arch`'s.
    """
    from .visualization import stored_config
    ckpt = safe_torch_load(path)
    state = extract_state_dict(ckpt)
    if num_heads is None:
        stored = stored_config(ckpt)
        num_heads = stored.model.get('num_heads') if stored is not None else None
    if num_heads is None:
        num_heads = _heads_from_pretrain_configs(infer_arch(state))
    if num_heads is None:
        print(f'[demo] number of heads not recorded for {path}; assuming {infer_arch(state)["num_heads"]}')
    return infer_arch(state, num_heads)


def _heads_from_pretrain_configs(arch: dict) -> Optional[int]:
    """num_heads of the configs/pretrain/ config whose model has exactly this architecture and image size."""
    for path in sorted(glob.glob(osp.join(CONFIGS, 'pretrain', '*.py'))):
        model = Config.fromfile(path).model
        try:
            check_arch(model, arch, path)
        except ValueError:
            continue
        if model.get('img_size') == arch['img_size']:
            return int(model['num_heads'])
    return None


# ---------------------------------------------------------------------------------------------- running
#: Warnings of the libraries that say nothing about the demo (pkg_resources' deprecation, on every mmengine
#: import), hidden in the demo and its subprocesses; PYTHONWARNINGS syntax.
QUIET_WARNINGS = ('ignore::DeprecationWarning', 'ignore:pkg_resources is deprecated:UserWarning')
#: The demo's start (seconds since the epoch), inherited by its subprocesses for the elapsed times they print.
T0_ENV = 'CONVMAE_DEMO_T0'
PREFIX = '[demo'


def quiet_warnings() -> None:
    """Install :data:`QUIET_WARNINGS` in this process and (through ``PYTHONWARNINGS``) its children. (A
    warning issued while importing mmengine, before this runs, needs the same filter in the calling script.)"""
    import re
    import warnings
    categories = {'DeprecationWarning': DeprecationWarning, 'UserWarning': UserWarning}
    for spec in QUIET_WARNINGS:
        _, message, category = spec.split(':')
        warnings.filterwarnings('ignore', message=re.escape(message), category=categories[category])
    os.environ['PYTHONWARNINGS'] = ','.join(QUIET_WARNINGS)


def set_threads(threads: int) -> None:
    """Use ``threads`` CPU threads in this process and (through ``OMP_NUM_THREADS``) its children. On a shared
    machine whose cores are busy, more threads than free cores make every op wait for the slowest thread."""
    import torch
    torch.set_num_threads(threads)
    os.environ['OMP_NUM_THREADS'] = str(threads)


def say(message: str) -> None:
    """Print ``[demo mm:ss] message``, mm:ss being the time since the demo started."""
    now = time.time()
    elapsed = max(0.0, now - float(os.environ.setdefault(T0_ENV, str(now))))
    print(f'{PREFIX} {int(elapsed // 60):2d}:{int(elapsed % 60):02d}] {message}', flush=True)


@HOOKS.register_module(force=True)
class DemoProgressHook(Hook):
    """Prints one progress line (:func:`say`) at most every ``interval_s`` seconds of training and after the
    last iteration: iteration, epoch, loss and the seconds this run has trained."""
    priority = 'VERY_LOW'

    def __init__(self, name: str, interval_s: float = 15.0) -> None:
        self.name, self.interval_s = name, interval_s
        self._start = self._last = 0.0

    def before_train(self, runner) -> None:
        self._start = self._last = time.time()
        say(f'  {self.name}: training started ({runner.max_iters} iterations)')

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        now, done = time.time(), runner.iter + 1 >= runner.max_iters
        if now - self._last < self.interval_s and not done:
            return
        self._last = now
        loss = (outputs or {}).get('loss')
        loss = f', loss {loss.item() if hasattr(loss, "item") else loss:.3f}' if loss is not None else ''
        epoch = f' (epoch {runner.epoch + 1}/{runner.max_epochs})' if runner.max_epochs else ''
        say(f'  {self.name}: iteration {runner.iter + 1}/{runner.max_iters}{epoch}{loss}, '
            f'{now - self._start:.0f} s')


def quiet_config(cfg: Config, name: str, verbose: bool = False) -> Config:
    """Demo settings of a training config: :class:`DemoProgressHook` lines; unless ``verbose``, mmengine's
    environment, config and per-iteration logs and its warnings off (``log_level='ERROR'``). Returns ``cfg``."""
    imports = list(cfg.get('custom_imports', {}).get('imports', []))
    cfg.custom_imports = dict(imports=imports + [__name__], allow_failed_imports=False)
    cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + [dict(type='DemoProgressHook', name=name)]
    if not verbose:
        cfg.log_level = 'ERROR'
    return cfg


def run_python(script: str, args: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    """Run ``script`` with this interpreter and this checkout on ``PYTHONPATH``; ``kwargs`` go to
    ``subprocess.run``."""
    return subprocess.run([sys.executable, script, *args], env=_child_env(), **kwargs)


def _child_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get('PYTHONPATH')) if p))


def run_train_tool(scope: str, config_path: str, work_dir: str, extra: Sequence[str] = (),
                   echo: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run mmdet's or mmseg's own ``tools/train.py`` (shipped in the package's ``.mim``) on a config file, in
    ``work_dir`` (10 minutes at most), its output captured; lines starting with ``echo`` are also printed as
    they come."""
    import importlib
    tool = osp.join(osp.dirname(importlib.import_module(scope).__file__), '.mim', 'tools', 'train.py')
    cmd = [sys.executable, tool, config_path, '--work-dir', work_dir, *extra]
    if echo is None:
        return subprocess.run(cmd, env=_child_env(), capture_output=True, text=True, timeout=600, cwd=work_dir)
    lines = []
    with subprocess.Popen(cmd, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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


def finetune(scope: str, cfg: Config, verbose: bool = False) -> Dict[str, float]:
    """Dump ``cfg`` into its ``work_dir``, train and evaluate it with ``scope``'s train tool (its progress lines
    passed through; everything with ``verbose``); the validation metrics. Raises ``RuntimeError`` with the end
    of the tool's output if it fails."""
    os.makedirs(cfg.work_dir, exist_ok=True)
    path = osp.join(cfg.work_dir, 'config.py')
    cfg.dump(path)
    proc = run_train_tool(scope, path, cfg.work_dir, echo='' if verbose else PREFIX)
    if proc.returncode != 0:
        raise RuntimeError(f'{scope} fine-tuning failed (exit {proc.returncode}); config: {path}\n'
                           f'{proc.stdout[-4000:]}{proc.stderr[-4000:]}')
    return read_val_metrics(cfg.work_dir)


def _enlarged(path: str, out: str, factor: int = 3) -> str:
    """Image ``path`` upscaled ``factor`` times (bicubic) as PNG ``out``, so that drawn labels stay legible."""
    with Image.open(path) as img:
        img.convert('RGB').resize((img.width * factor, img.height * factor), Image.BICUBIC).save(out)
    return out


def demo_photo(path: str, name: str = 'coffee', width: int = 480) -> str:
    """Write the scikit-image photograph ``name`` resized to ``width`` pixels wide as JPEG ``path``; returns it."""
    from skimage import data as skdata
    photo = Image.fromarray(getattr(skdata, name)()).convert('RGB')
    photo = photo.resize((width, round(photo.height * width / photo.width)), Image.BICUBIC)
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    photo.save(path, quality=95)
    return path


def _inference_quietly(verbose: bool):
    """A context in which mmengine's logs below ERROR, its prints and Python warnings are hidden (unless
    ``verbose``)."""
    import contextlib
    import io
    import warnings

    from mmengine.logging import MMLogger
    stack = contextlib.ExitStack()
    if not verbose:
        MMLogger.get_instance(f'convmae_demo_{time.time()}', log_level='ERROR')  # becomes the current logger
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter('ignore')
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))  # 'Loads checkpoint by local backend'
    return stack


def infer_pictures(scope: str, work_dir: str, images: Sequence[str], out: str, title: str,
                   verbose: bool = False) -> str:
    """Run the model trained in ``work_dir`` (its ``config.py`` and last checkpoint) on ``images`` through
    mmdet's ``DetInferencer`` (the 3 best detections at least, else those scoring 0.3) or mmseg's
    ``MMSegInferencer``, and save the inferencer's drawings side by side, under ``title``, as the PNG ``out``;
    returns ``out``."""
    from .engine import last_checkpoint
    config, weights = osp.join(work_dir, 'config.py'), last_checkpoint(work_dir)
    drawings = []
    with _inference_quietly(verbose):
        if scope == 'mmdet':
            from mmdet.apis import DetInferencer
            inferencer = DetInferencer(model=config, weights=weights, device='cpu', show_progress=False)
            for image in images:
                scores = inferencer(image, return_datasamples=True, no_save_vis=True,
                                    no_save_pred=True)['predictions'][0].pred_instances.scores
                threshold = min(0.3, float(scores.sort(descending=True).values[:3].min())) if len(scores) else 0.3
                drawings.append(inferencer(image, return_vis=True, no_save_pred=True,
                                           pred_score_thr=threshold - 1e-6)['visualization'][0])
        else:
            from mmseg.apis import MMSegInferencer
            inferencer = MMSegInferencer(model=config, weights=weights, device='cpu')
            inferencer.show_progress = False
            for image in images:
                vis = inferencer(image, return_vis=True, opacity=0.5)['visualization']
                drawings.append(vis[0] if isinstance(vis, list) else vis)
    from .visualization import titled_row
    titled_row([np.asarray(d) for d in drawings], title, out)
    return out


def finetune_demo(backbone: str, work_dir: str, num_heads: Optional[int] = None, det_epochs: int = 20,
                  seg_iters: int = 60, det_lr: float = 1e-3, seg_lr: float = 2e-4, seed: int = 0,
                  verbose: bool = False, summary: bool = True) -> dict:
    """Fine-tune Mask R-CNN and UperNet with the pretrained ConvMAE ``backbone`` (a checkpoint file of any
    supported format) on the tiny synthetic datasets under ``work_dir``, run both on a scikit-image photograph
    through the mmdet / mmseg inferencers, and write ``work_dir/results.json``: the validation metrics
    (``det``, ``seg``) and the pictures (``files``). Prints the results with ``summary``; returns them."""
    work_dir = osp.abspath(work_dir)
    arch = checkpoint_arch(backbone, num_heads)
    say(f'fine-tuning from {backbone}: {arch}')
    coco = write_coco_dataset(osp.join(work_dir, 'data', 'coco'), seed=seed)
    ade = write_ade_dataset(osp.join(work_dir, 'data', 'ade'), seed=seed + 1)
    checkpoint = osp.abspath(backbone)
    det_cfg = tiny_det_config(coco, osp.join(work_dir, 'mask_rcnn'), arch, checkpoint, max_epochs=det_epochs,
                              lr=det_lr, warmup_iters=4, seed=seed)
    seg_cfg = tiny_seg_config(ade, osp.join(work_dir, 'upernet'), arch, checkpoint, max_iters=seg_iters, lr=seg_lr,
                              seed=seed)
    say(f'Mask R-CNN: training {det_epochs} epochs on 8 synthetic images with mmdet\'s tools/train.py')
    det = finetune('mmdet', quiet_config(det_cfg, 'Mask R-CNN', verbose), verbose)
    say(f'Mask R-CNN: bbox mAP {det["coco/bbox_mAP"]:.3f}, segm mAP {det["coco/segm_mAP"]:.3f} on the 4 '
        f'validation images')
    say(f'UperNet: training {seg_iters} iterations on 8 synthetic images with mmseg\'s tools/train.py')
    seg = finetune('mmseg', quiet_config(seg_cfg, 'UperNet', verbose), verbose)
    say(f'UperNet: mIoU {seg["mIoU"]:.2f} on the 4 validation images')
    photo = demo_photo(osp.join(work_dir, 'photo.jpg'))
    say('running both on a photograph (scikit-image "coffee") and a validation image through DetInferencer '
        'and MMSegInferencer')
    det_val, seg_val = (_enlarged(path, osp.join(work_dir, name)) for path, name in (
        (osp.join(coco, 'val', 'val_0000.jpg'), 'det_val.png'),
        (osp.join(ade, 'images', 'validation', 'ADE_validation_00000000.jpg'), 'seg_val.png')))
    files = dict(photo=photo, detection=infer_pictures(
        'mmdet', det_cfg.work_dir, [photo, det_val], osp.join(work_dir, 'detection.png'),
        'Mask R-CNN fine-tuned on 8 synthetic images (classes: rectangle, ellipse; scores in %): a photograph | '
        'a synthetic validation image', verbose), segmentation=infer_pictures(
        'mmseg', seg_cfg.work_dir, [photo, seg_val], osp.join(work_dir, 'segmentation.png'),
        'UperNet fine-tuned on 8 synthetic images (wall = background, building = rectangle, sky = ellipse): '
        'a photograph | a synthetic validation image', verbose))
    results = dict(det=det, seg=seg, files=files)
    with open(osp.join(work_dir, 'results.json'), 'w') as f:
        json.dump(results, f, indent=1)
    if summary:
        print('\n'.join(finetune_summary(results)), flush=True)
    return results


def finetune_summary(results: dict) -> List[str]:
    """Summary lines of :func:`finetune_demo`'s results."""
    det, seg = results['det'], results['seg']
    return [f"  Mask R-CNN (synthetic validation): bbox mAP {det['coco/bbox_mAP']:.3f}  bbox mAP@50 "
            f"{det['coco/bbox_mAP_50']:.3f}  segm mAP {det['coco/segm_mAP']:.3f}  segm mAP@50 "
            f"{det['coco/segm_mAP_50']:.3f}",
            f"  UperNet (synthetic validation):    mIoU {seg['mIoU']:.2f}  aAcc {seg['aAcc']:.2f}  "
            f"mAcc {seg['mAcc']:.2f}",
            *(f'  {key + ":":15s} {path}' for key, path in results['files'].items())]


def pretrain_demo(out_dir: str, epochs: Optional[int] = None, views: int = 40, verbose: bool = False) -> dict:
    """Write ``views`` views per photograph to ``out_dir/images``, pretrain the demo config on them in
    ``out_dir/pretrain`` (``epochs``: override its max_epochs), write ``out_dir/reconstruction.png`` (4 photos,
    upscaled 2x, with an untrained model's column and error) and the exported backbone
    ``out_dir/convmae_demo_backbone.pth``. Returns what it made (losses, caption, files)."""
    from . import cli
    from .engine import last_checkpoint
    from .export import export_backbone
    from .visualization import visualize
    images, work = osp.join(out_dir, 'images'), osp.join(out_dir, 'pretrain')
    n = write_demo_images(images, views_per_photo=views, size=128, seed=0)
    say(f'wrote {n} views of {len(DEMO_PHOTOS)} scikit-image photographs to {images}')

    options = {'train_dataloader.dataset.data_root': images,
               'experiment_name': f'convmae_demo_{int(time.time())}'}
    if epochs:
        options['train_cfg.max_epochs'] = epochs
    cfg = quiet_config(cli.load_config(DEMO_CONFIG, options, work_dir=work, scopes=cli.PRETRAIN_SCOPES),
                       'pretraining', verbose)
    cli.check_schedule(cfg)
    model = cfg.model
    say(f'pretraining ConvMAE ({model.img_size} px, embed_dims {tuple(model.embed_dims)}, depths '
        f'{tuple(model.depths)}) for {cfg.train_cfg.max_epochs} epochs with mmengine\'s Runner')
    start = time.time()
    runner = cli.build_runner(cfg)
    runner.train()
    losses = np.asarray(runner.message_hub.get_scalar('train/loss').data[0], dtype=float)
    ckpt = last_checkpoint(work)
    k = min(10, len(losses) // 2)
    say(f'pretrained in {time.time() - start:.0f} s: {len(losses)} iterations, loss (mean of {k}) '
        f'{losses[:k].mean():.3f} -> {losses[-k:].mean():.3f}')

    samples = [osp.join(images, 'train', name, f'{name}_000.jpg') for name in DEMO_PHOTOS[:4]]
    png = osp.join(out_dir, 'reconstruction.png')
    _, _, caption = visualize(ckpt, samples, png, scale=2, seed=0, compare_untrained=True)
    backbone = osp.join(out_dir, 'convmae_demo_backbone.pth')
    export_backbone(ckpt, backbone)
    say(f'reconstruction figure written; {caption}')
    files = dict(checkpoint=ckpt, reconstruction=png, backbone=backbone)
    knn = knn_summary(runner, out_dir, files)
    if knn:
        say(knn)
    return dict(losses=losses, caption=caption, knn=knn, files=files)


def knn_summary(runner, out_dir: str, files: dict) -> Optional[str]:
    """The k-NN monitor's top-1 before and after pretraining (which photograph is a crop from), and its curve
    drawn to ``out_dir/knn_curve.png`` (added to ``files``); None when the run logged no k-NN."""
    from .knn import plot_knn_curve, read_knn_curve
    scalars = osp.join(runner.log_dir, 'vis_data', 'scalars.json')
    epochs, top1 = read_knn_curve(scalars) if osp.isfile(scalars) else ([], [])
    if not epochs:
        return None
    files['knn_curve'] = plot_knn_curve(scalars, osp.join(out_dir, 'knn_curve.png'))
    return (f'k-NN top-1 (which photograph is a val crop from, {len(DEMO_PHOTOS)} photographs): '
            f'{top1[0]:.1f}% before pretraining (random weights), {top1[-1]:.1f}% after {epochs[-1]} epochs')


def run_demo(out_dir: str, epochs: Optional[int] = None, views: int = 40, finetune_script: Optional[str] = None,
             verbose: bool = False, threads: int = 1) -> int:
    """:func:`pretrain_demo`, then (if given) the fine-tuning script ``finetune_script --backbone BACKBONE
    --work-dir out_dir/finetune --no-summary`` in a subprocess, its output passed through; then one summary.
    Every process uses ``threads`` CPU threads (:func:`set_threads`). Returns the script's exit code (0 without
    one)."""
    os.environ.setdefault(T0_ENV, str(time.time()))
    quiet_warnings()
    set_threads(threads)
    out_dir = osp.abspath(out_dir)
    pre = pretrain_demo(out_dir, epochs, views, verbose)
    rc, lines = 0, []
    if finetune_script is not None:
        finetune_dir = osp.join(out_dir, 'finetune')
        args = ['--backbone', pre['files']['backbone'], '--work-dir', finetune_dir, '--no-summary',
                *(['--verbose'] if verbose else [])]
        say(f'running {osp.basename(finetune_script)} {" ".join(args)}')
        rc = run_python(finetune_script, args).returncode
        results = osp.join(finetune_dir, 'results.json')
        if rc == 0 and osp.isfile(results):
            with open(results) as f:
                lines = finetune_summary(json.load(f))
        else:
            lines = [f'  fine-tuning failed: exit code {rc}, outputs under {finetune_dir}']
    losses = pre['losses']
    say('summary\n' + '\n'.join([
        f'  pretraining: {len(losses)} iterations, loss {losses[0]:.3f} (first) -> {losses[-1]:.3f} (last)',
        f'  {pre["caption"]}',
        *([f'  {pre["knn"]}'] if pre['knn'] else []),
        *(f'  {key + ":":15s} {path}' for key, path in pre['files'].items()),
        *lines]))
    return rc
