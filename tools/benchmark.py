"""Benchmark ConvMAE: the pretraining step (sparse, dense, the official formulation, optionally the official code)
in fp32 and bf16, eager and compiled, and the backbone forward of the detection and segmentation configs.

One run measures, side by side and per device (CPU; CUDA too when available):

1. a pretraining step (ConvMAE-Base, 224x224, mask ratio 0.75; ``forward_mae`` + backward + the optimizer of the
   paper config, through the same optim wrapper the Runner builds: ``OptimWrapper`` in fp32, and in bf16 the one
   ``--amp`` selects, :func:`convmae_backbone.engine.amp.amp_optim_wrapper`) for

   * ``sparse``: ours, stages 1-2 on visible blocks only (the default);
   * ``dense``: ours, masked convolution over the whole image, fused attention;
   * ``official formulation (our reimplementation)``: our dense path with the explicit softmax(QK^T)V attention
     of :mod:`convmae_backbone.models.reference`, i.e. what the official code computes;
   * ``official code``: the official ``MaskedAutoencoderConvViT`` imported from a checkout of Alpha-VL/ConvMAE
     given with ``--official-src`` (never part of this project);
   * ``sparse compiled`` (``--compile``): the sparse step under ``torch.compile``, with its graph count, graph
     breaks and recompilations;

   and the Fast ConvMAE step (complementary masking: every image under 4 disjoint 25% views; batch ``--fast-batch``
   images, default 2 on CPU = 8 views) for

   * ``complementary``: ours, ``masking='complementary'``, sparse;
   * ``sparse``: our block-wise step on the same images (one mask per image), for scale;
   * ``official Fast ConvMAE code``: ``MaskedAutoencoderViT`` imported from a checkout of Alpha-VL/FastConvMAE given
     with ``--fastconvmae-src`` (never part of this project);

2. the backbone forward (inference, batch 1) of the detection config at 1024x1024 (window 16, global blocks,
   relative position bias) and of the segmentation config at 512x512, with fused and with explicit attention;
3. the GEMM ceiling of the device (a large ``torch.mm``), to relate the achieved GFLOP/s;
4. (``--only data``, and in a full run) the pretraining input pipeline on a folder of ImageNet-like JPEGs of
   real photographs (500x375, quality 90, :func:`convmae_backbone.testing.write_photo_jpegs`): images/s of one
   worker process with one thread, and of a ``DataLoader`` with ``--data-workers`` processes, for ours (the
   base config's pipeline: ``DecodeRandomResizedCrop`` with simplejpeg, and with PIL's ``draft``; and the
   previous ``LoadRGBImage`` + ``MAERandomResizedCrop``) and the official one re-created here (torchvision
   ``ImageFolder`` + ``RandomResizedCrop(224, (0.2, 1), bicubic)`` + flip + ``ToTensor`` + ``Normalize``), the
   variants interleaved over ``--rounds`` and compared by the median of per-round ratios.

Every variant runs in a fresh subprocess so that its memory figures are its own. The memory figure is the
*per-step memory*: peak minus what is held between steps (CUDA: ``max_memory_allocated`` minus the allocation
after the warm-up steps; CPU: peak RSS minus the RSS of the process with its weights before the first step plus
the two AdamW moments); next to it, what autograd saves for the backward (activations, allocator-independent).
FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on the first warm-up step.
On CUDA the pretraining batch defaults to 128 images per GPU and throughput (img/s) is reported.

Usage (what ``make benchmark`` runs):
    python tools/benchmark.py                  # CPU (and CUDA if present), fp32 and bf16
    python tools/benchmark.py --quick          # tiny sizes, a smoke run
    python tools/benchmark.py --official-src ../ConvMAE --compile --rounds 3 --json bench.json
    python tools/benchmark.py --device cuda --only pretrain   # 128 images per GPU
    python tools/benchmark.py --only data --rounds 5          # input pipeline, ours vs the official one
    python tools/benchmark.py --only fastconvmae --fastconvmae-src ../FastConvMAE --rounds 3
"""
import argparse
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing

import torch  # noqa: E402

from convmae_backbone.engine.amp import amp_optim_wrapper, supports_bf16  # noqa: E402
from convmae_backbone.models import ConvMAE, ConvMAEPretrainer  # noqa: E402
from convmae_backbone.models.arch import arch_settings  # noqa: E402
from convmae_backbone.models.masking import MASKINGS  # noqa: E402
from convmae_backbone.models.reference import with_explicit_attention  # noqa: E402
from convmae_backbone.resources import config_path  # noqa: E402
from convmae_backbone.testing import TINY_DECODER, TINY_ENCODER, write_photo_jpegs  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmengine.registry import DATASETS, FUNCTIONS  # noqa: E402
from torchvision import datasets as tv_datasets  # noqa: E402
from torchvision import transforms as T  # noqa: E402

PRETRAIN_CONFIG = config_path('pretrain/convmae-b_8xb128-1600e_in1k.py')
DET_CONFIG = config_path('mmdet/mask-rcnn_convmae-b_fpn_lsj-25e_coco.py')
SEG_CONFIG = config_path('mmseg/upernet_convmae-b_8xb2-160k_ade20k-512x512.py')

BASE = arch_settings('base')
BASE_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

PRETRAIN_VARIANTS = ('sparse', 'dense', 'official-formulation', 'official-source', 'sparse-compiled')
FAST_VARIANTS = ('complementary', 'sparse', 'fastconvmae-source')
LABELS = {'sparse': 'sparse (ours)', 'dense': 'dense (ours)',
          'official-formulation': 'official formulation (our reimplementation)',
          'official-source': 'official code (Alpha-VL/ConvMAE)',
          'complementary': 'complementary masking (ours)',
          'fastconvmae-source': 'official Fast ConvMAE code (Alpha-VL/FastConvMAE)', 'sparse-compiled': 'sparse (ours), torch.compile',
          'fused': 'fused attention (ours)', 'explicit': 'explicit softmax(QK^T)V',
          'fused-compiled': 'fused attention (ours), torch.compile',
          'data-ours': 'ours: DecodeRandomResizedCrop (simplejpeg) + flip + mask + uint8',
          'data-ours-pil': 'ours with PIL draft decoding',
          'data-ours-before': 'ours before: LoadRGBImage + MAERandomResizedCrop (PIL) + flip + mask + uint8',
          'data-official': 'official: ImageFolder + RandomResizedCrop + flip + ToTensor + Normalize'}
