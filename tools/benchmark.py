"""Benchmark ConvMAE: sparse vs dense pretraining step, fused vs explicit attention in the 1024x1024 backbone.

One run measures, side by side and per device (CPU; CUDA too when available, in fp32 and bf16 autocast):

1. a ConvMAE-Base pretraining step (224x224, mask ratio 0.75, forward + backward + the optimizer of the paper
   config, fused AdamW with its weight-decay groups) with the sparse stage-1/2 path and with the dense reference
   path, and the memory floor both share (libraries, parameters, gradients, AdamW moments);
2. a ConvMAE-Base backbone forward at 1024x1024 (window 16, global blocks 0, 3, 6, 10, relative position
   bias) with fused attention (``F.scaled_dot_product_attention``) and with the explicit softmax(QK^T)V;
3. an fp32 (and bf16) GEMM ceiling of the same device (a large ``torch.mm``), to put the achieved GFLOP/s
   of 1. and 2. in relation.

Every variant runs in a fresh subprocess, so that its peak memory (peak RSS on CPU, ``max_memory_allocated``
on CUDA) is its own. FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions;
CPU flash attention is counted with the same formula as the CUDA kernels, and the backward of grouped
convolutions with their groups), measured on the first warm-up step.

    PYTHONPATH=. python tools/benchmark.py                # CPU (and CUDA if present), default sizes
    PYTHONPATH=. python tools/benchmark.py --quick        # tiny sizes, a smoke run of a few seconds
    PYTHONPATH=. python tools/benchmark.py --device cuda --iters 10 --json bench.json
    PYTHONPATH=. python tools/benchmark.py --only pretrain --batch 32   # how memory scales with the batch
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, '') and ROOT not in sys.path:
    sys.path.insert(0, ROOT)
PRETRAIN_CONFIG = os.path.join(ROOT, 'configs', 'pretrain', 'convmae-b_8xb128-1600e_in1k.py')

BASE = dict(embed_dims=(256, 384, 768), depths=(2, 2, 11), num_heads=12, mlp_ratios=4)
BASE_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
TINY = dict(embed_dims=(32, 48, 96), depths=(1, 1, 2), num_heads=4, mlp_ratios=4)
TINY_DECODER = dict(decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4)


# ------------------------------------------------------------------------------------------------ worker side
def _sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def _current_rss_mb() -> float:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


def _flop_counter():
    """FlopCounterMode that also counts the CPU flash-attention kernels (same formula as the CUDA ones)."""
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
    # conv (C times too much: +32 GFLOP/img for ConvMAE-Base at 224); each of grad_input and grad_weight costs
    # the forward's multiply-adds
    mapping[aten.convolution_backward] = (
        lambda grad_out, x, w, _bias, _stride, _padding, _dilation, transposed, _out_pad, _groups, output_mask,
        out_shape=None: fc.conv_flop_count(x, w, grad_out, transposed) * (int(output_mask[0]) + int(output_mask[1])))
    return fc.FlopCounterMode(display=False, custom_mapping=mapping)


def _memory_mb(device: str) -> float:
    """Memory in use now: allocated tensors on CUDA, resident set size on CPU."""
    return torch.cuda.memory_allocated() / 2 ** 20 if device == 'cuda' else _current_rss_mb()


def _time_loop(step, device: str, warmup: int, iters: int):
    """Run ``step`` warmup + iters times; the first warm-up step is FLOP-counted. Returns (flops, times)."""
    counter = _flop_counter()
    with counter:
        step()
    for _ in range(warmup - 1):
        step()
    _sync(device)
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return counter.get_total_flops(), times


def _peak_mb(device: str) -> float:
    if device == 'cuda':
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _autocast(device: str, dtype: str):
    if dtype == 'bf16':
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return nullcontext()


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


def build_pretrain_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer of the paper pretraining config (fused AdamW, MAE weight-decay groups), built as the
    Runner of ``tools/pretrain.py`` builds it."""
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    return build_optim_wrapper(model, Config.fromfile(PRETRAIN_CONFIG).optim_wrapper).optimizer


