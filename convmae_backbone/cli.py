"""What the command-line tools share: a config file with the options every one of them takes."""
import os.path as osp
from typing import Optional, Sequence

from mmengine.config import Config


def load_config(path: str, cfg_options: Optional[dict] = None, launcher: str = 'none',
                work_dir: Optional[str] = None, scopes: Optional[Sequence[str]] = None) -> Config:
    """Read ``path`` and apply ``--cfg-options``, ``--launcher`` and ``--work-dir`` (default: the config's own
    ``work_dir``, else ``work_dirs/<config name>``). ``scopes``: the ``default_scope`` values the tool accepts."""
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.launcher = launcher
    if scopes is not None and cfg.get('default_scope') not in scopes:
        raise ValueError(f'{path}: default_scope must be one of {tuple(scopes)}, got {cfg.get("default_scope")!r}')
    if work_dir:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('work_dirs', osp.splitext(osp.basename(path))[0])
    return cfg
