"""The ConvMAE encoder in timm: ``timm.create_model('convmae_base', ...)`` after ``import convmae_backbone``.

The model follows timm's contract (as timm's generic model tests check it, ``tests/test_timm_contract.py``):

* ``forward_features``: (B, 3, H, W) -> the final, unpooled stage-3 map (B, C3, ceil(H/16), ceil(W/16));
  ``forward_head(x, pre_logits=False)``: stage-3 tokens averaged, ``fc_norm`` (LayerNorm, eps 1e-6), dropout,
  ``head``, as the official fine-tuned classifier (whose checkpoint loads with its head); ``global_pool=''``
  keeps the positions (the norm and head then act on each); ``reset_classifier`` / ``get_classifier``.
* ``forward_intermediates`` / ``prune_intermediate_layers`` as timm's hierarchical models (ConvNeXt) define them,
  over the three stages: NCHW (or NHWC) maps at H/4, H/8, H/16 of size ceil(H/s) x ceil(W/s) for any H, W >= 32,
  equal to the ``ConvMAE`` backbone's. ``features_only=True`` gives timm's ``FeatureGetterNet`` over them
  (``out_indices`` among 0, 1, 2; pruning drops the stages after the last one asked for).
* ``torch.fx``: torchvision's ``create_feature_extractor`` and timm's FX path trace it (train and eval); the maps
  are the outputs of the parameterless ``stage_maps.0`` .. ``stage_maps.2`` (``feature_info`` names them, so
  ``feature_cls='fx'`` gives the same maps). TorchScript is not supported.
* ``timm.create_model('convmae_base', pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`` loads any
  checkpoint the ``ConvMAE`` backbone reads (the official pretraining and fine-tuned checkpoints, ours, exported
  backbones, detectors and segmentors) through the same adaptation (:func:`.weights.load_pretrained`: position
  embedding and relative-position tables resized, pretraining-only modules skipped).

Pretrained tags: ``convmae_base.ft_in1k`` (the default: the fine-tuned classifier, 1000 classes) and
``convmae_base.mae_in1k`` (the 1600-epoch pretrained encoder, no head). The official files are downloads of
their own (README, "Model zoo"); timm gets them through ``pretrained_cfg_overlay=dict(file=PATH)`` only.
"""
import math
from typing import List, Optional, Sequence, Tuple, Union

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from .arch import ARCH_SETTINGS
from .backbone import MIN_POSITIONS, ConvMAE, crop_maps
from .weights import load_pretrained

#: ``global_pool`` values of :class:`TimmConvMAE`: the average over positions, or none (per-position head).
GLOBAL_POOLS = ('avg', '')