DATA_VARIANTS = ('data-official', 'data-ours', 'data-ours-pil', 'data-ours-before')


# ------------------------------------------------------------------------------------------------ measuring
def _sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def _current_rss_mb() -> float:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


def flop_counter():
    """FlopCounterMode that also counts the CPU flash-attention kernels (same formula as the CUDA ones) and the
    backward of grouped convolutions by their groups."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, '_scaled_dot_product_flash_attention_for_cpu'):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda q, k, v, *args, out_shape=None, **kwargs: fc.sdpa_flop_count(q, k, v))
    if hasattr(aten, '_scaled_dot_product_flash_attention_for_cpu_backward'):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            lambda g, q, k, v, *args, out_shape=None, **kwargs: fc.sdpa_backward_flop_count(g, q, k, v))
    # the stock convolution_backward formula ignores ``groups`` and counts a depthwise conv's backward as a full
    # conv; each of grad_input and grad_weight costs the forward's multiply-adds
    mapping[aten.convolution_backward] = (
        lambda grad_out, x, w, _bias, _stride, _padding, _dilation, transposed, _out_pad, _groups, output_mask,
        out_shape=None: fc.conv_flop_count(x, w, grad_out, transposed) * (int(output_mask[0]) + int(output_mask[1])))
    return fc.FlopCounterMode(display=False, custom_mapping=mapping)


def _time_loop(step: Callable[[], None], device: str, warmup: int, iters: int,
               compile_stats: Optional["CompileStats"] = None, flop_step: Optional[Callable[[], None]] = None
               ) -> Tuple[Optional[int], List[float], float]:
    """Run ``step`` warmup + iters times; the first warm-up step is FLOP-counted, with ``flop_step`` in its
    place when given (for compiled code it compiles instead and ``compile_stats`` is told when it is done).

    Returns (flops, times, held_mb): held_mb is the CUDA allocation after the warm-up (0 on CPU)."""
    flops = None
    if compile_stats is None:
        counter = flop_counter()
        with counter:
            (flop_step or step)()
        flops = counter.get_total_flops()
    else:
        step()
        compile_stats.first_step_done()
    for _ in range(warmup - 1):
        step()
    _sync(device)
    held = 0.0
    if device == 'cuda':
        held = torch.cuda.memory_allocated() / 2 ** 20
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return flops, times, held


#: Categories of the op breakdown (``--profile``): the first whose substrings match an op's name wins.
OP_CATEGORIES = (
    ('GEMM', ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm', 'mkldnn_linear', 'aten::_mkl_linear')),
    ('attention', ('scaled_dot_product', 'aten::_softmax')),
    ('convolution', ('convolution',)),
    ('optimizer', ('_fused_adam', 'Optimizer.', 'aten::_foreach')),
    ('compiled kernels', ('Compiled', 'cpp_fused', 'triton_', 'Torch-Compiled')),
    ('copies, indexing, fills', ('copy_', 'aten::index', 'index_put', 'aten::gather', 'aten::scatter', 'aten::cat',
                                 'aten::fill_', 'aten::zero_', 'aten::clone', 'aten::stack', 'aten::constant_pad')),
    ('elementwise, norms, reductions', ('aten::',)),
)


def saved_for_backward_mb(model: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> float:
    """MiB of the tensors autograd keeps for the backward of ``forward()`` (the activations; parameters, and
    anything sharing their storage, excluded): the memory a step needs beyond weights, gradients and optimizer
    state, independent of the allocator."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()  # the graph is dropped unused
    return sum(storages.values()) / 2 ** 20


