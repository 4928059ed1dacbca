"""Layer-wise learning-rate decay for models with a ConvMAE backbone.

``ConvMAELayerDecayOptimWrapperConstructor`` is registered in mmengine's, mmdet's and mmseg's
``OPTIM_WRAPPER_CONSTRUCTORS`` by ``import convmae_backbone``::

    optim_wrapper = dict(
        type='AmpOptimWrapper',
        constructor='ConvMAELayerDecayOptimWrapperConstructor',
        optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
        paramwise_cfg=dict(num_layers=11, layer_decay_rate=0.75, decay_position=True))

Layer ids come from the encoder (:meth:`ConvViT.get_layer_id`): 0 for the patch embeddings, the position
embedding and the convolutional stages 1-2; ``i + 1`` for stage-3 block ``blocks3.i``; ``num_layers + 1`` for
everything else (neck, heads, the segmentation backbone's ``fpn`` branch, shared relative position tables). A
parameter of layer ``l`` gets ``lr = base_lr * layer_decay_rate ** (num_layers + 1 - l)``, as the official
segmentation code's ``LayerDecayOptimizerConstructor`` with its ``num_layers + 2`` layers.

Weight decay: none for one-dimensional parameters (norms, biases, layer-scale ``gamma``) and names ending in
``.bias``. With ``decay_position=True`` (default) everything else is decayed, the position embedding and the
relative position tables included: this is what the official segmentation code does, whose no-decay names
(``pos_embed``, ``cls_token``) never match the ``backbone.``-prefixed names. ``decay_position=False`` exempts
them as well (:data:`POSITION_PARAMS`).

``rules='vitdet'`` gives the rules of the official ViTDet-style ConvMAE detector (OpenGVLab/Official-ConvMAE-Det:
detectron2's ``get_default_optimizer_params(weight_decay_norm=0, overrides={'pos_embed': no decay})`` with its
``get_vit_lr_decay_rate``): the same layer ids except the position embedding, which is in the last layer (full
lr); no weight decay for the parameters of PyTorch's own norm layers (:data:`TORCH_NORM_TYPES`, exact types: the
channels-first ``LayerNorm2d`` of the pyramid and heads stands for detectron2's ``LN``, which is not one of them)
and for ``pos_embed``; every other parameter is decayed, biases and relative position tables included.
"""
import logging
from typing import Dict, List, Optional, Tuple

from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from torch import nn

from ..registry import register

#: Position parameters that ``decay_position=False`` exempts from weight decay.
POSITION_PARAMS = ('pos_embed', 'rel_pos_h', 'rel_pos_w', 'relative_position_bias_table')
#: ``rules``: the official segmentation code's (default) or the official ViTDet-style detector's.
RULES = ('convmae', 'vitdet')
#: Norm layers whose parameters ``rules='vitdet'`` exempts from weight decay (detectron2's list).
TORCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
                    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm)


def is_no_decay(name: str, param: nn.Parameter, decay_position: bool = True) -> bool:
    """True for 1-D parameters (norms, biases, gammas) and names ending in ``.bias``; with
    ``decay_position=False`` also for the position embedding and relative position tables."""
    if param.ndim == 1 or name.endswith('.bias'):
        return True
    return not decay_position and name.split('.')[-1] in POSITION_PARAMS


