"""The wheel carries ``configs/``, ``tools/`` and the model index under ``convmae_backbone/.mim/``. Installed
outside the checkout (``pip install --target``), its own tools pretrain a tiny model from a config inheriting
its own base config, a downstream config builds, and ``mim search`` lists the models. The model index agrees
with the README's model zoo, and ``config_path`` prefers the package's ``.mim`` over the checkout."""
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from convmae_backbone import resources
from convmae_backbone.resources import config_path, metafile_models, metafiles, model_configs
from helpers import make_images, write_tiny_config

REPO = Path(__file__).resolve().parents[1]
#: What a build must not read from a checkout (caches, environments, outputs, data, the tests).
NOT_BUILT = ('.git', '.venv', 'build', 'dist', '*.egg-info', '__pycache__', '.mim', 'tests', 'work_dirs',
             'demo_output', 'checkpoints', 'data', '.pytest_cache')


def run(cmd, cwd: Path, env: dict = None, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f'{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the checkout (the build writes nothing into the checkout)."""
    tmp = tmp_path_factory.mktemp('wheel')
    src = tmp / 'src'
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*NOT_BUILT))
    run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', tmp / 'dist', src],
        cwd=tmp)
    return next((tmp / 'dist').glob('convmae_backbone-*.whl'))


@pytest.fixture(scope='module')
def site(wheel, tmp_path_factory) -> Path:
    """The wheel installed into a folder outside the checkout (its dependencies are those of this Python)."""
    target = tmp_path_factory.mktemp('site')
    run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', target, wheel], cwd=target)
    return target


def outside_env(site: Path) -> dict:
    """This environment with the installed wheel first on ``PYTHONPATH``, and the checkout removed from it."""
    kept = [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p and Path(p).resolve() != REPO]
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), *kept]), PYTHONWARNINGS='ignore')


def test_wheel_carries_configs_tools_and_model_index(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    mim = 'convmae_backbone/.mim/'
    expected = {mim + 'model-index.yml', *(mim + rel for rel in model_configs(REPO).values()),
                *(mim + str(p.relative_to(REPO)) for p in metafiles(REPO)),
                *(mim + 'tools/' + p.name for p in (REPO / 'tools').iterdir() if p.suffix in ('.py', '.sh'))}
    assert expected <= names
    assert {mim + 'tools/pretrain.py', mim + 'configs/pretrain/convmae-b_8xb128-1600e_in1k.py'} <= expected
    assert not [n for n in names if n.startswith('tests/') or '__pycache__' in n]


def test_installed_wheel_pretrains_and_builds_a_downstream_model(site, tmp_path):
    """From a folder outside the checkout: the package, its configs and tools are the installed ones; its
    pretraining tool runs a tiny config for one epoch; the detection config builds its model."""
    env, mim = outside_env(site), site / 'convmae_backbone' / '.mim'
    where = run([sys.executable, '-c', 'import convmae_backbone as c; print(c.__file__); '
                 "print(c.config_path('convmae-b_8xb128-1600e_in1k'))"], cwd=tmp_path, env=env).stdout.split()[-2:]
    assert where == [str(site / 'convmae_backbone' / '__init__.py'),
                     str(mim / 'configs' / 'pretrain' / 'convmae-b_8xb128-1600e_in1k.py')]

    one_epoch = "param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=True, begin=0, end=1)]\n"
    config = write_tiny_config(tmp_path / 'tiny.py', make_images(tmp_path / 'images'), max_epochs=1,
                               extra=one_epoch, base=mim / 'configs' / 'pretrain' / 'convmae-b_8xb128-1600e_in1k.py')
    run([sys.executable, mim / 'tools' / 'pretrain.py', config, '--work-dir', tmp_path / 'work'], cwd=tmp_path,
        env=env)
    assert (tmp_path / 'work' / 'epoch_1.pth').is_file()

    build = ("import convmae_backbone as c\nfrom mmengine.config import Config\nfrom mmengine.registry import "
             "DefaultScope\nfrom mmdet.registry import MODELS\n"
             "cfg = Config.fromfile(c.config_path('mask-rcnn_convmae-b_fpn_lsj-25e_coco'))\n"
             "cfg.model.backbone.init_cfg = None\n"
             "with DefaultScope.overwrite_default_scope('mmdet'):\n    model = MODELS.build(cfg.model)\n"
             "print(cfg.filename, type(model).__name__, type(model.backbone).__name__)\n")
    out = run([sys.executable, '-c', build], cwd=tmp_path, env=env).stdout.split()[-3:]
    assert out == [str(mim / 'configs' / 'mmdet' / 'mask-rcnn_convmae-b_fpn_lsj-25e_coco.py'), 'MaskRCNN',
                   'ConvMAE']


def test_mim_search_lists_the_models(site, tmp_path):
    out = run([sys.executable, '-m', 'mim', 'search', 'convmae_backbone'], cwd=tmp_path,
              env=outside_env(site)).stdout
    listed = re.findall(r'config id: (\S+)', out)
    assert sorted(listed) == sorted(model_configs(REPO)), out
    assert re.search(r'ade20k/miou +51\.7', out) and re.search(r'imagenet-1k/top_1_accuracy +85\.0', out), out


def test_readme_model_zoo_agrees_with_the_metafiles():
    """Every weight link and official result of the model index is the README's (same table row)."""
    readme = (REPO / 'README.md').read_text()
    zoo = readme[readme.index('## Model zoo'):]
    zoo = zoo[:zoo.index('\n## ')]
    checked = 0
    for metafile in metafiles(REPO):
        for model in metafile_models(metafile):
            if not model.get('Weights'):
                continue
            rows = [line for line in zoo.splitlines() if f'[weight]({model["Weights"]})' in line]
            assert len(rows) == 1, model['Name']
            for result in model.get('Results') or []:
                for metric, value in result['Metrics'].items():
                    assert re.search(rf'(?<![\d.]){value:.1f}(?!\d)', rows[0]), (model['Name'], metric, rows[0])
                    checked += 1
    assert checked == 6  # box AP and mask AP of both detectors, mIoU, top-1


def test_config_path_prefers_the_package_mim(tmp_path, monkeypatch):
    assert config_path('convmae-tiny_demo') == str(REPO / 'configs' / 'pretrain' / 'convmae-tiny_demo.py')
    mim = tmp_path / '.mim'
    shutil.copytree(REPO / 'configs', mim / 'configs')
    shutil.copy(REPO / 'model-index.yml', mim)
    monkeypatch.setattr(resources, 'MIM_DIR', mim)
    assert config_path('convmae-tiny_demo') == str(mim / 'configs' / 'pretrain' / 'convmae-tiny_demo.py')
    assert config_path('mmdet/mask-rcnn_convmae-b_fpn_lsj-25e_coco.py').startswith(str(mim))
    monkeypatch.setattr(resources, 'MIM_DIR', tmp_path / 'absent')
    monkeypatch.setattr(resources, 'CHECKOUT_DIR', tmp_path / 'absent')
    with pytest.raises(FileNotFoundError, match='neither'):
        config_path('convmae-tiny_demo')