def op_breakdown(step: Callable[[], None], device: str) -> Dict[str, float]:
    """Milliseconds of one ``step`` per :data:`OP_CATEGORIES` entry (self time of every profiled op: CPU time on
    CPU, device time on CUDA), plus ``'other'`` (Python, autograd and dispatch overhead) and ``'total'``."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == 'cuda' else [])
    _sync(device)
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    out = {name: 0.0 for name, _ in OP_CATEGORIES}
    out['other'] = 0.0
    for event in prof.key_averages():
        us = event.self_device_time_total if device == 'cuda' else event.self_cpu_time_total
        name = next((cat for cat, keys in OP_CATEGORIES if any(k in event.key for k in keys)), 'other')
        out[name] += us / 1000
    out['total'] = sum(out.values())
    return out


def cpu_live_step_mb(step: Callable[[], None]) -> Optional[float]:
    """The memory one more ``step`` needs on CPU when freed memory goes back to the OS: glibc's mmap threshold is
    fixed at 128 KiB (by default it rises up to 32 MiB, so freed blocks of that size stay in the heap and in the
    RSS), the heap is trimmed and the peak RSS reset (``/proc/self/clear_refs``), then the step's peak RSS over the
    RSS before it. The CPU counterpart of CUDA's ``max_memory_allocated``: the step's live tensors, not what the
    allocator keeps. Slows later allocations, so it runs after the timing; None where glibc or /proc lack it."""
    try:
        libc = ctypes.CDLL('libc.so.6')
        with open('/proc/self/clear_refs', 'w') as f:
            if not libc.mallopt(-3, 128 * 1024):  # M_MMAP_THRESHOLD
                return None
            libc.malloc_trim(0)
            f.write('5')  # reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        return None
    before = _current_rss_mb()
    step()
    with open('/proc/self/status') as f:
        hwm_kib = next(int(ln.split()[1]) for ln in f if ln.startswith('VmHWM:'))
    return hwm_kib / 1024 - before


def _peak_mb(device: str) -> float:
    if device == 'cuda':
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class CompileStats:
    """What TorchDynamo did while the context was open: graphs compiled, graph breaks (with their first reasons),
    frames compiled, and recompilations = frames compiled after the first step (every step has new masks of the
    same shape, so a recompilation means a guard on data, not on shapes)."""

    def __enter__(self) -> 'CompileStats':
        import torch._dynamo
        from torch._dynamo.utils import counters
        torch._dynamo.reset()
        counters.clear()
        self.counters, self._after_first = counters, None
        return self

    def first_step_done(self) -> None:
        self._after_first = int(self.counters['frames'].get('total', 0))

    def __exit__(self, *exc) -> None:
        c = self.counters
        self.graphs = int(c['stats'].get('unique_graphs', 0))
        self.graph_breaks = int(sum(c['graph_break'].values()))
        self.break_reasons = sorted(c['graph_break'])[:5]
        self.frames = int(c['frames'].get('total', 0))
        self.recompiles = self.frames - (self._after_first if self._after_first is not None else self.frames)

    def as_dict(self) -> dict:
        return dict(graphs=self.graphs, graph_breaks=self.graph_breaks, break_reasons=self.break_reasons,
                    frames_compiled=self.frames, recompiles=self.recompiles)


# ------------------------------------------------------------------------------------------------ models
def import_official(src: str, module: str = 'models_convmae', repo: str = 'Alpha-VL/ConvMAE'):
    """The official model module ``module`` from a checkout of ``repo`` at ``src`` (``models_convmae`` of
    Alpha-VL/ConvMAE, ``models_fastconvmae`` of Alpha-VL/FastConvMAE).

    The official code predates numpy 1.24 (``np.float``) and was written for timm 0.3.2; both are bridged for the
    import only where needed. Raises ``ImportError`` naming the cause when it cannot be imported."""
    import importlib

    import numpy as np
    path = os.path.abspath(src)
    if not os.path.isfile(os.path.join(path, f'{module}.py')):
        raise ImportError(f'{path} is not a checkout of {repo} (no {module}.py)')
    added_float = not hasattr(np, 'float')
    sys.path.insert(0, path)
    try:
        if added_float:
            np.float = float  # util/pos_embed.py uses the alias removed in numpy 1.24
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure: report why the official code cannot run here
        raise ImportError(f'the official code at {path} cannot be imported with timm '
                          f'{_version("timm")} / numpy {np.__version__}: {type(exc).__name__}: {exc}') from exc
    finally:
        sys.path.remove(path)


def _version(name: str) -> str:
    try:
        return __import__(name).__version__
    except Exception:  # noqa: BLE001
        return 'not installed'


def build_pretrain_model(variant: str, size: int, quick: bool, official_src: Optional[str] = None,
                         fastconvmae_src: Optional[str] = None, decoder_depth: Optional[int] = None
                         ) -> Tuple[torch.nn.Module, Callable]:
    """(model, forward) for a pretraining variant; forward(imgs, mask) -> loss."""
    arch, dec = (TINY_ENCODER, TINY_DECODER) if quick else (BASE, BASE_DECODER)
    dec = dict(dec, decoder_depth=decoder_depth or dec['decoder_depth'])
    if variant in ('official-source', 'fastconvmae-source'):
        official = (import_official(official_src) if variant == 'official-source' else
                    import_official(fastconvmae_src, 'models_fastconvmae', 'Alpha-VL/FastConvMAE'))
        from torch import nn
        p = (4, 2, 2)
        cls = official.MaskedAutoencoderConvViT if variant == 'official-source' else official.MaskedAutoencoderViT
        model = cls(
            img_size=[size, size // 4, size // 8], patch_size=list(p), in_chans=3, embed_dim=list(arch['embed_dims']),
            depth=list(arch['depths']), num_heads=arch['num_heads'], mlp_ratio=list(arch['mlp_ratios']),
            norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=True, **dec)
        return model, lambda imgs, mask: model(imgs, mask_ratio=0.75)[0]  # draws its own masks, same counts
    model = ConvMAEPretrainer(img_size=size, **arch, **dec, sparse=variant not in ('dense', 'official-formulation'),
                              masking='complementary' if variant == 'complementary' else 'block')
    if variant == 'official-formulation':
        with_explicit_attention(model)
    return model, lambda imgs, mask: model.forward_mae(imgs, mask, from_ratio=True).loss


def build_optim_wrapper(model: torch.nn.Module, dtype: str, device: str):
    """The paper config's optim wrapper (fused AdamW, MAE weight-decay groups), as the Runner builds it; for
    bf16 the one ``--amp`` selects."""
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper as build

    cfg = Config.fromfile(PRETRAIN_CONFIG).optim_wrapper
    if dtype == 'bf16':
        cfg = amp_optim_wrapper(cfg, device)
    return build(model, cfg)


def backbone_config(task: str, quick: bool) -> Tuple[dict, int]:
    """(ConvMAE keyword arguments, input size) of the detection (1024) or segmentation (512) config's backbone;
    tiny dimensions and sizes with ``quick``."""
    from mmengine.config import Config
    path, size = (DET_CONFIG, 1024) if task == 'det' else (SEG_CONFIG, 512)
    cfg = Config.fromfile(path).model.backbone.to_dict()
    for key in ('type', 'init_cfg', '_delete_', 'pretrained'):
        cfg.pop(key, None)
    cfg['drop_path_rate'] = 0.0
    if quick:
        cfg.update(TINY_ENCODER)
        size = 128 if task == 'det' else 64
        if cfg.get('window_size'):
            cfg['window_size'] = 4
        if cfg.get('global_attn_indexes'):
            cfg['global_attn_indexes'] = (0, 1)
    return cfg, size


# ------------------------------------------------------------------------------------------------ workers
def worker_gemm(cfg: dict) -> dict:
    """Best-of-N time of an n x n x n torch.mm: the device's GEMM ceiling in GFLOP/s."""
    n, device = cfg['gemm_n'], cfg['device']
    dt = torch.bfloat16 if cfg['dtype'] == 'bf16' else torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    out = torch.empty(n, n, device=device, dtype=dt)
    best = float('inf')
    for i in range(cfg['gemm_iters'] + 1):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        if i:
            best = min(best, time.perf_counter() - t0)
    return dict(n=n, seconds=best, gflops_per_s=2 * n ** 3 / best / 1e9)


