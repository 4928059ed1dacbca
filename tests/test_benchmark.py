"""tools/benchmark.py: its FLOP counting, a quick smoke run of the pretraining comparison (eager, compiled,
fp32 and bf16) and a clear report when the official code cannot be used."""
import json
import re
import subprocess
import sys
from typing import Tuple

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, load_tool

benchmark = load_tool('benchmark')


@pytest.mark.parametrize('groups', [1, 8])
def test_flop_counter_counts_grouped_conv_backward_by_its_groups(groups):
    """Forward, grad_input and grad_weight of a conv each cost the forward's multiply-adds (2 FLOPs each)."""
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    w = torch.randn(8, 8 // groups, 5, 5, requires_grad=True)
    macs = 2 * 8 * 6 * 6 * (8 // groups) * 25  # N * C_out * H * W * C_in/groups * k*k
    counter = benchmark.flop_counter()
    with counter:
        F.conv2d(x, w, padding=2, groups=groups).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * macs
    counter = benchmark.flop_counter()
    with counter:  # no grad_input wanted: only grad_weight is computed and counted
        F.conv2d(x.detach(), w, padding=2, groups=groups).sum().backward()
    assert counter.get_total_flops() == 2 * 2 * macs


def _quick(tmp_path, *args) -> Tuple[dict, str]:
    out = tmp_path / 'bench.json'
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / 'benchmark.py'), '--quick', '--only', 'pretrain',
                           '--iters', '1', '--warmup', '2', '--device', 'cpu', '--json', str(out), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert 'official formulation (our reimplementation)' in proc.stdout and 'Backbone forward' not in proc.stdout
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.parametrize('dtype', ['fp32', 'bf16'])
def test_quick_pretrain_comparison(tmp_path, dtype):
    """fp32 through OptimWrapper, eager and compiled; bf16 through the wrapper --amp selects on CPU."""
    report, text = _quick(tmp_path, '--dtype', dtype, *(['--compile', '--profile'] if dtype == 'fp32' else []))
    entry, = report['results']
    assert entry['dtype'] == dtype and entry['gemm']['gflops_per_s'] > 0
    rows = entry['pretrain']
    eager = [rows[v] for v in ('sparse', 'dense', 'official-formulation')]
    wrapper = 'OptimWrapper' if dtype == 'fp32' else 'BF16OptimWrapper'
    assert all(r['wrapper'] == wrapper and r['optimizer'] == 'AdamW(fused=True)' for r in eager)
    assert len({r['params'] for r in eager}) == 1
    assert 0.3 < rows['sparse']['flops'] / rows['dense']['flops'] < 0.8  # stage 1-2 work skipped
    # explicit attention: the same matmuls as SDPA (as the FLOP counter credits them), up to 1 %
    assert rows['official-formulation']['flops'] == pytest.approx(rows['dense']['flops'], rel=0.01)
    for r in eager:
        assert r['best_s'] > 0 and r['img_per_s'] > 0 and 0 < r['held_mb'] < r['peak_mb']
    # activations kept for the backward: the sparse path keeps stage-1/2 activations of visible blocks only
    assert 0 < rows['sparse']['saved_mb'] < 0.8 * rows['dense']['saved_mb']
    assert 'saved for backward MiB' in text
    if dtype == 'fp32':
        compiled = rows['sparse-compiled']['compile']
        assert compiled['graphs'] >= 1 and compiled['recompiles'] == 0  # new masks each step: no recompilation
        assert rows['sparse-compiled']['best_s'] > 0
        # --profile: one more step per variant, split by op category; the categories add up to the total
        for r in eager:
            b = r['breakdown']
            assert b['GEMM'] > 0 and b['optimizer'] > 0 and b['compiled kernels'] == 0
            assert sum(v for k, v in b.items() if k != 'total') == pytest.approx(b['total'])
        assert rows['sparse-compiled']['breakdown']['compiled kernels'] > 0
        assert "Where a step's time goes" in text
        ratios = dict(re.findall(r'^\| (sparse [^|]+) \| ([0-9.]+) \|$', text, re.M))
        ref = rows['official-formulation']['best_s']
        assert float(ratios['sparse compiled / sparse eager, fp32']) == pytest.approx(
            rows['sparse-compiled']['best_s'] / rows['sparse']['best_s'], abs=0.006)
        assert float(ratios['sparse (ours) fp32 step / official formulation (our reimplementation) fp32 step']) == \
            pytest.approx(rows['sparse']['best_s'] / ref, abs=0.006)
    else:  # no profile asked for; no fp32 rows to compare the bf16 step with
        assert "Where a step's time goes" not in text and 'fp32 step |' not in text
        assert 'sparse (ours) bf16 step / official formulation (our reimplementation) bf16 step' in text


def test_quick_backbone_rows_from_the_det_and_seg_configs(tmp_path):
    out = tmp_path / 'bench.json'
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / 'benchmark.py'), '--quick', '--only', 'backbone',
                           '--iters', '1', '--warmup', '1', '--device', 'cpu', '--dtype', 'bf16', '--json', str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    entry, = json.loads(out.read_text())['results']
    for task, size in (('det', 128), ('seg', 64)):  # the quick sizes of the 1024 (det) and 512 (seg) rows
        fused, explicit = entry[f'backbone_{task}']['fused'], entry[f'backbone_{task}']['explicit']
        assert fused['size'] == explicit['size'] == size
        assert fused['flops'] == pytest.approx(explicit['flops'], rel=0.01) and fused['best_s'] > 0
    assert 'Backbone forward (det config)' in proc.stdout and 'Pretraining step' not in proc.stdout


