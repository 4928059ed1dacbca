"""Distributed data parallel through mmengine's Runner on CPU (gloo) as well as on CUDA (nccl).

mmengine 0.10's pytorch launcher calls ``torch.cuda.set_device`` (fails without CUDA), its Runner passes
``device_ids=[LOCAL_RANK]`` to DDP (refused for a CPU module), and ``SyncBN`` (torch's ``SyncBatchNorm``)
refuses CPU tensors (and DDP refuses CPU modules holding one). :func:`init_distributed`, which our tools call
before building the Runner, sets up the process group itself (the Runner then skips its own ``init_dist``) and,
without CUDA, selects :class:`DeviceAwareDistributedDataParallel` and ``SyncBN`` = :class:`CPUSyncBatchNorm`.
Nothing installed is modified.
"""
import logging
import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODELS
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..registry import register


@register('MODEL_WRAPPERS')
class DeviceAwareDistributedDataParallel(MMDistributedDataParallel):
    """mmengine's DDP wrapper that drops ``device_ids`` for a module on the CPU (DDP accepts them only for
    single-device accelerator modules); unchanged otherwise."""

    def __init__(self, module: nn.Module, device_ids: Optional[list] = None, **kwargs):
        param = next(module.parameters(), None)
        if param is not None and param.device.type == 'cpu':
            device_ids = None
        super().__init__(module=module, device_ids=device_ids, **kwargs)


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient is summed over processes too (every process's loss depends on it)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:  # noqa: D102
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class CPUSyncBatchNorm(_BatchNorm):
    """Batch normalisation whose training statistics are those of the global batch across processes, for CPU
    tensors (through the process group, e.g. gloo), as on one process with the whole batch. Input (N, C, ...).

    Not a subclass of ``torch.nn.SyncBatchNorm``: DDP refuses modules that contain one on the CPU, and
    ``SyncBatchNorm`` refuses CPU tensors. Single process, eval mode or no process group: plain batch norm.
    Under bf16/fp16 autocast the statistics, running buffers and normalisation are fp32; the output has the
    input's dtype.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f'expected at least 2D input (got {x.dim()}D input)')

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if (not self.training or not dist.is_available() or not dist.is_initialized()
                or dist.get_world_size(self.process_group) == 1):
            return super().forward(x)
        group = self.process_group or dist.group.WORLD
        dims = [0, *range(2, x.dim())]
        # Statistics and normalisation in (at least) fp32, also for bf16/fp16 inputs under autocast (as torch's
        # batch norm keeps fp32 statistics); the output has the input's dtype.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        count = _AllReduceSum.apply(xf.new_tensor([x.numel() / x.shape[1]]), group)
        mean = _AllReduceSum.apply(xf.sum(dims), group) / count  # two passes: the precision of a local BN
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = xf - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims), group) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                unbiased = var.detach() * count / (count - 1).clamp(min=1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape).to(out.dtype) + self.bias.view(shape).to(out.dtype)
        return out.to(x.dtype)


def dist_backend(requested: Optional[str] = None) -> str:
    """The process-group backend: nccl with CUDA, gloo without (whatever the config asked for)."""
    if not torch.cuda.is_available():
        return 'gloo'
    return requested or 'nccl'


def init_distributed(cfg: Config) -> None:
    """Initialise the process group for ``cfg.launcher == 'pytorch'`` (torchrun), on CPU or CUDA, before the
    Runner is built; a no-op for other launchers (slurm, mpi: mmengine's, CUDA only), for an ``init_backend``
    other than torch, or when a group exists.

    CUDA: ``torch.cuda.set_device(LOCAL_RANK)`` and the config's backend (nccl by default). No CUDA: gloo, the
    DDP wrapper :class:`DeviceAwareDistributedDataParallel` (a config's ``model_wrapper_cfg`` of type
    ``MMDistributedDataParallel`` is switched to it, its other keys kept) and ``SyncBN`` =
    :class:`CPUSyncBatchNorm`. ``env_cfg.dist_cfg`` keys other than ``backend`` go to
    ``init_process_group`` (e.g. ``timeout`` in seconds).
    """
    if cfg.get('launcher', 'none') != 'pytorch' or (dist.is_available() and dist.is_initialized()):
        return
    missing = [k for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT') if k not in os.environ]
    if missing:
        raise RuntimeError(f'--launcher pytorch needs the environment torchrun sets; missing {missing} (start the '
                           f'tool with tools/dist_train.sh, tools/dist_pretrain.sh or torchrun)')
    dist_cfg = dict(cfg.get('env_cfg', {}).get('dist_cfg', {}))
    if dist_cfg.pop('init_backend', 'torch') != 'torch':  # deepspeed / colossalai: mmengine's init_dist does it
        return
    backend = dist_backend(dist_cfg.pop('backend', None))
    if 'timeout' in dist_cfg:
        dist_cfg['timeout'] = timedelta(seconds=dist_cfg['timeout'])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ['LOCAL_RANK']))
    dist.init_process_group(backend=backend, **dist_cfg)
    if torch.cuda.is_available():
        return
    wrapper = cfg.get('model_wrapper_cfg')
    if wrapper is None:
        cfg.model_wrapper_cfg = dict(type='DeviceAwareDistributedDataParallel', broadcast_buffers=False,
                                     find_unused_parameters=cfg.get('find_unused_parameters', False))
    elif wrapper.get('type', 'MMDistributedDataParallel') == 'MMDistributedDataParallel':
        wrapper.type = 'DeviceAwareDistributedDataParallel'
    use_cpu_sync_bn()
    print_log(f'distributed on CPU: {backend}, rank {dist.get_rank()} of {dist.get_world_size()}, '
              f'{cfg.model_wrapper_cfg.type}, SyncBN = {CPUSyncBatchNorm.__name__}', logger='current',
              level=logging.INFO)


def finish_distributed() -> None:
    """Tear the process group down after a run (all ranks meet first): a gloo group left to the interpreter's
    exit can abort a rank ('terminate called without an active exception') after all work is done."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def use_cpu_sync_bn() -> None:
    """Make the ``SyncBN`` norm type (mmcv's registry name for ``torch.nn.SyncBatchNorm``) build
    :class:`CPUSyncBatchNorm` in this process (for distributed runs without CUDA)."""
    try:
        import mmcv.cnn  # noqa: F401  registers 'SyncBN' first; ours must come after it
    except ImportError:
        pass
    MODELS.register_module('SyncBN', module=CPUSyncBatchNorm, force=True)

