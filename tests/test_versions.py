"""The versions the package declares are the ones it needs: the torch minimum is checked at import with a clear
error and equals setup.cfg's; the sources parse as Python 3.10 (python_requires)."""
import ast
import configparser
import subprocess
import sys

import pytest
from helpers import ROOT

from convmae_backbone.version_check import MIN_TORCH, check_torch, torch_release


def test_torch_release_reads_every_version_form():
    assert torch_release('2.14.1+cu130') == (2, 14) and torch_release('2.6.0a0+git1234') == (2, 6)
    assert torch_release('3.0.0') == (3, 0)
    with pytest.raises(ValueError, match='not a torch version'):
        torch_release('nightly')


def test_an_older_torch_is_refused_naming_the_version_needed():
    with pytest.raises(ImportError, match=r'convmae_backbone needs torch >= 2\.6 \(it uses '
                                          r'torch\.compiler\.is_exporting, added in 2\.6\); this Python has torch '
                                          r'2\.5\.1\+cu124'):
        check_torch('2.5.1+cu124')
    for ok in ('2.6.0', '2.14.1+cu130', '2.10.0a0+git1234'):
        check_torch(ok)


def test_import_with_an_older_torch_fails_with_that_message():
    code = "import torch; torch.__version__ = '2.4.1'; import convmae_backbone"
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(
        'ImportError: convmae_backbone needs torch >= 2.6 (it uses torch.compiler.is_exporting, added in 2.6); '
        'this Python has torch 2.4.1')


def test_setup_cfg_declares_what_is_checked():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / 'setup.cfg')
    requires = [line.strip() for line in cfg['options']['install_requires'].splitlines() if line.strip()]
    assert f'torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}' in requires
    assert cfg['options']['python_requires'] == '>=3.10'  # torch 2.14 (tested) needs 3.10


def test_sources_parse_as_python_3_10():
    """python_requires >= 3.10: no syntax of a later Python in the package, the tools or the tests."""
    files = [*ROOT.glob('convmae_backbone/**/*.py'), *ROOT.glob('tools/*.py'), *ROOT.glob('tests/*.py'),
             *ROOT.glob('configs/**/*.py')]
    assert len(files) > 50
    for path in files:
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 10))
