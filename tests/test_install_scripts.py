"""tools/install_mmcv.sh decides between CUDA and CPU ops from torch's CUDA version, the GPU torch sees and the
nvcc it finds (fake nvcc scripts here; nothing is built)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'tools' / 'install_mmcv.sh'
NVCC_TEXT = '''nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2025 NVIDIA Corporation
Built on Wed_Jan_15_19:20:09_PST_2025
Cuda compilation tools, release {v}, V{v}.41
Build cuda_{v}.r{v}/compiler.35404655_0
'''


def fake_toolkit(root: Path, version: str) -> Path:
    """``root/bin/nvcc`` printing the ``nvcc --version`` text of CUDA ``version``; returns ``root``."""
    (root / 'bin').mkdir(parents=True)
    nvcc = root / 'bin' / 'nvcc'
    nvcc.write_text(f"#!/bin/sh\ncat <<'EOF'\n{NVCC_TEXT.format(v=version)}EOF\n")
    nvcc.chmod(0o755)
    return root


def decide(torch_cuda: str, gpu: int, path_dirs=(), **env) -> subprocess.CompletedProcess:
    """``cuda_ops_decision TORCH_CUDA GPU`` of the sourced script, with PATH = ``path_dirs`` + the system's and
    no default toolkit (this machine's /usr/local/cuda is not seen)."""
    environ = {k: v for k, v in os.environ.items() if k not in ('CUDA_HOME', 'FORCE_CUDA', 'PATH')}
    environ.update(PATH=os.pathsep.join([*map(str, path_dirs), '/usr/bin', '/bin']),
                   **{'CONVMAE_DEFAULT_CUDA': '/nonexistent/cuda', **env})
    return subprocess.run(['bash', '-c', f'source {SCRIPT} && cuda_ops_decision "$0" "$1"', torch_cuda, str(gpu)],
                          env=environ, capture_output=True, text=True, timeout=60)


def test_no_nvcc_means_cpu_ops_and_says_how_to_get_cuda_ops():
    out = decide('13.0', 1)
    assert out.returncode == 0 and out.stdout.strip() == 'cpu'
    assert ('CPU ops: no nvcc found (CUDA_HOME, PATH, /usr/local/cuda); for CUDA ops install the CUDA 13.0 toolkit '
            'and set CUDA_HOME to it, or set FORCE_CUDA=1') in out.stderr


@pytest.mark.parametrize('nvcc_version', ['13.0', '13.1'])
def test_nvcc_of_torchs_cuda_major_version_builds_cuda_ops(tmp_path, nvcc_version):
    kit = fake_toolkit(tmp_path / 'cuda', nvcc_version)
    out = decide('13.0', 1, [kit / 'bin'])
    assert out.stdout.strip() == 'cuda'
    assert f'CUDA ops: {kit}/bin/nvcc is CUDA {nvcc_version}, torch was built with CUDA 13.0' in out.stderr


def test_nvcc_of_another_major_version_means_cpu_ops_unless_forced(tmp_path):
    kit = fake_toolkit(tmp_path / 'cuda-12.4', '12.4')
    out = decide('13.0', 1, [kit / 'bin'])
    assert out.stdout.strip() == 'cpu'
    assert (f'CPU ops: {kit}/bin/nvcc is CUDA 12.4 but torch was built with CUDA 13.0 (the major versions must '
            f'match); for CUDA ops install the CUDA 13.0 toolkit and set CUDA_HOME to it, or set FORCE_CUDA=1'
            in out.stderr)
    forced = decide('13.0', 1, [kit / 'bin'], FORCE_CUDA='1')
    assert forced.stdout.strip() == 'cuda' and 'CUDA ops: FORCE_CUDA=1' in forced.stderr
    assert decide('13.0', 1, FORCE_CUDA='1').returncode == 1  # forced without any nvcc: refused, not a broken build


def test_cuda_home_then_path_then_the_default_toolkit(tmp_path):
    """The order torch's extension builder uses: the nvcc of CUDA_HOME is the one compared, then PATH's."""
    old, new = fake_toolkit(tmp_path / 'old', '12.4'), fake_toolkit(tmp_path / 'new', '13.0')
    out = decide('13.0', 1, [old / 'bin'], CUDA_HOME=str(new))
    assert out.stdout.strip() == 'cuda' and f'{new}/bin/nvcc is CUDA 13.0' in out.stderr
    default = decide('13.0', 1, [old / 'bin'], CONVMAE_DEFAULT_CUDA=str(new))
    assert default.stdout.strip() == 'cpu' and f'{old}/bin/nvcc is CUDA 12.4' in default.stderr
    default = decide('13.0', 1, CONVMAE_DEFAULT_CUDA=str(new))
    assert default.stdout.strip() == 'cuda' and f'{new}/bin/nvcc is CUDA 13.0' in default.stderr


def test_cpu_torch_and_invisible_gpu_mean_cpu_ops(tmp_path):
    kit = fake_toolkit(tmp_path / 'cuda', '13.0')
    cpu_torch = decide('None', 0, [kit / 'bin'])
    assert cpu_torch.stdout.strip() == 'cpu' and 'CPU ops: torch is a CPU build' in cpu_torch.stderr
    smi = tmp_path / 'driver' / 'nvidia-smi'  # a driver is installed, but torch sees no GPU: too old for CUDA 13
    smi.parent.mkdir()
    smi.write_text('#!/bin/sh\necho "CUDA Version: 12.2"\n')
    smi.chmod(0o755)
    old_driver = decide('13.0', 0, [kit / 'bin', smi.parent])
    assert old_driver.stdout.strip() == 'cpu'
    assert ('WARNING: torch was built with CUDA 13.0 but sees no GPU although an NVIDIA driver is installed'
            in old_driver.stderr and 'TORCH_INDEX_URL=' in old_driver.stderr)
    no_driver = decide('13.0', 0, [kit / 'bin'])
    assert no_driver.stdout.strip() == 'cpu' and 'WARNING' not in no_driver.stderr


def test_dry_run_prints_the_decision_and_the_wheel_cache_key_of_this_torch(tmp_path):
    env = dict(os.environ, CONVMAE_CACHE=str(tmp_path / 'cache'))
    out = subprocess.run(['bash', str(SCRIPT), '--dry-run', sys.executable], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ops = out.stdout.split()[0].split('=')[1]
    tag = torch.__version__.replace('+', '_') + ('-cu' + torch.version.cuda.replace('.', '') if ops == 'cuda' else
                                                 '-cpu')
    assert out.stdout.strip() == f'ops={ops} wheel_dir={tmp_path}/cache/mmcv-2.1.0-torch{tag}'
    if not torch.cuda.is_available():
        assert ops == 'cpu'
    assert not (tmp_path / 'cache').exists()  # nothing built, nothing cached
