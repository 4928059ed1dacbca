"""tools/benchmark.py: its FLOP counting and a smoke run of the pretraining comparison."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from test_pretrain_runner import load_tool

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('groups', [1, 8])
def test_flop_counter_counts_grouped_conv_backward_by_its_groups(groups):
    """Forward, grad_input and grad_weight of a conv each cost the forward's multiply-adds (2 FLOPs each)."""
    bench = load_tool('benchmark')
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    w = torch.randn(8, 8 // groups, 5, 5, requires_grad=True)
    macs = 2 * 8 * 6 * 6 * (8 // groups) * 25  # N * C_out * H * W * C_in/groups * k*k
    counter = bench._flop_counter()
    with counter:
        F.conv2d(x, w, padding=2, groups=groups).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * macs
    counter = bench._flop_counter()
    with counter:  # no grad_input wanted: only grad_weight is computed and counted
        F.conv2d(x.detach(), w, padding=2, groups=groups).sum().backward()
    assert counter.get_total_flops() == 2 * 2 * macs


def test_quick_pretrain_comparison(tmp_path):
    out = tmp_path / 'bench.json'
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / 'benchmark.py'), '--quick', '--only', 'pretrain',
                           '--iters', '1', '--device', 'cpu', '--json', str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert 'sparse / dense' in proc.stdout and 'Backbone forward' not in proc.stdout
    entry = json.loads(out.read_text())['results'][0]
    sparse, dense = entry['pretrain']['sparse'], entry['pretrain']['dense']
    assert sparse['optimizer'] == dense['optimizer'] == 'AdamW(fused=True)'  # the paper config's optimizer
    assert sparse['params'] == dense['params']
    assert 0.3 < entry['pretrain_ratio']['flops'] < 0.8  # stage 1-2 work skipped, the rest unchanged
    for r in (sparse, dense):
        assert 0 < r['held_mb'] < r['floor_mb'] <= r['peak_mb'] and r['best_s'] > 0
    assert entry['gemm']['gflops_per_s'] > 0
