"""Without detectron2 the package and its mmdet/mmseg/mmpretrain face work, and the detectron2 face says in one
line what to install; tools/install_detectron2.sh builds the pinned commit from DETECTRON2_SRC into a cache folder
per torch build (dry run here; `make install` runs it)."""
import os
import subprocess
import sys

import torch
from helpers import ROOT

from convmae_backbone.testing import child_env

SCRIPT = ROOT / 'tools' / 'install_detectron2.sh'
#: A Python where `import detectron2` fails as where it is not installed.
NO_DETECTRON2 = "import sys; sys.modules['detectron2'] = None\n"


def test_without_detectron2_the_rest_works_and_the_face_says_what_to_install():
    code = NO_DETECTRON2 + '''
import torch
import convmae_backbone, mmdet.registry, mmseg, mmpretrain
from convmae_backbone import ConvMAE
model = ConvMAE(img_size=32, embed_dims=(8, 16, 32), depths=(1, 1, 1), num_heads=2)
print(tuple(model(torch.zeros(1, 3, 32, 32))[2].shape))
try:
    import convmae_backbone.detectron2
except ImportError as exc:
    print(exc)
'''
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=child_env(), timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == '(1, 32, 2, 2)'
    assert len(lines) == 2 and lines[1].startswith('convmae_backbone.detectron2 needs detectron2')
    assert 'bash tools/install_detectron2.sh PYTHON' in lines[1]


def test_d2_train_without_detectron2_ends_with_one_error_line(tmp_path):
    (tmp_path / 'sitecustomize.py').write_text(NO_DETECTRON2)
    env = child_env()
    env['PYTHONPATH'] = f'{tmp_path}{os.pathsep}{env["PYTHONPATH"]}'
    out = subprocess.run([sys.executable, str(ROOT / 'tools' / 'd2_train.py'), '--help'], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith('error: convmae_backbone.detectron2 needs detectron2')
    assert 'Traceback' not in out.stderr


def test_install_script_pins_the_commit_and_caches_per_torch_build(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != 'DETECTRON2_SRC'}
    env['CONVMAE_CACHE'] = str(tmp_path)
    out = subprocess.run(['bash', str(SCRIPT), '--dry-run', sys.executable], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    fields = dict(f.split('=', 1) for f in out.stdout.split())
    assert fields['src'] == ('git+https://github.com/facebookresearch/detectron2.git@'
                             '02b5c4e295e990042a714712c21dc79b731e8833')
    tag = torch.__version__.replace('+', '_')
    assert fields['wheel_dir'] == f'{tmp_path}/detectron2-02b5c4e-torch{tag}-{fields["ops"]}'
    env['DETECTRON2_SRC'] = '/somewhere/detectron2-02b5c4e.tar.gz'
    out = subprocess.run(['bash', str(SCRIPT), '--dry-run', sys.executable], capture_output=True, text=True,
                         env=env, timeout=120)
    assert 'src=/somewhere/detectron2-02b5c4e.tar.gz ' in out.stdout


def test_ci_builds_detectron2_from_the_archive_beside_the_clone(tmp_path):
    """.ci/run points DETECTRON2_SRC at ../shared/vendor/ when the archive is there (make is faked)."""
    clone = tmp_path / 'clone'
    (clone / '.ci').mkdir(parents=True)
    (clone / '.ci' / 'run').write_text((ROOT / '.ci' / 'run').read_text())
    vendor = tmp_path / 'shared' / 'vendor'
    vendor.mkdir(parents=True)
    (vendor / 'detectron2-02b5c4e.tar.gz').write_bytes(b'')
    fake = tmp_path / 'bin'
    fake.mkdir()
    (fake / 'make').write_text('#!/bin/sh\necho "DETECTRON2_SRC=$DETECTRON2_SRC"\n')
    (fake / 'make').chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != 'DETECTRON2_SRC'}
    env['PATH'] = f'{fake}{os.pathsep}{env["PATH"]}'
    out = subprocess.run(['bash', str(clone / '.ci' / 'run')], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    src = out.stdout.strip().split('=', 1)[1]
    assert os.path.samefile(src, vendor / 'detectron2-02b5c4e.tar.gz')
