"""Feature mimicking in the style of MR-MAE / ConvMAE-v2 ("Mimic before Reconstruct", arXiv 2303.05475).

What the paper states: the encoder's *visible* tokens mimic the features of frozen pretrained models (CLIP, DINO)
while the decoder keeps MAE's pixel reconstruction on the masked tokens. What it does not publish (no training
code was released): the teachers' layer, the projection heads, the distance, the normalisation and the weights.
Those are ours, with the defaults of :data:`TEACHER_DEFAULTS`:

* teacher features: the output of the teacher's ``forward_features`` (timm ViTs: the last block after the final
  norm), patch tokens resampled bilinearly to the student's H/16 grid; optionally its class token;
* projection head: one ``Linear(C3, C_teacher)`` per teacher (``head_hidden`` > 0: Linear-GELU-Linear) on the
  encoder's visible stage-3 tokens after fusion and the final norm (the decoder's input); the class token is
  predicted by the head from the mean of the visible tokens;
* target normalisation ``'layer'`` (per-token LayerNorm without affine), distance ``'l2'`` (per-token mean
  squared error over channels), averaged over the visible tokens (and the class token), weight 1 per teacher.

A :class:`Teacher` is no submodule of the pretrainer: it is not in ``state_dict()`` (checkpoints hold its config,
not its weights), not in ``parameters()`` (never in the optimizer, never wrapped by DDP), never reached by the
encoder's initialisation, and always in eval mode without gradients.
"""
import math
from typing import Dict, Optional, Tuple, Union

import timm
import torch
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch import Tensor, nn

from ..checkpoint import safe_torch_load
from .weights import extract_state_dict

#: Distances between a head's prediction and the normalised teacher features, per token.
MIMIC_DISTANCES = ('l2', 'smooth_l1', 'cosine')
#: Normalisations of the teacher features: per-token LayerNorm without affine, unit L2 norm, none.
MIMIC_NORMS = ('layer', 'l2', 'none')
#: The per-teacher settings and their defaults (ours: the paper's are unpublished). ``mean``/``std``: the
#: teacher's input normalisation in 0-255 pixel units (None: timm's ``pretrained_cfg`` for a timm teacher, else
#: the pretrainer's own data preprocessor's).
TEACHER_DEFAULTS = dict(weight=1.0, distance='l2', norm='layer', cls_token=False, head_hidden=0, mean=None,
                        std=None)
#: How a teacher's module is given: ``timm`` (a timm model name, with ``pretrained`` and ``model_kwargs``), or
#: ``model`` (a registered module's config, or a module), with an optional local ``checkpoint`` (read by the safe
#: loader) for either.
TEACHER_SOURCES = ('timm', 'model', 'pretrained', 'model_kwargs', 'checkpoint')


def build_teacher_module(name: str, cfg: dict) -> nn.Module:
    """The module of teacher ``name``'s config (see :data:`TEACHER_SOURCES`), frozen and in eval mode."""
    if ('timm' in cfg) == ('model' in cfg):
        raise ValueError(f"mimic teacher {name!r} needs exactly one of 'timm' (a timm model name) and 'model' "
                         f'(a module config), got keys {sorted(cfg)}')
    if 'timm' in cfg:
        module = timm.create_model(cfg['timm'], pretrained=bool(cfg.get('pretrained', False)),
                                   **dict(cfg.get('model_kwargs') or {}))
    else:
        if cfg.get('pretrained') or cfg.get('model_kwargs'):
            raise ValueError(f"mimic teacher {name!r}: 'pretrained' and 'model_kwargs' apply to timm teachers only")
        module = cfg['model'] if isinstance(cfg['model'], nn.Module) else MODELS.build(cfg['model'])
    if cfg.get('checkpoint'):
        state = extract_state_dict(safe_torch_load(cfg['checkpoint']), source=cfg['checkpoint'])
        module.load_state_dict(state, strict=True)
    if not isinstance(getattr(module, 'num_features', None), int):
        raise ValueError(f'mimic teacher {name!r} ({type(module).__name__}) has no integer num_features (its feature '
                         f'width, as timm models have)')
    return module.requires_grad_(False).eval()