@register('OPTIM_WRAPPER_CONSTRUCTORS', downstream=True)
class ConvMAELayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """Optimizer wrapper constructor with layer-wise lr decay over the ConvMAE stage-3 blocks.

    ``paramwise_cfg`` keys:
        num_layers: number of stage-3 blocks (``depths[2]``); checked against the backbone; inferred from it
            when omitted.
        layer_decay_rate: decay per layer (1.0 disables the decay).
        decay_position: weight decay on the position embedding and relative position tables (True, as the
            official code) or not (False); not with ``rules='vitdet'``.
        rules: ``'convmae'`` (default) or ``'vitdet'`` (see the module docstring).

    Works for a model with the backbone at ``model.backbone`` (detectors, segmentors) and for a bare ConvMAE.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None):
        paramwise_cfg = dict(paramwise_cfg or {})
        unknown = set(paramwise_cfg) - {'num_layers', 'layer_decay_rate', 'decay_position', 'rules'}
        if unknown:
            raise ValueError(f'{type(self).__name__}: unsupported paramwise_cfg keys {sorted(unknown)}; '
                             "expected 'num_layers', 'layer_decay_rate', 'decay_position' and 'rules'")
        paramwise_cfg.setdefault('layer_decay_rate', 1.0)
        self.rules = paramwise_cfg.pop('rules', 'convmae')
        if self.rules not in RULES:
            raise ValueError(f'paramwise_cfg.rules must be one of {RULES}, got {self.rules!r}')
        if self.rules == 'vitdet' and 'decay_position' in paramwise_cfg:
            raise ValueError("paramwise_cfg.decay_position does not apply to rules='vitdet' (only pos_embed is "
                             'exempt from weight decay there)')
        self.decay_position = bool(paramwise_cfg.pop('decay_position', True))
        # A non-empty paramwise_cfg makes the parent call add_params.
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        if self.base_lr is None or self.base_wd is None:
            raise ValueError('the optimizer config needs lr and weight_decay for layer-wise decay')
        rate = float(paramwise_cfg['layer_decay_rate'])
        if not 0.0 < rate <= 1.0:
            raise ValueError(f'layer_decay_rate must be in (0, 1], got {rate}')
        self.layer_decay_rate = rate
        self.num_layers = paramwise_cfg.get('num_layers')

    @staticmethod
    def _find_backbone(module: nn.Module) -> Tuple[nn.Module, str]:
        backbone = getattr(module, 'backbone', None)
        if isinstance(backbone, nn.Module):
            return backbone, 'backbone.'
        if hasattr(module, 'get_layer_id'):
            return module, ''
        raise TypeError(f'{type(module).__name__} has neither a ConvMAE backbone at .backbone nor is a ConvMAE')

    def _resolve_num_layers(self, backbone: nn.Module) -> int:
        depth = len(backbone.blocks3) if hasattr(backbone, 'blocks3') else None
        if depth is None:
            raise TypeError(f'backbone {type(backbone).__name__} has no ConvMAE stage 3 (blocks3)')
        if self.num_layers is None:
            return depth
        if int(self.num_layers) != depth:
            raise ValueError(f'paramwise_cfg.num_layers={self.num_layers} but the backbone has {depth} stage-3 '
                             'blocks; set num_layers to depths[2]')
        return int(self.num_layers)

    def add_params(self, params: List[dict], module: nn.Module, prefix: str = '', **kwargs) -> None:
        """Append one param group per (layer id, decay / no decay) to ``params``."""
        backbone, backbone_prefix = self._find_backbone(module)
        num_layers = self._resolve_num_layers(backbone)
        owner = {id(p): m for m in module.modules() for p in m.parameters(recurse=False)}
        groups: Dict[str, dict] = {}
        for name, param in module.named_parameters(prefix=prefix.rstrip('.')):
            if not param.requires_grad:
                continue
            rel = name[len(prefix + backbone_prefix):] if name.startswith(prefix + backbone_prefix) else None
            layer_id = num_layers + 1 if rel is None else backbone.get_layer_id(rel)
            if self.rules == 'vitdet':
                if rel == 'pos_embed':
                    layer_id = num_layers + 1
                no_decay = type(owner[id(param)]) in TORCH_NORM_TYPES or name.split('.')[-1] == 'pos_embed'
            else:
                no_decay = is_no_decay(name, param, self.decay_position)
            key = f'layer_{layer_id}_{"no_decay" if no_decay else "decay"}'
            if key not in groups:
                scale = self.layer_decay_rate ** (num_layers + 1 - layer_id)
                groups[key] = dict(params=[], param_names=[], layer_id=layer_id, lr_scale=scale,
                                   lr=self.base_lr * scale, weight_decay=0.0 if no_decay else self.base_wd)
            groups[key]['params'].append(param)
            groups[key]['param_names'].append(name)
        for key in sorted(groups, key=lambda k: (groups[k]['layer_id'], k)):
            g = groups[key]
            print_log(f'{key}: {len(g["params"])} params, lr_scale={g["lr_scale"]:.4g}, '
                      f'weight_decay={g["weight_decay"]}', logger='current', level=logging.DEBUG)
            params.append(g)


def check_zero(cfg: dict) -> None:
    """Before any work: a config whose optimizer is mmengine's ``ZeroRedundancyOptimizer`` (ZeRO-1: the AdamW
    state sharded over the DDP processes) must run distributed (``--launcher pytorch``, e.g.
    ``tools/dist_pretrain.sh``), name the sharded optimizer (``optimizer_type``) and save with
    :class:`~.hooks.AtomicCheckpointHook` (which gathers the shards on every process); ``ValueError`` naming
    what is missing otherwise."""
    optimizer = (cfg.get('optim_wrapper') or {}).get('optimizer') or {}
    if optimizer.get('type') != 'ZeroRedundancyOptimizer':
        return
    if 'optimizer_type' not in optimizer:
        raise ValueError("ZeroRedundancyOptimizer needs optim_wrapper.optimizer.optimizer_type (e.g. 'AdamW')")
    if cfg.get('launcher', 'none') == 'none':
        raise ValueError('ZeroRedundancyOptimizer shards the optimizer state over DDP processes: start the run '
                         'with tools/dist_pretrain.sh / tools/dist_train.sh (--launcher pytorch)')
    checkpoint = (cfg.get('default_hooks') or {}).get('checkpoint')
    if checkpoint and checkpoint.get('type') != 'AtomicCheckpointHook':
        raise ValueError(f"ZeroRedundancyOptimizer needs default_hooks.checkpoint of type 'AtomicCheckpointHook', "
                         f"got {checkpoint.get('type')!r} (mmengine's CheckpointHook would wait forever for the "
                         f"other processes' optimizer state)")

