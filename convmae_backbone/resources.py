"""Where the package's configs, tools and model index are: ``convmae_backbone/.mim/`` of an installed wheel
(what ``mim`` reads; ``setup.py`` copies them there at build time), else the checkout the package is imported
from (an editable install or ``PYTHONPATH``).

Everything that reads a config of this project finds it through :func:`config_path`.
"""
from pathlib import Path
from typing import Dict, List

import yaml

PACKAGE_DIR = Path(__file__).resolve().parent
#: The installed wheel's copy of ``configs/``, ``tools/`` and ``model-index.yml``.
MIM_DIR = PACKAGE_DIR / '.mim'
#: The repository around the package when it is imported from a checkout.
CHECKOUT_DIR = PACKAGE_DIR.parent
MODEL_INDEX = 'model-index.yml'


def resource_root() -> Path:
    """The folder holding ``configs/``, ``tools/`` and ``model-index.yml``: the package's ``.mim`` when it has
    them, else the checkout. Raises ``FileNotFoundError`` naming both places when neither has them."""
    for root in (MIM_DIR, CHECKOUT_DIR):
        if (root / MODEL_INDEX).is_file() and (root / 'configs').is_dir():
            return root
    raise FileNotFoundError(f'neither {MIM_DIR} (an installed wheel) nor {CHECKOUT_DIR} (a checkout) holds '
                            f'configs/ and {MODEL_INDEX}; reinstall convmae-backbone from a wheel or a checkout')


def metafiles(root: Path = None) -> List[Path]:
    """The metafiles the model index imports (one per config family), as paths."""
    root = resource_root() if root is None else root
    with open(root / MODEL_INDEX) as f:
        return [root / rel for rel in yaml.safe_load(f)['Import']]


def metafile_models(metafile: Path) -> List[dict]:
    """The ``Models`` entries of a metafile (``Name``, ``Config``, ``Results``, ``Weights``...)."""
    with open(metafile) as f:
        return yaml.safe_load(f)['Models']


def model_configs(root: Path = None) -> Dict[str, str]:
    """Model name -> config path relative to the resource root (``configs/...``), for every model of the index."""
    return {model['Name']: model['Config'] for metafile in metafiles(root) for model in metafile_models(metafile)}


def config_path(name: str) -> str:
    """The config file ``name``: a path inside ``configs/`` (``'mmdet/mask-rcnn_convmae-b_fpn_lsj-25e_coco.py'``)
    or a model name of the model index (``'mask-rcnn_convmae-b_fpn_lsj-25e_coco'``), looked up in the package's
    ``.mim`` first and then in the checkout. Raises ``FileNotFoundError`` listing the model names."""
    root = resource_root()
    configs = model_configs(root)
    path = root / configs[name] if name in configs else root / 'configs' / name
    if not path.is_file():
        raise FileNotFoundError(f'no config {name!r} under {root / "configs"}: give a path inside configs/ or one '
                                f'of the model names {sorted(configs)}')
    return str(path)


def tool_path(name: str) -> str:
    """The command-line tool ``tools/<name>`` (e.g. ``'pretrain.py'``) shipped with the package."""
    path = resource_root() / 'tools' / name
    if not path.is_file():
        raise FileNotFoundError(f'no tool {name!r} in {path.parent}')
    return str(path)