class Teacher:
    """A frozen teacher of the mimic objective and its settings (:data:`TEACHER_DEFAULTS`)."""

    def __init__(self, name: str, cfg: dict):
        unknown = sorted(set(cfg) - set(TEACHER_DEFAULTS) - set(TEACHER_SOURCES))
        if unknown:
            raise ValueError(f'mimic teacher {name!r}: unknown keys {unknown}; known: '
                             f'{sorted(TEACHER_DEFAULTS) + sorted(TEACHER_SOURCES)}')
        settings = {**TEACHER_DEFAULTS, **{k: v for k, v in cfg.items() if k in TEACHER_DEFAULTS}}
        if settings['distance'] not in MIMIC_DISTANCES:
            raise ValueError(f'mimic teacher {name!r}: distance must be one of {MIMIC_DISTANCES}, got '
                             f'{settings["distance"]!r}')
        if settings['norm'] not in MIMIC_NORMS:
            raise ValueError(f'mimic teacher {name!r}: norm must be one of {MIMIC_NORMS}, got {settings["norm"]!r}')
        if not (isinstance(settings['weight'], (int, float)) and math.isfinite(settings['weight'])
                and settings['weight'] >= 0):
            raise ValueError(f'mimic teacher {name!r}: weight must be a finite number >= 0, got {settings["weight"]!r}')
        self.name = name
        self.weight, self.distance, self.norm = float(settings['weight']), settings['distance'], settings['norm']
        self.cls_token, self.head_hidden = bool(settings['cls_token']), int(settings['head_hidden'])
        self.module = build_teacher_module(name, cfg)
        mean, std = settings['mean'], settings['std']
        if mean is None and std is None and 'timm' in cfg:
            pretrained_cfg = getattr(self.module, 'pretrained_cfg', None) or {}
            mean = [255 * m for m in pretrained_cfg.get('mean', ())] or None
            std = [255 * s for s in pretrained_cfg.get('std', ())] or None
        if (mean is None) != (std is None):
            raise ValueError(f'mimic teacher {name!r}: give both mean and std, or neither')
        #: the teacher's input normalisation (0-255 pixels), None: the pretrainer's inputs as they are
        self.mean, self.std = mean, std
        self.num_features = int(self.module.num_features)
        if self.cls_token and getattr(self.module, 'cls_token', None) is None:
            raise ValueError(f'mimic teacher {name!r}: cls_token=True, but {type(self.module).__name__} has no '
                             f'class token (cls_token attribute)')

    def head(self, in_dim: int) -> nn.Module:
        """A new projection head: student tokens (..., in_dim) -> (..., num_features)."""
        if not self.head_hidden:
            return nn.Linear(in_dim, self.num_features)
        return nn.Sequential(nn.Linear(in_dim, self.head_hidden), nn.GELU(),
                             nn.Linear(self.head_hidden, self.num_features))

    def inputs(self, imgs: Tensor, pre_mean: Optional[Tensor], pre_std: Optional[Tensor]) -> Tensor:
        """The pretrainer's normalised inputs (B, 3, H, W) (``imgs * pre_std + pre_mean`` are pixels) -> the
        teacher's inputs under its own normalisation."""
        if self.mean is None:
            return imgs
        pixels = imgs if pre_mean is None else imgs * pre_std.to(imgs) + pre_mean.to(imgs)
        mean = torch.tensor(self.mean, dtype=imgs.dtype, device=imgs.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=imgs.dtype, device=imgs.device).view(1, -1, 1, 1)
        return (pixels - mean) / std

    @torch.no_grad()
    def targets(self, imgs: Tensor, grid: Tuple[int, int]) -> Tuple[Tensor, Optional[Tensor]]:
        """Teacher inputs (B, 3, H, W) -> patch features on the student's token grid (B, h*w, C_t), and the class
        token (B, C_t) with ``cls_token`` (else None), normalised (``norm``), in float32 or wider."""
        self.module.eval()
        run = getattr(self.module, 'forward_features', self.module)
        out = run(imgs)
        cls = None
        if out.dim() == 3:  # tokens (B, prefix + ht*wt, C)
            prefix = int(getattr(self.module, 'num_prefix_tokens', 0))
            tokens = out[:, prefix:]
            ht = round(math.sqrt(tokens.shape[1] * imgs.shape[2] / imgs.shape[3]))
            wt = tokens.shape[1] // max(ht, 1)
            if ht * wt != tokens.shape[1]:
                raise ValueError(f'mimic teacher {self.name!r}: {tokens.shape[1]} patch tokens form no grid of the '
                                 f'{imgs.shape[2]}x{imgs.shape[3]} input\'s aspect')
            fmap = tokens.transpose(1, 2).reshape(out.shape[0], -1, ht, wt)
            cls = out[:, 0] if self.cls_token else None
        elif out.dim() == 4:  # a feature map (B, C, ht, wt)
            fmap = out
        else:
            raise ValueError(f'mimic teacher {self.name!r}: features of shape {tuple(out.shape)}; expected tokens '
                             f'(B, N, C) or a map (B, C, h, w)')
        dtype = torch.promote_types(fmap.dtype, torch.float32)
        fmap = fmap.to(dtype)
        if tuple(fmap.shape[2:]) != tuple(grid):
            fmap = F.interpolate(fmap, size=grid, mode='bilinear', align_corners=False)
        patches = normalise(fmap.flatten(2).transpose(1, 2), self.norm)
        return patches, None if cls is None else normalise(cls.to(dtype), self.norm)


def normalise(x: Tensor, norm: str) -> Tensor:
    """Features (..., C) under one of :data:`MIMIC_NORMS`."""
    if norm == 'layer':
        return F.layer_norm(x, x.shape[-1:], eps=1e-6)
    if norm == 'l2':
        return F.normalize(x, dim=-1)
    return x


def distance(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """Per-token distance (...,) between predictions and targets (..., C), one of :data:`MIMIC_DISTANCES`:
    mean squared error, mean smooth-L1 (beta 1) over channels, or 1 - cosine similarity."""
    if kind == 'l2':
        return ((pred - target) ** 2).mean(dim=-1)
    if kind == 'smooth_l1':
        return F.smooth_l1_loss(pred, target, reduction='none', beta=1.0).mean(dim=-1)
    return 1 - F.cosine_similarity(pred, target, dim=-1)


def build_teachers(mimic: Union[None, dict]) -> Dict[str, Teacher]:
    """The :class:`Teacher` of every entry of ``mimic=dict(teachers=dict(NAME=dict(...)))`` (empty for None)."""
    if mimic is None:
        return {}
    if not isinstance(mimic, dict) or set(mimic) != {'teachers'} or not isinstance(mimic['teachers'], dict) \
            or not mimic['teachers']:
        raise ValueError(f'mimic must be dict(teachers=dict(NAME=dict(...), ...)) with at least one teacher, got '
                         f'{mimic!r}')
    bad = [n for n in mimic['teachers'] if not (isinstance(n, str) and n.isidentifier())]
    if bad:
        raise ValueError(f'mimic teacher names must be identifiers (they name loss terms and heads), got {bad}')
    return {name: Teacher(name, dict(cfg)) for name, cfg in mimic['teachers'].items()}
