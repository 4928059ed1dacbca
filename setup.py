"""Build hook of the package (metadata: setup.cfg): the wheel carries ``configs/``, ``tools/`` and the model
index under ``convmae_backbone/.mim/``, where OpenMMLab's ``mim`` and :func:`convmae_backbone.config_path` look.

They are copied from the repository at build time (the mmengine-template ``add_mim_extension`` pattern), never
committed twice. Editable installs read them from the checkout instead.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
#: What goes into ``convmae_backbone/.mim/`` (folders are copied without caches).
MIM_FILES = ('configs', 'tools', 'model-index.yml')


class BuildPyWithMim(build_py):
    """``build_py`` that also copies :data:`MIM_FILES` into the built package's ``.mim`` folder."""

    def run(self) -> None:
        super().run()
        if getattr(self, 'editable_mode', False):
            return
        target = Path(self.build_lib) / 'convmae_backbone' / '.mim'
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for name in MIM_FILES:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, target / name, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
            else:
                shutil.copy2(src, target / name)


setup(cmdclass={'build_py': BuildPyWithMim})