def worker_pretrain(cfg: dict) -> dict:
    """One pretraining variant: forward + backward + optimizer step through the Runner's optim wrapper."""
    device, size, batch, variant = cfg['device'], cfg['img_size'], cfg['batch'], cfg['variant']
    torch.manual_seed(0)
    model, forward = build_pretrain_model(variant, size, cfg['quick'], cfg.get('official_src'),
                                          cfg.get('fastconvmae_src'), cfg.get('decoder_depth'))
    model = model.to(device).train()
    wrapper = build_optim_wrapper(model, cfg['dtype'], device)
    trainable_mb = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2 ** 20
    held_cpu = _current_rss_mb() + 2 * trainable_mb  # weights + two AdamW moments, before the first step
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randn(batch, 3, size, size, generator=gen).to(device)
    draw = MASKINGS['complementary' if variant == 'complementary' else 'block'].draw  # (B, 4, L) or (B, L)
    masks = [draw(batch, (size // 16) ** 2, 0.75, generator=gen).to(device) for _ in range(4)]
    steps = [0]  # a new mask every step (same shape), as in training
    compiled = variant.endswith('compiled')
    if compiled:
        forward = torch.compile(forward)

    def step():
        with wrapper.optim_context(model):
            loss = forward(imgs, masks[steps[0] % len(masks)])
        wrapper.update_params(loss)
        steps[0] += 1

    stats = CompileStats() if compiled else nullcontext()
    with stats:
        flops, times, held_cuda = _time_loop(step, device, cfg['warmup'], cfg['iters'], stats if compiled else None)
    held = held_cuda if device == 'cuda' else held_cpu
    peak = _peak_mb(device)  # before the profiled step, whose bookkeeping is not the model's memory
    res = dict(flops=flops, times=times, held_mb=held, peak_mb=peak,
               params=sum(p.numel() for p in model.parameters()), wrapper=type(wrapper).__name__,
               optimizer=f"{type(wrapper.optimizer).__name__}(fused={wrapper.optimizer.defaults.get('fused')})")
    if compiled:
        res['compile'] = stats.as_dict()
    else:
        with wrapper.optim_context(model):
            res['saved_mb'] = saved_for_backward_mb(model, lambda: forward(imgs, masks[0]))
    if cfg.get('profile'):
        res['breakdown'] = op_breakdown(step, device)
    if device == 'cpu':  # last: it changes the allocator's behaviour for the rest of the process
        res['live_mb'] = cpu_live_step_mb(step)
    return res


def worker_backbone(cfg: dict) -> dict:
    """One backbone variant (fused / explicit attention, eager / compiled), inference on a random image."""
    device, variant = cfg['device'], cfg['variant']
    kwargs, size = backbone_config(cfg['task'], cfg['quick'])
    torch.manual_seed(0)
    model = ConvMAE(**kwargs).to(device).eval()
    if variant == 'explicit':
        with_explicit_attention(model)
    with torch.no_grad():  # non-zero relative position tables (of any kind), as after training
        for name, p in model.named_parameters():
            if 'rel_pos' in name or 'relative_position_bias_table' in name:
                p.normal_(std=0.02)
    x = torch.randn(cfg['backbone_batch'], 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    held_cpu = _current_rss_mb()
    compiled = variant.endswith('compiled')
    forward = torch.compile(model) if compiled else model
    dtype = torch.bfloat16 if cfg['dtype'] == 'bf16' else None

    def step(amp: bool = True):
        with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=amp and dtype is not None):
            forward(x)

    stats = CompileStats() if compiled else nullcontext()
    with stats:  # FLOPs counted in fp32 (the same count): FlopCounterMode and CPU autocast fail on einsum
        flops, times, held_cuda = _time_loop(step, device, cfg['warmup'], cfg['iters'], stats if compiled else None,
                                             flop_step=partial(step, amp=False))
    res = dict(flops=flops, times=times, held_mb=held_cuda if device == 'cuda' else held_cpu,
               peak_mb=_peak_mb(device), size=size)
    if compiled:
        res['compile'] = stats.as_dict()
    return res


def build_data_pipeline(variant: str, root: str):
    """(dataset, collate_fn, keys): ``dataset[key]`` runs one sample through the ``variant`` pipeline; ours are
    collated by the base config's ``collate_fn``, as the Runner's loader does."""
    if variant == 'data-official':  # the official main_pretrain.py's transform_train on torchvision's ImageFolder
        transform = T.Compose([
            T.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
        dataset = tv_datasets.ImageFolder(root, transform=transform)
        return dataset, None, list(range(len(dataset)))
    cfg = Config.fromfile(PRETRAIN_CONFIG)
    pipeline, collate = cfg.train_pipeline, FUNCTIONS.get(cfg.train_dataloader.collate_fn['type'])
    if variant == 'data-ours-pil':
        pipeline[0]['decoder'] = 'pil'
    elif variant == 'data-ours-before':
        pipeline[:1] = [dict(type='LoadRGBImage'), dict(pipeline[0], type='MAERandomResizedCrop')]
        for key in ('decoder', 'reduced_decoding', 'backend_args'):
            pipeline[1].pop(key, None)
    dataset = DATASETS.build(dict(type='ImageFolderDataset', data_root=root, subdir=None, pipeline=pipeline))
    return dataset, collate, [(i, 1000 + i) for i in range(len(dataset))]  # as SeededSampler yields


def worker_data(cfg: dict) -> dict:
    """Images/s of one input pipeline: one process with one thread over the folder (``passes`` times, the first
    as warm-up), and a DataLoader with ``workers`` processes (one thread each) over it, batch 32."""
    MMLogger.get_instance('benchmark', log_level='WARNING')  # the dataset's listing message is not a result
    torch.set_num_threads(1)
    dataset, collate, keys = build_data_pipeline(cfg['variant'], cfg['data_root'])
    times = []
    for i in range(cfg['passes'] + 1):
        t0 = time.perf_counter()
        for key in keys:
            dataset[key]
        if i:
            times.append(time.perf_counter() - t0)
    res = dict(images=len(keys), times=times, per_process=len(keys) / statistics.median(times))
    if cfg['workers']:
        loader = torch.utils.data.DataLoader(_Keyed(dataset, keys), batch_size=32, shuffle=False,
                                             num_workers=cfg['workers'], collate_fn=collate,
                                             persistent_workers=True, worker_init_fn=_one_thread)
        for _ in loader:  # warm-up: starts the workers
            pass
        t0 = time.perf_counter()
        for _ in range(cfg['passes']):
            for _ in loader:
                pass
        res['loader'] = cfg['passes'] * len(keys) / (time.perf_counter() - t0)
    return res


class _Keyed(torch.utils.data.Dataset):
    """``dataset[keys[i]]`` as item ``i``."""

    def __init__(self, dataset, keys: list):
        self.dataset, self.keys = dataset, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        return self.dataset[self.keys[i]]


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)


WORKERS = dict(gemm=worker_gemm, pretrain=worker_pretrain, fast=worker_pretrain, backbone=worker_backbone,
               data=worker_data)


# ------------------------------------------------------------------------------------------------ driver
def run_worker(cfg: dict) -> dict:
    """Run one measurement in a fresh interpreter; its JSON result, or dict(error=...) when it failed."""
    env = dict(os.environ)
    env['PYTHONPATH'] = ROOT + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--worker', json.dumps(cfg)],
                          env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')]
    if proc.returncode or not lines:
        lines = (proc.stderr + proc.stdout).strip().splitlines()
        errors = [ln.strip() for ln in lines if 'Error' in ln and not ln.startswith(' ')]
        return dict(error=(errors or lines or ['no output'])[-1][:200], log=(proc.stdout + proc.stderr)[-3000:])
    return json.loads(lines[-1][len('RESULT '):])


def run_data_benchmark(args: argparse.Namespace) -> Tuple[dict, str]:
    """The input-pipeline rows: every variant once per round (fresh processes, interleaved), on one folder of
    ImageNet-like JPEGs written for the run; ratios are medians of the per-round ratios to the official row."""
    num = args.data_images or (32 if args.quick else 256)
    passes = 1 if args.quick else args.data_passes
    with tempfile.TemporaryDirectory() as tmp:
        write_photo_jpegs(tmp, num, size=(500, 375), quality=90)
        root = os.path.join(tmp, 'train')
        runs: Dict[str, list] = {v: [] for v in DATA_VARIANTS}
        for _ in range(args.rounds):
            for variant in DATA_VARIANTS:
                runs[variant].append(run_worker(dict(kind='data', variant=variant, data_root=root, passes=passes,
                                                     workers=args.data_workers)))
    return summarise_data(runs, num, passes, args.data_workers)


def summarise_data(runs: Dict[str, list], num: int, passes: int, workers: int) -> Tuple[dict, str]:
    """Per variant: median images/s (one process, one thread; and with ``workers`` loader processes) and the
    median over rounds of its ratio to the official pipeline in the same round; a markdown table."""
    official = runs['data-official']
    out: Dict[str, dict] = {}
    lines = [f'**Pretraining input pipeline: {num} JPEGs of real photographs, 500x375, quality 90, to 224x224 '
             f'({len(official)} rounds x {passes} passes, variants interleaved)**', '',
             f'| pipeline | images/s, 1 process, 1 thread | / official (range over rounds) | images/s, {workers} '
             f'loader workers | / official (range) |', '|---|---|---|---|---|']
    for variant, rs in runs.items():
        ok = [(r, o) for r, o in zip(rs, official) if 'error' not in r and 'error' not in o]
        if not ok:
            err = next((r['error'] for r in rs + official if 'error' in r), '?')
            lines.append(f'| {LABELS[variant]} | not run: {err} | | | |')
            out[variant] = dict(error=err)
            continue
        ratios = [r['per_process'] / o['per_process'] for r, o in ok]
        row = dict(per_process=statistics.median(r['per_process'] for r, _ in ok),
                   per_process_ratio=statistics.median(ratios), per_process_ratios=ratios)
        cells = [f"{row['per_process']:.0f}", f"{row['per_process_ratio']:.2f} ({min(ratios):.2f}-{max(ratios):.2f})"]
        if all('loader' in r and 'loader' in o for r, o in ok):
            ratios = [r['loader'] / o['loader'] for r, o in ok]
            row.update(loader=statistics.median(r['loader'] for r, _ in ok), loader_ratio=statistics.median(ratios),
                       loader_ratios=ratios)
            cells += [f"{row['loader']:.0f}", f"{row['loader_ratio']:.2f} ({min(ratios):.2f}-{max(ratios):.2f})"]
        out[variant] = row
        lines.append(f"| {LABELS[variant]} | " + ' | '.join(cells + ['-'] * (4 - len(cells))) + ' |')
    return dict(rows=out, images=num, passes=passes, workers=workers, rounds=len(official)), '\n'.join(lines)


def machine_description(device: str) -> str:
    if device == 'cuda':
        return f'{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})'
    model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            model = next(ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name'))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30
    return (f'{model}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads, '
            f'{mem:.0f} GiB RAM (torch {torch.__version__})')


def summarise(runs: List[dict], per: int, ceiling: float) -> dict:
    """Pool the rounds of one variant: all timed iterations, the largest peak and per-step memory."""
    ok = [r for r in runs if 'error' not in r]
    if not ok:
        return dict(runs[0])
    res = dict(ok[0])
    res['times'] = [t for r in ok for t in r['times']]
    best, median = min(res['times']), statistics.median(res['times'])
    res.update(best_s=best, median_s=median, img_per_s=per / median, rounds=len(ok),
               peak_mb=max(r['peak_mb'] for r in ok), step_mb=max(r['peak_mb'] - r['held_mb'] for r in ok))
    if all(r.get('live_mb') is not None for r in ok):
        res['live_mb'] = max(r['live_mb'] for r in ok)
    if res.get('flops'):
        res.update(gflop_per_item=res['flops'] / per / 1e9, gflops_per_s=res['flops'] / best / 1e9)
        res['pct_of_gemm'] = 100 * res['gflops_per_s'] / ceiling
    return res


def format_section(title: str, mem_name: str, rows: Sequence[Tuple[str, dict]],
                   reference: Optional[str] = None) -> str:
    """A markdown table of the variants; ratios (time, per-step memory) against the row named ``reference``."""
    ref = dict(rows).get(reference)
    saved = any('saved_mb' in r for _, r in rows)
    live = any('live_mb' in r for _, r in rows)
    head = (f'| variant | best s | median s | img/s | GFLOP/img | GFLOP/s | % of GEMM | peak {mem_name} MiB '
            f'| per-step MiB | time / {reference or "-"} | per-step mem / {reference or "-"} |'
            + (f' saved for backward MiB | saved / {reference or "-"} |' if saved else '')
            + (f' live per-step MiB | live / {reference or "-"} |' if live else ''))
    columns = 11 + 2 * saved + 2 * live
    lines = [f'**{title}**', '', head, '|' + '---|' * columns]
    for name, r in rows:
        if 'error' in r:
            lines.append(f'| {LABELS.get(name, name)} | not run: {r["error"]} |' + ' |' * (columns - 2))
            continue
        gf = (f"{r['gflop_per_item']:.3g} | {r['gflops_per_s']:.3g} | {r['pct_of_gemm']:.0f}%"
              if 'gflop_per_item' in r else '- | - | -')
        ratio = '| |'
        if ref is not None and 'error' not in ref:
            ratio = f"| {r['best_s'] / ref['best_s']:.2f} | {r['step_mb'] / max(ref['step_mb'], 1e-9):.2f} |"
        extra = ''
        if 'compile' in r:
            c = r['compile']
            extra = f" ({c['graphs']} graphs, {c['graph_breaks']} graph breaks, {c['recompiles']} recompilations)"
        if saved:
            ratio += f" {r['saved_mb']:.0f} |" if 'saved_mb' in r else ' |'
            ratio += (f" {r['saved_mb'] / ref['saved_mb']:.2f} |"
                      if 'saved_mb' in r and ref is not None and ref.get('saved_mb') else ' |')
        if live:
            ratio += f" {r['live_mb']:.0f} |" if 'live_mb' in r else ' |'
            ratio += (f" {r['live_mb'] / ref['live_mb']:.2f} |"
                      if 'live_mb' in r and ref is not None and ref.get('live_mb') else ' |')
        lines.append(f"| {LABELS.get(name, name)}{extra} | {r['best_s']:.3f} | {r['median_s']:.3f} | "
                     f"{r['img_per_s']:.1f} | {gf} | {r['peak_mb']:.0f} | {r['step_mb']:.0f} {ratio}")
    return '\n'.join(lines)


def format_breakdown(rows: Sequence[Tuple[str, dict]], clock: str) -> str:
    """Where one step's time goes (``--profile``): ms and share of the profiled step per op category."""
    cats = [name for name, _ in OP_CATEGORIES] + ['other']
    lines = [f'**Where a step\'s time goes ({clock} self time per op category, one profiled step; ms and share)**',
             '', '| variant | ' + ' | '.join(cats) + ' | total ms |', '|' + '---|' * (len(cats) + 2)]
    for name, r in rows:
        b = r.get('breakdown')
        if b:
            cells = ' | '.join(f"{b[c]:.0f} ({100 * b[c] / b['total']:.0f}%)" for c in cats)
            lines.append(f"| {LABELS.get(name, name)} | {cells} | {b['total']:.0f} |")
    return '\n'.join(lines)


def format_cross_ratios(entries: List[dict], reference: str, device: str) -> str:
    """Ratios between rows of different tables of one run: the bf16 step against the reference's fp32 step, and
    compiled against eager (best times; on CUDA also img/s)."""
    by_dtype = {e['dtype']: e.get('pretrain', {}) for e in entries}
    fp32, bf16 = by_dtype.get('fp32', {}), by_dtype.get('bf16', {})
    lines = [f'**Ratios across the tables of this run ({device}, best times)**', '', '| comparison | ratio |',
             '|---|---|']

    def add(label: str, num: Optional[dict], den: Optional[dict], higher: bool = False) -> None:
        if num and den and 'best_s' in num and 'best_s' in den:
            value = den['best_s'] / num['best_s'] if higher else num['best_s'] / den['best_s']
            lines.append(f'| {label} | {value:.2f} |')

    ref = LABELS[reference]
    add(f'sparse (ours) bf16 step / {ref} fp32 step', bf16.get('sparse'), fp32.get(reference))
    add(f'sparse (ours) fp32 step / {ref} fp32 step', fp32.get('sparse'), fp32.get(reference))
    add(f'sparse (ours) bf16 step / {ref} bf16 step', bf16.get('sparse'), bf16.get(reference))
    for dtype, rows in by_dtype.items():
        add(f'sparse compiled / sparse eager, {dtype}', rows.get('sparse-compiled'), rows.get('sparse'))
    if device == 'cuda':
        add(f'img/s: sparse (ours) bf16 / {ref} fp32', bf16.get('sparse'), fp32.get(reference), higher=True)
        add(f'img/s: sparse (ours) bf16 / {ref} bf16', bf16.get('sparse'), bf16.get(reference), higher=True)
    return '\n'.join(lines)


def format_fast_ratios(entries: List[dict], reference: str, device: str) -> str:
    """The Fast ConvMAE targets of this run: our complementary step (fp32, bf16) against the reference's fp32 step
    (time and per-step memory), and against our block-wise step on the same images."""
    by_dtype = {e['dtype']: e.get('fastconvmae', {}) for e in entries}
    fp32, bf16 = by_dtype.get('fp32', {}), by_dtype.get('bf16', {})
    ref = LABELS[reference]
    lines = [f'**Fast ConvMAE ratios of this run ({device}, best times)**', '', '| comparison | ratio |', '|---|---|']
    seen = set()
    for label, num, den, key in (
            (f'complementary (ours) fp32 step / {ref} fp32 step', fp32.get('complementary'), fp32.get(reference),
             'best_s'),
            (f'complementary (ours) bf16 step / {ref} fp32 step', bf16.get('complementary'), fp32.get(reference),
             'best_s'),
            (f'complementary (ours) fp32 per-step memory / {ref} fp32 per-step memory', fp32.get('complementary'),
             fp32.get(reference), 'step_mb'),
            (f'complementary (ours) fp32 saved for backward / {ref} fp32', fp32.get('complementary'),
             fp32.get(reference), 'saved_mb'),
            (f'complementary (ours) fp32 live per-step memory / {ref} fp32', fp32.get('complementary'),
             fp32.get(reference), 'live_mb'),
            ('complementary (ours) fp32 step / sparse (ours, block-wise) fp32 step, same images',
             fp32.get('complementary'), fp32.get('sparse'), 'best_s')):
        pair = (id(num), id(den), key)
        if num and den and num.get(key) and den.get(key) and pair not in seen:
            seen.add(pair)
            lines.append(f'| {label} | {num[key] / den[key]:.2f} |')
    ref_fp32 = fp32.get(reference) or {}
    for entry in entries:  # the step's arithmetic alone, at this device's GEMM ceiling: no implementation is faster
        ours, ceiling = entry.get('fastconvmae', {}).get('complementary') or {}, entry['gemm'].get('gflops_per_s')
        if ours.get('flops') and ceiling and ref_fp32.get('best_s'):
            floor = ours['flops'] / (ceiling * 1e9)
            lines.append(f"| complementary (ours) step's FLOPs at the {entry['dtype']} GEMM ceiling ({floor:.2f} s) / "
                         f"{ref} fp32 step: the floor of the {entry['dtype']} ratio | "
                         f"{floor / ref_fp32['best_s']:.2f} |")
    return '\n'.join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'],
                        help='auto: CPU, and CUDA as well when available')
    parser.add_argument('--dtype', default='all', choices=['all', 'fp32', 'bf16'],
                        help='fp32 and/or bf16 (the --amp wrapper) rows; bf16 only where the device supports it')
    parser.add_argument('--iters', type=int, default=3, help='timed iterations per variant')
    parser.add_argument('--warmup', type=int, default=3, help='warm-up iterations; the first is FLOP-counted')
    parser.add_argument('--rounds', type=int, default=1,
                        help='fresh-process runs per variant, alternating variants; times are pooled')
    parser.add_argument('--batch', type=int, help='pretraining batch per device (default 8 on CPU, 128 on CUDA)')
    parser.add_argument('--backbone-batch', type=int, default=1, help='backbone forward batch size')
    parser.add_argument('--quick', action='store_true', help='tiny model and sizes: a smoke run')
    parser.add_argument('--only', choices=['pretrain', 'fastconvmae', 'backbone', 'data'],
                        help='run one comparison (pretrain, fastconvmae, backbone: and the GEMM ceiling)')
    parser.add_argument('--fast-batch', type=int,
                        help='Fast ConvMAE step: images per device, 4 views each (default 2 on CPU, 64 on CUDA)')
    parser.add_argument('--fastconvmae-src', metavar='PATH',
                        help='a checkout of Alpha-VL/FastConvMAE: also time its MaskedAutoencoderViT')
    parser.add_argument('--data-images', type=int, help='JPEGs in the data benchmark folder (default 256)')
    parser.add_argument('--data-workers', type=int, default=os.cpu_count(),
                        help='DataLoader worker processes of the N-worker data row (0: no such row)')
    parser.add_argument('--data-passes', type=int, default=2, help='timed passes over the folder per data run')
    parser.add_argument('--official-src', metavar='PATH',
                        help='a checkout of Alpha-VL/ConvMAE: also time its MaskedAutoencoderConvViT')
    parser.add_argument('--compile', action='store_true', help='add torch.compile rows (sparse step, backbone)')
    parser.add_argument('--profile', action='store_true',
                        help="profile one more pretraining step per variant: time per op category")
    parser.add_argument('--json', metavar='OUT', help='also write all results to this JSON file')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None and (args.warmup < 1 or args.iters < 1 or args.rounds < 1):
        parser.error('--warmup, --iters and --rounds must be at least 1')
    if args.official_src and not os.path.isfile(os.path.join(args.official_src, 'models_convmae.py')):
        parser.error(f'--official-src {args.official_src}: not a checkout of Alpha-VL/ConvMAE (no models_convmae.py)')
    if args.fastconvmae_src and not os.path.isfile(os.path.join(args.fastconvmae_src, 'models_fastconvmae.py')):
        parser.error(f'--fastconvmae-src {args.fastconvmae_src}: not a checkout of Alpha-VL/FastConvMAE '
                     '(no models_fastconvmae.py)')
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the benchmark; print the tables and return the report (also written to ``--json``)."""
    args = parse_args(argv)
    if args.worker:
        cfg = json.loads(args.worker)
        print('RESULT ' + json.dumps(WORKERS[cfg['kind']](cfg)), flush=True)
        return {}
    devices = ['cpu', 'cuda'] if args.device == 'auto' else [args.device]
    devices = [d for d in devices if d == 'cpu' or torch.cuda.is_available()]
    if not devices:
        raise SystemExit('CUDA requested but not available')
    report, text = dict(results=[]), []
    if args.only in (None, 'data'):
        report['data'], data_text = run_data_benchmark(args)
        text += [data_text, '']
    for device in (devices if args.only != 'data' else []):
        dtypes = [d for d in ('fp32', 'bf16') if args.dtype in ('all', d) and (d == 'fp32' or supports_bf16(device))]
        batch = args.batch or (128 if device == 'cuda' else 8)
        common = dict(quick=args.quick, warmup=args.warmup, iters=args.iters, device=device,
                      batch=2 if args.quick else batch,
                      # the official code is hard-wired to 224x224 (a 14x14 token grid)
                      img_size=64 if args.quick and not (args.official_src or args.fastconvmae_src) else 224,
                      backbone_batch=args.backbone_batch, official_src=args.official_src,
                      fastconvmae_src=args.fastconvmae_src,
                      fast_batch=2 if args.quick else (args.fast_batch or (64 if device == 'cuda' else 2)),
                      gemm_n=512 if args.quick else 4096, gemm_iters=3 if args.quick else 10)
        report['config'] = common
        pre = ['sparse', 'dense', 'official-formulation']
        pre += ['official-source'] if args.official_src else []
        pre += ['sparse-compiled'] if args.compile else []
        bb = ['fused', 'explicit'] + (['fused-compiled'] if args.compile else [])
        fast = ['complementary', 'sparse'] + (['fastconvmae-source'] if args.fastconvmae_src else [])
        jobs = [('gemm', None, None)]
        if args.only in (None, 'pretrain'):
            jobs += [('pretrain', v, None) for v in pre]
        if args.only in (None, 'fastconvmae'):
            jobs += [('fast', v, None) for v in fast]
        if args.only in (None, 'backbone'):
            jobs += [('backbone', v, task) for task in ('det', 'seg') for v in bb]
        runs: Dict[tuple, list] = {(dtype, *job): [] for dtype in dtypes for job in jobs}
        for _ in range(args.rounds):  # alternate variants and dtypes, so that load drift hits all of them
            for dtype in dtypes:
                for kind, variant, task in jobs:
                    runs[(dtype, kind, variant, task)].append(run_worker(dict(
                        common, dtype=dtype, kind=kind, variant=variant, task=task,
                        # the official Fast ConvMAE class always builds 8 decoder blocks (the tiny decoder has 1)
                        **(dict(batch=common['fast_batch'], decoder_depth=8) if kind == 'fast' else {}),
                        profile=args.profile and kind in ('pretrain', 'fast'))))
        entries = []
        for dtype in dtypes:
            cfg = dict(common, dtype=dtype)
            gemm = max(runs[(dtype, 'gemm', None, None)], key=lambda r: r.get('gflops_per_s', 0))
            ceiling = gemm['gflops_per_s']
            entry = dict(device=device, dtype=dtype, machine=machine_description(device), gemm=gemm,
                         batch=cfg['batch'])
            mem = 'GPU alloc' if device == 'cuda' else 'RSS'
            arch = 'tiny' if args.quick else 'Base'
            text += [f'### {device} {dtype}: {entry["machine"]}', '',
                     f"GEMM ceiling ({gemm['n']}^3 {dtype} torch.mm, best of {args.rounds} x {cfg['gemm_iters']}): "
                     f"**{ceiling:.1f} GFLOP/s**", '']
            size = f"ConvMAE-{arch} {cfg['img_size']}x{cfg['img_size']}"
            steps = [('pretrain', 'pretrain', pre, cfg['batch'], f"Pretraining step, {size}, batch {cfg['batch']}",
                      'official-source' if args.official_src else 'official-formulation'),
                     ('fastconvmae', 'fast', fast, cfg['fast_batch'],
                      f"Fast ConvMAE step, {size}, batch {cfg['fast_batch']} images (complementary: 4 views each; "
                      f"sparse: block-wise, one mask each)", 'fastconvmae-source' if args.fastconvmae_src else 'sparse')]
            for name, kind, variants, batch, title, ref in steps:
                if args.only not in (None, name):
                    continue
                rows = [(v, summarise(runs[(dtype, kind, v, None)], batch, ceiling)) for v in variants]
                entry[name] = dict(rows)
                wrapper = next((r.get('wrapper') for _, r in rows if 'wrapper' in r), '?')
                text += [format_section(f"{title}, mask 0.75, fwd+bwd+optimizer through {wrapper} ({args.rounds} x "
                                        f"{args.iters} timed iterations)", mem, rows, ref), '']
                if args.profile:
                    text += [format_breakdown(rows, 'CPU' if device == 'cpu' else 'CUDA'), '']
            if args.only in (None, 'backbone'):
                for task in ('det', 'seg'):
                    rows = [(v, summarise(runs[(dtype, 'backbone', v, task)], cfg['backbone_batch'], ceiling))
                            for v in bb]
                    entry[f'backbone_{task}'] = dict(rows)
                    size = next((r['size'] for _, r in rows if 'size' in r), '?')
                    text += [format_section(
                        f"Backbone forward ({task} config), ConvMAE-{arch} {size}x{size}, batch "
                        f"{cfg['backbone_batch']}, inference", mem, rows, 'explicit'), '']
            entries.append(entry)
        if args.only in (None, 'pretrain'):
            ref = 'official-source' if args.official_src else 'official-formulation'
            text += [format_cross_ratios(entries, ref, device), '']
        if args.only in (None, 'fastconvmae'):
            ref = 'fastconvmae-source' if args.fastconvmae_src else 'sparse'
            text += [format_fast_ratios(entries, ref, device), '']
        report['results'] += entries
    print('\n'.join(text))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == '__main__':
    main()
