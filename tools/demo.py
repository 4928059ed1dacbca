"""End-to-end ConvMAE demo on CPU (what ``make demo`` runs), a few minutes on 2 cores.

1. writes random views of the photographs shipped with scikit-image to OUT/images/train/<photo>/ (and
   held-out views to OUT/images/val/<photo>/),
2. pretrains a small ConvMAE on the train/ views (configs/pretrain/convmae-tiny_demo.py), measuring the
   masked-patch error on the held-out views before training and after every epoch,
3. writes OUT/reconstruction.png (labelled columns: original | masked | reconstruction | reconstruction +
   visible blocks | the same for an untrained model; the caption compares their errors),
   OUT/reconstruction_curve.png (that held-out error per epoch against the untrained model's, same masks) and
   the exported backbone OUT/convmae_demo_backbone.pth,
4. runs tools/demo_finetune.py (Mask R-CNN and UperNet fine-tuned from that backbone, then run on a photograph:
   OUT/finetune/detection.png, OUT/finetune/segmentation.png),
5. prints one summary with every file it wrote.

    python tools/demo.py [--out-dir demo_output] [--epochs N] [--views N] [--skip-finetune] [--verbose] [--threads N]

It reads the configs through :func:`convmae_backbone.config_path` (an installed wheel's or the checkout's); the
synthetic data and tiny configs come from :mod:`convmae_backbone.testing`.
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence

# mmengine imports pkg_resources, which warns on import; the demo hides that (QUIET_WARNINGS).
warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)
TOOLS = osp.dirname(osp.abspath(__file__))
sys.path.insert(0, osp.dirname(TOOLS))  # run from a checkout without installing

import numpy as np  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.registry import HOOKS  # noqa: E402
from PIL import Image  # noqa: E402

from convmae_backbone.apis import cli  # noqa: E402
from convmae_backbone.apis.export import export_backbone  # noqa: E402
from convmae_backbone.apis.visualization import stored_config, titled_row, visualize  # noqa: E402
from convmae_backbone.checkpoint import safe_torch_load  # noqa: E402
from convmae_backbone.datasets import list_images  # noqa: E402
from convmae_backbone.engine.hooks import last_checkpoint  # noqa: E402
from convmae_backbone.engine.reconstruction import (plot_reconstruction_curve,  # noqa: E402
                                                    read_reconstruction_curve)
from convmae_backbone.models.arch import check_arch, infer_arch, model_arch  # noqa: E402
from convmae_backbone.models.weights import extract_state_dict  # noqa: E402
from convmae_backbone.resources import config_path, model_configs  # noqa: E402
from convmae_backbone.testing import (DEMO_CONFIG, DEMO_PHOTOS, child_env, read_val_metrics,  # noqa: E402
                                      run_train_tool, tiny_det_config, tiny_seg_config, write_ade_dataset,
                                      write_coco_dataset, write_demo_images)


# ------------------------------------------------------------------------------- backbone of a checkpoint
def checkpoint_arch(path: str, num_heads: Optional[int] = None) -> dict:
    """ConvMAE keywords of the encoder in checkpoint file ``path`` (:func:`convmae_backbone.models.arch.infer_arch`).

    The number of heads is ``num_heads``, else that of the config an mmengine checkpoint records in
    ``meta.cfg``, else that of the ``configs/pretrain/`` config with the same architecture and image size
    (the demo's exported backbone), else :func:`convmae_backbone.models.arch.infer_arch`'s.
    """
    ckpt = safe_torch_load(path)
    state = extract_state_dict(ckpt)
    if num_heads is None:
        stored = stored_config(ckpt, path)
        num_heads = model_arch(stored.model)['num_heads'] if stored is not None else None
    if num_heads is None:
        num_heads = _heads_from_pretrain_configs(infer_arch(state))
    if num_heads is None:
        print(f'[demo] number of heads not recorded for {path}; assuming {infer_arch(state)["num_heads"]}')
    return infer_arch(state, num_heads)


def _heads_from_pretrain_configs(arch: dict) -> Optional[int]:
    """num_heads of the configs/pretrain/ config whose model has exactly this architecture and image size."""
    for name, rel in sorted(model_configs().items()):
        if not rel.startswith('configs/pretrain/'):
            continue
        path = config_path(name)
        model = model_arch(Config.fromfile(path).model)
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
    # the train tools' subprocesses import this file as the module `demo` (tools/ on their PYTHONPATH)
    os.environ['PYTHONPATH'] = os.pathsep.join(p for p in (TOOLS, os.environ.get('PYTHONPATH')) if p)
    cfg.custom_imports = dict(imports=imports + ['demo'], allow_failed_imports=False)
    cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + [dict(type='DemoProgressHook', name=name)]
    if not verbose:
        cfg.log_level = 'ERROR'
    return cfg


def run_python(script: str, args: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    """Run ``script`` with this interpreter and this checkout on ``PYTHONPATH``; ``kwargs`` go to
    ``subprocess.run``."""
    return subprocess.run([sys.executable, script, *args], env=child_env(), **kwargs)




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
    model = model_arch(cfg.model)
    say(f'pretraining ConvMAE ({model["img_size"]} px, embed_dims {tuple(model["embed_dims"])}, depths '
        f'{tuple(model["depths"])}) for {cfg.train_cfg.max_epochs} epochs with mmengine\'s Runner')
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
    curve = reconstruction_summary(runner, out_dir, files)
    if curve:
        say(curve)
    return dict(losses=losses, caption=caption, curve=curve, files=files)


def reconstruction_summary(runner, out_dir: str, files: dict) -> Optional[str]:
    """The reconstruction monitor's held-out error before and after pretraining, and its curve drawn to
    ``out_dir/reconstruction_curve.png`` (added to ``files``); None when the run logged none."""
    scalars = osp.join(runner.log_dir, 'vis_data', 'scalars.json')
    try:
        epochs, errors = read_reconstruction_curve(scalars)
    except (OSError, ValueError):
        return None
    what = f'{len(list_images(osp.join(runner.cfg.train_dataloader.dataset.data_root, "val")))} held-out crops'
    files['reconstruction_curve'] = plot_reconstruction_curve(
        scalars, osp.join(out_dir, 'reconstruction_curve.png'), what)
    return (f'reconstruction_curve.png: norm-pix MSE on the masked patches of {what} (never trained on), the '
            f'same masks every epoch: {errors[0]:.3f} untrained -> {errors[-1]:.3f} after {epochs[-1]} epochs '
            f'({1 - errors[-1] / errors[0]:.0%} lower)')


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
        *([f'  {pre["curve"]}'] if pre['curve'] else []),
        *(f'  {key + ":":15s} {path}' for key, path in pre['files'].items()),
        *lines]))
    return rc


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='ConvMAE pretraining demo on scikit-image photographs')
    parser.add_argument('--out-dir', default='demo_output')
    parser.add_argument('--epochs', type=int, help='override the demo config\'s max_epochs')
    parser.add_argument('--views', type=int, default=40, help='random views written per photograph')
    parser.add_argument('--skip-finetune', action='store_true', help='do not run tools/demo_finetune.py')
    parser.add_argument('--verbose', action='store_true', help="mmengine's full logs (environment, config, "
                                                                'every logged iteration)')
    parser.add_argument('--threads', type=int, default=1,
                        help='CPU threads per process (default 1: fastest where other jobs share the cores)')
    args = parser.parse_args()
    script = None if args.skip_finetune else osp.join(TOOLS, 'demo_finetune.py')
    sys.exit(run_demo(args.out_dir, args.epochs, args.views, script, args.verbose, args.threads))
