"""Every Python and config snippet of the README runs as written.

A fenced ``python`` block preceded by the line ``<!-- readme-test -->`` is executed: a block that sets
``_base_`` is a config (written to a file, loaded with mmengine, built in the registry of the scope its base
names and run on a small image); any other block runs as a script. Both run in a temporary folder where every
``*.pth`` file the block names exists, holding random weights of the architecture the block builds.
"""
import copy
import os
import re
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

import convmae_backbone  # noqa: F401
from convmae_backbone import ConvMAE
from helpers import sync_bn_to_bn

README = Path(__file__).resolve().parents[1] / 'README.md'
BLOCK = re.compile(r'<!-- readme-test -->\n```python\n(.*?)```', re.S)


def _snippets():
    text = README.read_text()
    blocks = BLOCK.findall(text)
    return [pytest.param(b, id=f'block{i}') for i, b in enumerate(blocks)]


def test_readme_has_tested_snippets():
    """The README's usage section keeps its snippets under test (this guards the marker itself)."""
    blocks = [p.values[0] for p in _snippets()]
    assert sum('_base_' in b for b in blocks) >= 2 and sum('_base_' not in b for b in blocks) >= 1


def _write_random_checkpoints(code: str, arch: dict) -> None:
    """A random-weights ConvMAE checkpoint for every ``*.pth`` name in ``code`` (in the current folder)."""
    for name in set(re.findall(r"['\"]([\w./-]+\.pth)['\"]", code)):
        path = Path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        model = ConvMAE(**arch)
        model.init_weights()
        torch.save({'model': model.state_dict()}, path)


@pytest.mark.parametrize('code', _snippets())
def test_readme_snippet_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if '_base_' not in code:
        _write_random_checkpoints(code, {})
        exec(compile(code, str(README), 'exec'), {'__name__': 'readme_snippet'})
        return
    (tmp_path / 'snippet.py').write_text(code)
    cfg = Config.fromfile(str(tmp_path / 'snippet.py'))
    scope = cfg.get('default_scope')
    assert scope in ('mmdet', 'mmseg', 'mmpretrain'), scope
    backbone = cfg.model.backbone
    arch = {k: backbone[k] for k in ('embed_dims', 'depths', 'num_heads', 'mlp_ratios') if k in backbone}
    _write_random_checkpoints(code, arch)
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    with DefaultScope.overwrite_default_scope(scope):
        model = registry.build(sync_bn_to_bn(copy.deepcopy(cfg.model)))
    model.init_weights()
    model.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = model.extract_feat(x)  # backbone + neck: the neck's in_channels fit the backbone's maps
    assert len(feats) >= 4 and all(torch.isfinite(f).all() for f in feats)
    assert os.path.isfile(backbone.init_cfg.checkpoint)