def test_official_source_that_cannot_be_imported_is_reported(tmp_path):
    (tmp_path / 'models_convmae.py').write_text('import module_that_does_not_exist\n')
    with pytest.raises(ImportError, match=r'cannot be imported .*ModuleNotFoundError.*module_that_does_not_exist'):
        benchmark.import_official(str(tmp_path))
    with pytest.raises(ImportError, match='not a checkout of Alpha-VL/ConvMAE'):
        benchmark.import_official(str(tmp_path / 'nowhere'))


def test_quick_data_rows(tmp_path):
    """--only data: every pipeline's images/s (one process; a loader with one worker) and its ratio to the
    official pipeline of the same round."""
    out = tmp_path / 'bench.json'
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / 'benchmark.py'), '--quick', '--only', 'data',
                           '--data-images', '16', '--data-workers', '1', '--json', str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())['data']['rows']
    assert set(rows) == set(benchmark.DATA_VARIANTS)
    assert rows['data-official']['per_process_ratio'] == 1.0 and rows['data-official']['loader_ratio'] == 1.0
    for row in rows.values():
        assert row['per_process'] > 0 and row['loader'] > 0 and row['per_process_ratio'] > 0
    assert 'images/s, 1 process, 1 thread' in proc.stdout and 'Pretraining step' not in proc.stdout