def worker_pretrain(cfg: dict) -> dict:
    """One variant (sparse / dense) of the pretraining step: forward_mae + backward + optimizer step."""
    from convmae_backbone.models import ConvMAEPretrainer
    from convmae_backbone.models.masking import random_mask
    device, size, batch = cfg['device'], cfg['img_size'], cfg['batch']
    torch.manual_seed(0)
    arch, dec = (TINY, TINY_DECODER) if cfg['quick'] else (BASE, BASE_DECODER)
    model = ConvMAEPretrainer(img_size=size, **arch, **dec, sparse=cfg['variant'] == 'sparse').to(device).train()
    opt = build_pretrain_optimizer(model)
    # held between steps by any variant: the process with its weights (measured before the first step) and two
    # AdamW moments per trainable parameter; at the end of every backward the gradients come on top (the floor)
    trainable_mb = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2 ** 20
    held_mb = _memory_mb(device) + 2 * trainable_mb
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randn(batch, 3, size, size, generator=gen).to(device)
    mask = random_mask(batch, (size // 16) ** 2, 0.75, generator=gen).to(device)

    def step():
        with _autocast(device, cfg['dtype']):
            loss = model.forward_mae(imgs, mask)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops, times = _time_loop(step, device, cfg['warmup'], cfg['iters'])
    return dict(flops=flops, times=times, held_mb=held_mb, peak_mb=_peak_mb(device),
                params=sum(p.numel() for p in model.parameters()), floor_mb=held_mb + trainable_mb,
                optimizer=f"{type(opt).__name__}(fused={opt.defaults.get('fused')})")


def worker_backbone(cfg: dict) -> dict:
    """One variant (fused / explicit attention) of the ConvMAE-Base backbone forward (inference)."""
    from convmae_backbone.models import ConvMAE
    from convmae_backbone.models.attention import Attention
    from convmae_backbone.models.reference import with_explicit_attention
    device, size = cfg['device'], cfg['backbone_size']
    torch.manual_seed(0)
    arch = TINY if cfg['quick'] else BASE
    global_blocks = (0, 1) if cfg['quick'] else (0, 3, 6, 10)
    model = ConvMAE(img_size=size, **arch, window_size=cfg['window'], global_attn_indexes=global_blocks,
                    use_rel_pos_bias=True, out_indices=(0, 1, 2, 3)).to(device).eval()
    if cfg['variant'] == 'explicit':
        with_explicit_attention(model)
    for m in model.modules():
        if isinstance(m, Attention):
            with torch.no_grad():  # non-zero relative position tables, as after training
                m.rel_pos_h.normal_(std=0.02)
                m.rel_pos_w.normal_(std=0.02)
    x = torch.randn(cfg['backbone_batch'], 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    held_mb = _memory_mb(device)  # the process with its weights and the input

    def step():
        with torch.inference_mode(), _autocast(device, cfg['dtype']):
            model(x)

    flops, times = _time_loop(step, device, cfg['warmup'], cfg['iters'])
    return dict(flops=flops, times=times, held_mb=held_mb, peak_mb=_peak_mb(device))


WORKERS = dict(gemm=worker_gemm, pretrain=worker_pretrain, backbone=worker_backbone)


# ------------------------------------------------------------------------------------------------ driver side
def run_worker(cfg: dict) -> dict:
    """Run one measurement in a fresh interpreter and return its JSON result."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env['PYTHONPATH'] = root + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--worker', json.dumps(cfg)],
                          env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')]
    if proc.returncode or not lines:
        raise RuntimeError(f'benchmark worker {cfg} failed:\n{proc.stdout}\n{proc.stderr}')
    return json.loads(lines[-1][len('RESULT '):])


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


def summarise(runs: list, per: int, ceiling: float) -> dict:
    """Pool the runs (rounds) of one variant: all timed iterations, the largest peak memory."""
    res = dict(runs[0])
    res['times'] = [t for r in runs for t in r['times']]
    worst = max(runs, key=lambda r: r['peak_mb'])
    best = min(res['times'])
    res.update(best_s=best, median_s=statistics.median(res['times']), gflop_per_item=res['flops'] / per / 1e9,
               gflops_per_s=res['flops'] / best / 1e9, peak_mb=worst['peak_mb'], held_mb=worst['held_mb'],
               work_mb=max(r['peak_mb'] - r['held_mb'] for r in runs), rounds=len(runs))
    res['pct_of_gemm'] = 100 * res['gflops_per_s'] / ceiling
    return res


def ratios(a: dict, b: dict) -> dict:
    return dict(time=a['best_s'] / b['best_s'], median_time=a['median_s'] / b['median_s'],
                peak_mem=a['peak_mb'] / b['peak_mb'], work_mem=a['work_mb'] / b['work_mb'],
                flops=a['flops'] / b['flops'])


def format_section(title: str, mem_name: str, rows, ratio_name: str, ratio: dict, per_name: str) -> str:
    head = (f'| variant | best s | median s | GFLOP/{per_name} | GFLOP/s | % of GEMM | peak {mem_name} MiB '
            f'| peak - held MiB |')
    lines = [f'**{title}** ({rows[0][1]["rounds"]} x {len(rows[0][1]["times"]) // rows[0][1]["rounds"]} timed '
             f'iterations per variant)', '', head, '|' + '---|' * 8]
    for name, r in rows:
        lines.append(f"| {name} | {r['best_s']:.3f} | {r['median_s']:.3f} | {r['gflop_per_item']:.1f} | "
                     f"{r['gflops_per_s']:.1f} | {r['pct_of_gemm']:.0f}% | {r['peak_mb']:.0f} | {r['work_mb']:.0f} |")
    lines.append(f"| **{ratio_name}** | **{ratio['time']:.2f}** | {ratio['median_time']:.2f} | "
                 f"{ratio['flops']:.2f} | | | **{ratio['peak_mem']:.2f}** | **{ratio['work_mem']:.2f}** |")
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'],
                        help='auto: CPU, and CUDA as well when available')
    parser.add_argument('--iters', type=int, default=3, help='timed iterations per variant')
    parser.add_argument('--warmup', type=int, default=3,
                        help='warm-up iterations; the first is FLOP-counted (and leaves the process cold: the step '
                             'after it was 8-28%% slower than later ones for the sparse path on CPU)')
    parser.add_argument('--rounds', type=int, default=1,
                        help='fresh-process runs per variant, alternating variants; times are pooled')
    parser.add_argument('--batch', type=int, default=8, help='pretraining batch size')
    parser.add_argument('--backbone-batch', type=int, default=1, help='backbone forward batch size')
    parser.add_argument('--quick', action='store_true', help='tiny model and sizes: a smoke run')
    parser.add_argument('--only', choices=['pretrain', 'backbone'], help='run one comparison (and the GEMM ceiling)')
    parser.add_argument('--json', metavar='OUT', help='also write all results to this JSON file')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        cfg = json.loads(args.worker)
        print('RESULT ' + json.dumps(WORKERS[cfg['kind']](cfg)), flush=True)
        return
    if args.warmup < 1 or args.iters < 1 or args.rounds < 1:
        parser.error('--warmup, --iters and --rounds must be at least 1')

    devices = ['cpu', 'cuda'] if args.device == 'auto' else [args.device]
    devices = [d for d in devices if d == 'cpu' or torch.cuda.is_available()]
    if not devices:
        parser.error('CUDA requested but not available')
    common = dict(quick=args.quick, warmup=args.warmup, iters=args.iters,
                  batch=2 if args.quick else args.batch, img_size=64 if args.quick else 224,
                  backbone_batch=args.backbone_batch, backbone_size=128 if args.quick else 1024,
                  window=4 if args.quick else 16,
                  gemm_n=512 if args.quick else 4096, gemm_iters=3 if args.quick else 10)
    report, text = dict(config=common, results=[]), []
    for device in devices:
        for dtype in (['fp32', 'bf16'] if device == 'cuda' else ['fp32']):
            cfg = dict(common, device=device, dtype=dtype)
            pairs = dict(pretrain=('sparse', 'dense'), backbone=('fused', 'explicit'))
            if args.only:
                pairs = {args.only: pairs[args.only]}
            runs = {v: [] for pair in pairs.values() for v in pair}
            runs['gemm'] = []
            for _ in range(args.rounds):  # alternate the variants, so that load drift hits all of them
                runs['gemm'].append(run_worker(dict(cfg, kind='gemm')))
                for kind, pair in pairs.items():
                    for v in pair:
                        runs[v].append(run_worker(dict(cfg, kind=kind, variant=v)))
            gemm = max(runs['gemm'], key=lambda r: r['gflops_per_s'])  # the ceiling: best of all rounds
            ceiling = gemm['gflops_per_s']
            entry = dict(device=device, dtype=dtype, machine=machine_description(device), gemm=gemm)
            mem = 'GPU alloc' if device == 'cuda' else 'RSS'
            size, arch = cfg['img_size'], 'tiny' if args.quick else 'Base'
            text += [f'### {device} {dtype}: {entry["machine"]}', '',
                     f"GEMM ceiling ({gemm['n']}^3 {dtype} torch.mm, best of {args.rounds} x {cfg['gemm_iters']}): "
                     f"**{ceiling:.1f} GFLOP/s**", '']
            if 'pretrain' in pairs:
                pre = {v: summarise(runs[v], cfg['batch'], ceiling) for v in ('sparse', 'dense')}
                entry.update(pretrain=pre, pretrain_ratio=ratios(pre['sparse'], pre['dense']))
                floor = max(pre['sparse']['floor_mb'], pre['dense']['floor_mb'])
                entry['pretrain_ratio']['floor_over_dense_peak'] = floor / pre['dense']['peak_mb']
                text += [
                    format_section(f"Pretraining step, ConvMAE-{arch} {size}x{size}, batch {cfg['batch']}, mask 0.75, "
                                   f"fwd+bwd+{pre['sparse']['optimizer']}", mem,
                                   [('sparse', pre['sparse']), ('dense', pre['dense'])],
                                   'sparse / dense', entry['pretrain_ratio'], 'img'), '',
                    f"Memory floor of both variants (process with its weights, plus one gradient and two AdamW "
                    f"moments per trainable parameter): {floor:.0f} MiB = "
                    f"**{entry['pretrain_ratio']['floor_over_dense_peak']:.2f}** of the dense peak; no variant's "
                    f"peak ratio can be lower.", '']
            if 'backbone' in pairs:
                bb = {v: summarise(runs[v], cfg['backbone_batch'], ceiling) for v in ('fused', 'explicit')}
                entry.update(backbone=bb, backbone_ratio=ratios(bb['fused'], bb['explicit']))
                text += [
                    format_section(f"Backbone forward, ConvMAE-{arch} {cfg['backbone_size']}x{cfg['backbone_size']}, "
                                   f"batch {cfg['backbone_batch']}, window {cfg['window']}, rel-pos bias", mem,
                                   [('fused (ours)', bb['fused']), ('explicit softmax(QK^T)V', bb['explicit'])],
                                   'fused / explicit', entry['backbone_ratio'], 'img'), '']
            report['results'].append(entry)
    print('\n'.join(text))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=1)


if __name__ == '__main__':
    main()
