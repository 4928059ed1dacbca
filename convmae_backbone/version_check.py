"""The torch this package needs, checked when ``convmae_backbone`` is imported (this module is its first import).

``setup.cfg`` declares the same minimum for pip; this check gives the reason where torch was installed otherwise
(a base Python's torch, a conda environment).
"""
import re
from typing import Tuple

import torch

#: The oldest torch with everything the package uses: ``torch.compiler.is_exporting`` (added in 2.6; the
#: attention and encoder code call it), ``torch.nn.attention.sdpa_kernel`` and fused AdamW on CPU (older).
MIN_TORCH: Tuple[int, int] = (2, 6)


def torch_release(version: str) -> Tuple[int, int]:
    """(major, minor) of a torch version string such as ``'2.14.1+cu130'`` or ``'2.6.0a0+git1234'``."""
    found = re.match(r'(\d+)\.(\d+)', version)
    if found is None:
        raise ValueError(f'not a torch version: {version!r}')
    return int(found.group(1)), int(found.group(2))


def check_torch(version: str) -> None:
    """``ImportError`` naming the torch needed when ``version`` is older than :data:`MIN_TORCH`."""
    if torch_release(version) < MIN_TORCH:
        need = '.'.join(map(str, MIN_TORCH))
        raise ImportError(f'convmae_backbone needs torch >= {need} (it uses torch.compiler.is_exporting, added in '
                          f'{need}); this Python has torch {version}. Install a newer one, e.g. pip install '
                          f'"torch>={need}", or TORCH_SPEC=... make install (tools/setup_env.sh)')


check_torch(torch.__version__)