class StageMap(nn.Module):
    """A stage's channels-last map on the padded image -> the NCHW map of the image: (B, Hp/s, Wp/s, C) ->
    (B, C, ceil(H/s), ceil(W/s)) (a view). No parameters: a named ``torch.fx`` node for feature extraction."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor, hw: Tuple[int, int]) -> Tensor:
        return crop_maps((x.permute(0, 3, 1, 2),), (self.stride,), hw)[0]

    def extra_repr(self) -> str:
        return f'stride={self.stride}'


class TimmConvMAE(ConvMAE):
    """ConvMAE with timm's model interface (see the module's documentation).

    Args:
        num_classes: classes of the head; 0 for none (``forward`` then returns the pooled, normalised features).
        in_chans: image channels (timm's name for ``in_channels``).
        global_pool: ``'avg'`` or ``''`` (:data:`GLOBAL_POOLS`).
        drop_rate: dropout before the head.
        **kwargs: :class:`ConvMAE` / ``ConvViT`` keywords (architecture, drop path, windows...).
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, global_pool: str = 'avg',
                 drop_rate: float = 0.0, **kwargs):
        super().__init__(in_channels=in_chans, out_type='avg_featmap', **kwargs)
        self.num_classes = num_classes
        self.global_pool = self._checked_pool(global_pool)
        self.num_features = self.head_hidden_size = self.embed_dims[2]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.stage_maps = nn.ModuleList(StageMap(s) for s in self.strides)
        #: stages that :meth:`prune_intermediate_layers` kept
        self.num_stages = len(self.stage_maps)
        self.feature_info = [dict(num_chs=c, reduction=s, module=f'stage_maps.{i}')
                             for i, (c, s) in enumerate(zip(self.embed_dims, self.strides))]
        self.init_weights()  # timm models are initialised when built (``init_cfg`` may name a checkpoint)

    @staticmethod
    def _checked_pool(global_pool: str) -> str:
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f'global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}')
        return global_pool

    def load_pretrained(self, path: str) -> List[str]:
        """Load a checkpoint file of any format the ConvMAE backbone reads (timm calls this for
        ``pretrained_cfg_overlay=dict(file=path)``); returns the missing keys."""
        return load_pretrained(self, path)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every block while training (``with_cp``)."""
        self.with_cp = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new (randomly initialised) head for ``num_classes`` classes (none for 0); ``global_pool`` as in
        :data:`GLOBAL_POOLS` (None keeps it)."""
        if global_pool is not None:
            self.global_pool = self._checked_pool(global_pool)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def _maps(self, x: Tensor, num_stages: int) -> List[Tensor]:
        """(B, C, H, W), any H, W >= ``min_side`` -> the NCHW maps of the first ``num_stages`` stages."""
        x = self._check_input(x)
        hw = (x.shape[2], x.shape[3])
        maps = self.forward_stages(self.pad_to_patch(x), num_stages)
        return [stage_map(m, hw) for stage_map, m in zip(self.stage_maps, maps)]

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> the unpooled stage-3 map (B, C3, ceil(H/16), ceil(W/16)).

        Unlike ``ConvViT.forward_features`` (all three maps of an image padded to multiples of 16), timm's:
        one tensor, any H, W >= 32."""
        return self._maps(x, self.num_stages)[-1]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Stage-3 map (B, C3, h, w) -> logits (B, num_classes), or the pooled, normalised features (B, C3) with
        ``pre_logits``; with ``global_pool=''`` per position: (B, num_classes or C3, h, w)."""
        if self.global_pool == 'avg':
            x = self.head_drop(self.fc_norm(x.mean(dim=(2, 3))))
            return x if pre_logits else self.head(x)
        x = self.head_drop(self.fc_norm(x.permute(0, 2, 3, 1)))
        return (x if pre_logits else self.head(x)).permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> logits (B, num_classes) (the features (B, C3) when ``num_classes`` is 0)."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """The stage maps ``indices`` (timm's convention: None = all, an int n = the last n, negative = from the
        end) at H/4, H/8, H/16, of size ceil(H/s) x ceil(W/s), NCHW or NHWC (``output_fmt``); with
        ``intermediates_only=False`` also the final map (:meth:`forward_features`, or with ``stop_early`` the
        map of the last stage asked for). Stages after the last one asked for run only for the final map. The
        maps have no norm of their own (``norm`` must be False)."""
        if norm or output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"ConvMAE gives NCHW or NHWC stage maps without a norm, got norm={norm}, "
                             f"output_fmt={output_fmt!r}")
        take, last = feature_take_indices(self.num_stages, indices)
        maps = self._maps(x, last + 1 if stop_early or intermediates_only else self.num_stages)
        intermediates = [maps[i] if output_fmt == 'NCHW' else maps[i].permute(0, 2, 3, 1) for i in take]
        return intermediates if intermediates_only else (maps[-1], intermediates)

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Remove the stages after the last of ``indices`` (their modules and ``pos_embed``: ``STAGE_OF``) and,
        with ``prune_head``, ``fc_norm`` and the head (``global_pool=''``); there is no other norm to prune.
        Returns the absolute indices kept."""
        take, last = feature_take_indices(self.num_stages, indices)
        for name in [n for n, _ in (*self.named_children(), *self.named_parameters(recurse=False))]:
            stage = self.stage_of(name)
            if stage is not None and stage > last + 1:  # STAGE_OF's stage k + 1 makes map k (0: the stem)
                delattr(self, name)
        self.num_stages = last + 1
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, '')
        return take


def _cfg(**kwargs) -> dict:
    """timm's pretrained config: ImageNet evaluation as officially (224, resize 256 bicubic, centre crop), the
    stage-3 grid (``pool_size``) and least input (``min_input_size``) of ConvMAE-Base's stride 16, weights only
    from a file given by the user (``custom_load``: :meth:`TimmConvMAE.load_pretrained`)."""
    size, stride = 224, math.prod(ARCH_SETTINGS['base']['patch_sizes'])
    least = MIN_POSITIONS * stride
    return {**dict(url='', num_classes=1000, input_size=(3, size, size), pool_size=(size // stride, size // stride),
                   min_input_size=(3, least, least), crop_pct=0.875, interpolation='bicubic',
                   mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv='patch_embed1.proj',
                   classifier='head', custom_load=True, paper_ids='arXiv:2205.03892'), **kwargs}


default_cfgs = generate_default_cfgs({
    'convmae_base.ft_in1k': _cfg(),
    'convmae_base.mae_in1k': _cfg(num_classes=0),
})


@register_model
def convmae_base(pretrained: bool = False, pretrained_cfg_overlay: Optional[dict] = None,
                 **kwargs) -> TimmConvMAE:
    """ConvMAE-Base (``ConvViT``'s default architecture); keywords override it. A weight file always loads
    through :meth:`TimmConvMAE.load_pretrained` (timm 1.0.31 resets ``custom_load`` when an overlay names a
    file)."""
    return build_model_with_cfg(TimmConvMAE, 'convmae_base', pretrained,
                                pretrained_cfg_overlay=dict(pretrained_cfg_overlay or {}, custom_load=True),
                                feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2)), **kwargs)
