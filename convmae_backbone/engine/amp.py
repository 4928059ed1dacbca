"""Mixed precision for every device: bf16 autocast where the device has it, fp16 with dynamic loss scaling
otherwise.

* :class:`BF16OptimWrapper` runs the forward pass under ``torch.autocast(<model's device>, torch.bfloat16)`` on
  CPU and CUDA alike. bf16 has the exponent range of fp32, so no loss scaling is needed (and none is done);
  mmengine 0.10's ``AmpOptimWrapper`` refuses to be built without an accelerator.
* :func:`amp_optim_wrapper` turns a config's ``optim_wrapper`` into the mixed-precision one for the device the
  run will use; :func:`apply_amp` does it on a whole config (what ``--amp`` of our tools calls).

What stays fp32 under autocast: the pretraining loss and the normalised-pixel target statistics
(``ConvMAEPretrainer.forward_loss`` computes them outside autocast), the parameters, gradients and optimizer
state (autocast casts copies), and the softmax inside ``F.scaled_dot_product_attention``, whose CPU and CUDA
kernels accumulate in fp32 for bf16 inputs (tests/test_amp.py checks that its error is that of rounding the
output to bf16).
"""
from contextlib import contextmanager
from typing import Optional

import torch
from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log
from mmengine.optim import OptimWrapper
from torch import nn

from ..registry import register

#: optim-wrapper types that already are mixed precision
AMP_WRAPPERS = ('AmpOptimWrapper', 'BF16OptimWrapper')


@register('OPTIM_WRAPPERS')
class BF16OptimWrapper(OptimWrapper):
    """``OptimWrapper`` whose forward runs under bf16 autocast on the device of the model's parameters (CPU or
    CUDA). Same arguments as ``OptimWrapper``; no loss scaling."""

    @contextmanager
    def optim_context(self, model: nn.Module):
        param = next(model.parameters(), None)
        device_type = param.device.type if param is not None else 'cpu'
        with super().optim_context(model), torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            yield


def default_device() -> str:
    """The device mmengine's Runner puts the model on: 'cuda' when available, else 'cpu'."""
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def supports_bf16(device: str) -> bool:
    """bf16 autocast is fast and exact in range on this device: every CPU torch runs on (through oneDNN; slow
    only on CPUs without native bf16 instructions), CUDA devices that report bf16 support (Ampere and later)."""
    if device == 'cpu':
        return True
    if device == 'cuda':
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return False


#: scopes whose models cannot run in bf16, and why
NO_BF16_SCOPES = {'mmdet': "mmcv's detection ops (nms, RoIAlign) have float and half kernels only, no bfloat16"}


def amp_optim_wrapper(optim_wrapper: dict, device: Optional[str] = None, bf16: bool = True) -> ConfigDict:
    """The mixed-precision version of the ``optim_wrapper`` config for ``device`` (default: the Runner's, see
    :func:`default_device`).

    bf16 where the device supports it and ``bf16`` allows it (:class:`BF16OptimWrapper`), else mmengine's
    ``AmpOptimWrapper`` in fp16 with dynamic loss scaling (CUDA only). Other keys (optimizer, paramwise_cfg,
    constructor, clip_grad, ...) are kept. A config's own ``AmpOptimWrapper`` is replaced the same way (so that
    ``--amp`` also runs on CPU), except one that asks for ``dtype='float16'`` explicitly on CUDA, which is kept.
    """
    device = device or default_device()
    cfg = ConfigDict(optim_wrapper)
    kind = cfg.get('type', 'OptimWrapper')
    if kind not in ('OptimWrapper', *AMP_WRAPPERS):
        raise ValueError(f'--amp replaces an OptimWrapper or AmpOptimWrapper, but the config uses {kind!r}; set '
                         f'a mixed-precision optim_wrapper in the config instead')
    if kind == 'AmpOptimWrapper' and device == 'cuda' and str(cfg.get('dtype')) in ('float16', 'torch.float16'):
        return cfg
    if bf16 and supports_bf16(device):
        cfg.type = 'BF16OptimWrapper'
        for key in ('loss_scale', 'dtype', 'use_fsdp'):
            cfg.pop(key, None)
    elif device == 'cuda':
        cfg.update(type='AmpOptimWrapper', dtype='float16', loss_scale=cfg.get('loss_scale', 'dynamic'))
    else:
        raise RuntimeError(f'no mixed precision available on device {device!r}' + ('' if bf16 else ' without bf16'))
    return cfg


def apply_amp(cfg: Config, device: Optional[str] = None) -> Config:
    """``cfg`` with ``cfg.optim_wrapper`` made mixed precision by :func:`amp_optim_wrapper` (fp16 for the scopes
    in :data:`NO_BF16_SCOPES`, which therefore need CUDA); logs the choice."""
    scope = cfg.get('default_scope')
    try:
        cfg.optim_wrapper = amp_optim_wrapper(cfg.optim_wrapper, device, bf16=scope not in NO_BF16_SCOPES)
    except RuntimeError as exc:
        raise RuntimeError(f'--amp: {exc} ({scope}: {NO_BF16_SCOPES[scope]})') if scope in NO_BF16_SCOPES else exc
    print_log(f'--amp: {cfg.optim_wrapper.type}'
              + (f' ({cfg.optim_wrapper.dtype}, loss scale {cfg.optim_wrapper.loss_scale})'
                 if cfg.optim_wrapper.type == 'AmpOptimWrapper' else ' (bfloat16 autocast)'), logger='current')
    return cfg