def test_quick_fastconvmae_rows(tmp_path):
    """The Fast ConvMAE rows: our complementary step and our block-wise step on the same images, fp32 and bf16,
    with their ratios; four views cost four block-wise forwards (FLOPs), every image once per view."""
    out = tmp_path / 'bench.json'
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / 'benchmark.py'), '--quick', '--only', 'fastconvmae',
                           '--iters', '1', '--warmup', '1', '--device', 'cpu', '--json', str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    entries = json.loads(out.read_text())['results']
    assert [e['dtype'] for e in entries] == ['fp32', 'bf16']
    for entry in entries:
        rows = entry['fastconvmae']
        assert set(rows) == {'complementary', 'sparse'} and 'pretrain' not in entry
        assert rows['complementary']['flops'] == pytest.approx(4 * rows['sparse']['flops'], rel=0.02)
        assert rows['complementary']['params'] == rows['sparse']['params']
        assert all(r['best_s'] > 0 and r['saved_mb'] > 0 and r['live_mb'] > 0 for r in rows.values())
    assert 'Fast ConvMAE step, ConvMAE-tiny 64x64, batch 2 images' in proc.stdout
    ratios = dict(re.findall(r'^\| (complementary [^|]+) \| ([0-9.]+) \|$', proc.stdout, re.M))
    fp32 = entries[0]['fastconvmae']
    assert float(ratios['complementary (ours) fp32 step / sparse (ours) fp32 step']) == pytest.approx(
        fp32['complementary']['best_s'] / fp32['sparse']['best_s'], abs=0.006)
    assert 'complementary (ours) bf16 step / sparse (ours) fp32 step' in ratios
    assert float(ratios['complementary (ours) fp32 live per-step memory / sparse (ours) fp32']) == pytest.approx(
        fp32['complementary']['live_mb'] / fp32['sparse']['live_mb'], abs=0.006)
    for entry in entries:  # the step's FLOPs at the dtype's GEMM ceiling, over the reference's fp32 step
        floor = entry['fastconvmae']['complementary']['flops'] / (entry['gemm']['gflops_per_s'] * 1e9)
        label = (f"complementary (ours) step's FLOPs at the {entry['dtype']} GEMM ceiling ({floor:.2f} s) / sparse "
                 f"(ours) fp32 step: the floor of the {entry['dtype']} ratio")
        assert float(ratios[label]) == pytest.approx(floor / fp32['sparse']['best_s'], abs=0.006)


def _cpu_live_step_mb_in_a_child(queue, sizes_mb: Tuple[int, ...]) -> None:
    """In a fresh process (the measurement changes its allocator): a step that makes tensors of ``sizes_mb`` and
    a small one that outlives it, run twice before it is measured."""
    survivors = []

    def step():
        blocks = [torch.ones(m * 2 ** 18) for m in sizes_mb]  # float32, every page touched
        survivors.append(torch.ones(64))  # allocated after them: glibc cannot hand their heap space back
        del blocks

    step()
    step()
    queue.put(benchmark.cpu_live_step_mb(step))


@pytest.mark.parametrize('sizes_mb', [(1, 2, 3, 4, 6, 8, 12, 16), (64,)])
def test_cpu_live_step_memory_is_the_steps_peak_of_live_tensors(sizes_mb):
    """The live per-step figure is the peak of the step's tensors above what was there before it: 52 MiB for a
    step that makes 52 MiB of mid-sized tensors, although after the same step ran twice glibc's default allocator
    keeps most of that space in the process (measured without the fixed mmap threshold and the trim: 16 MiB,
    only the 16 MiB block); 64 MiB for one large tensor."""
    ctx = torch.multiprocessing.get_context('spawn')
    queue = ctx.Queue()
    proc = ctx.Process(target=_cpu_live_step_mb_in_a_child, args=(queue, sizes_mb))
    proc.start()
    live = queue.get(timeout=120)
    proc.join(timeout=60)
    assert live == pytest.approx(sum(sizes_mb), abs=4)


def test_fastconvmae_source_that_cannot_be_imported_is_reported(tmp_path):
    (tmp_path / 'models_fastconvmae.py').write_text('import module_that_does_not_exist\n')
    with pytest.raises(ImportError, match=r'cannot be imported .*ModuleNotFoundError.*module_that_does_not_exist'):
        benchmark.import_official(str(tmp_path), 'models_fastconvmae', 'Alpha-VL/FastConvMAE')
    with pytest.raises(ImportError, match=r'not a checkout of Alpha-VL/FastConvMAE \(no models_fastconvmae.py\)'):
        benchmark.import_official(str(tmp_path / 'nowhere'), 'models_fastconvmae', 'Alpha-VL/FastConvMAE')
    with pytest.raises(SystemExit):
        benchmark.parse_args(['--fastconvmae-src', str(tmp_path / 'nowhere')])
