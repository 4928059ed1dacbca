"""The ConvMAE encoder in timm: ``timm.create_model('convmae_base', ...)`` after ``import convmae_backbone``.

* ``timm.create_model('convmae_base', pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`` loads any
  checkpoint the ``ConvMAE`` backbone reads (the official pretraining and fine-tuned checkpoints, ours, exported
  backbones, detectors and segmentors) through the same adaptation (:func:`.weights.load_pretrained`: position
  embedding and relative-position tables resized, pretraining-only modules skipped).
* ``features_only=True`` gives timm's ``FeatureGetterNet``: the NCHW maps at H/4, H/8 and H/16
  (``out_indices`` among 0, 1, 2), of size ceil(H/s) x ceil(W/s) for any H, W >= 32, as the backbone returns them.
* Otherwise an ImageNet classifier: stage-3 tokens averaged, ``fc_norm`` (LayerNorm, eps 1e-6), ``head``: the
  official fine-tuned model, whose checkpoint loads with its head.

Pretrained tags: ``convmae_base.ft_in1k`` (the default: the fine-tuned classifier, 1000 classes) and
``convmae_base.mae_in1k`` (the 1600-epoch pretrained encoder, no head). The official files are downloads of
their own (README, "Model zoo"); timm gets them through ``pretrained_cfg_overlay=dict(file=PATH)`` only.
"""
from typing import List, Optional, Sequence, Tuple, Union

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from .backbone import ConvMAE, crop_maps
from .weights import load_pretrained

class TimmConvMAE(ConvMAE):
    """ConvMAE with timm's model interface: a classification head, ``feature_info``, ``forward_intermediates``
    (for ``FeatureGetterNet``) and ``load_pretrained`` (timm's ``custom_load``).

    Args:
        num_classes: classes of the head; 0 for none (``forward`` then returns the pooled, normalised features).
        in_chans: image channels (timm's name for ``in_channels``).
        drop_rate: dropout before the head.
        **kwargs: :class:`ConvMAE` / ``ConvViT`` keywords (architecture, drop path, windows...).
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0, **kwargs):
        super().__init__(in_channels=in_chans, out_type='avg_featmap', **kwargs)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dims[2]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.feature_info = [dict(num_chs=c, reduction=s, module=f'blocks{i + 1}')
                             for i, (c, s) in enumerate(zip(self.embed_dims, self.strides))]
        self.init_weights()  # timm models are initialised when built (``init_cfg`` may name a checkpoint)

    def load_pretrained(self, path: str) -> List[str]:
        """Load a checkpoint file of any format the ConvMAE backbone reads (timm calls this for
        ``pretrained_cfg_overlay=dict(file=path)``); returns the missing keys."""
        return load_pretrained(self, path)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new (randomly initialised) head for ``num_classes`` classes; the pooling is always the average."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pooled, normalised features (B, C3) -> logits (B, num_classes), or the features with ``pre_logits``."""
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> logits (B, num_classes) (the features (B, C3) when ``num_classes`` is 0)."""
        return self.forward_head(super().forward(x)[0])

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """The stage maps ``indices`` (timm's convention: None = all three, an int n = the last n) as NCHW maps at
        H/4, H/8, H/16, of size ceil(H/s) x ceil(W/s); with ``intermediates_only=False`` also the last map.
        The stage maps have no norm of their own (``norm`` must be False); all stages run (``stop_early``
        changes nothing)."""
        if norm or output_fmt != 'NCHW':
            raise ValueError(f'ConvMAE gives NCHW stage maps without a norm, got norm={norm}, '
                             f'output_fmt={output_fmt!r}')
        take, _ = feature_take_indices(len(self.feature_info), indices)
        self._check_input(x)
        maps = crop_maps(self.forward_features(self.pad_to_patch(x)), self.strides, (x.shape[2], x.shape[3]))
        intermediates = [maps[i] for i in take]
        return intermediates if intermediates_only else (maps[-1], intermediates)

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop what the stage maps do not need (the head and ``fc_norm`` with ``prune_head``); every stage is
        kept. Returns the absolute indices."""
        take, _ = feature_take_indices(len(self.feature_info), indices)
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0)
        return take


def _cfg(**kwargs) -> dict:
    """timm's pretrained config: ImageNet evaluation as officially (224, resize 256 bicubic, centre crop),
    weights only from a file given by the user (``custom_load``: :meth:`TimmConvMAE.load_pretrained`)."""
    return {**dict(url='', num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.875,
                   interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, custom_load=True,
                   classifier='head', paper_ids='arXiv:2205.03892'), **kwargs}


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
