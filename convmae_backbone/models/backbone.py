"""``ConvMAE``: the ConvMAE encoder as an mmdet/mmseg backbone."""
from typing import Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import load_encoder_weights
from .convvit import ConvViT


class ConvMAE(ConvViT):
    """ConvMAE (MCMAE) multi-scale backbone for detection and segmentation.

    Takes (B, C, H, W) with any H, W >= 32 and returns NCHW maps for ``out_indices``: 0 at H/4, 1 at H/8,
    2 at H/16 and 3, an extra H/32 map max-pooled from the H/16 one. The map at stride s is
    ceil(H/s) x ceil(W/s) (inputs are zero-padded to multiples of 16 and the outputs cropped back).

    Args (beyond :class:`ConvViT`'s):
        out_indices: which of the four maps to return.
        frozen_stages: -1 freezes nothing; k in 1..3 freezes stages 1..k (their patch embeddings and blocks;
            stage 3 includes ``patch_embed4``, ``pos_embed`` and ``fc_norm``); 0 freezes only ``patch_embed1``.
        out_type: ``'featmaps'`` returns the maps above; ``'avg_featmap'`` (image classification, the official
            fine-tuning and linear-probing head input) returns a 1-tuple ``(B, C3)``: the stage-3 tokens
            averaged, then ``fc_norm`` (LayerNorm, eps 1e-6); ``out_indices`` is then not used.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH)`` loads official pretraining or fine-tuned
            checkpoints, this project's checkpoints, exported backbone weights and mmdet/mmseg checkpoints.
    """

    def __init__(self, *args, out_indices: Sequence[int] = (0, 1, 2), frozen_stages: int = -1,
                 out_type: str = 'featmaps', **kwargs):
        super().__init__(*args, **kwargs)
        if out_type not in ('featmaps', 'avg_featmap'):
            raise ValueError(f"out_type must be 'featmaps' or 'avg_featmap', got {out_type!r}")
        self.out_type = out_type
        if out_type == 'avg_featmap':
            self.fc_norm = nn.LayerNorm(self.embed_dims[2], eps=1e-6)
        out_indices = tuple(out_indices)
        if not out_indices or any(i not in (0, 1, 2, 3) for i in out_indices):
            raise ValueError(f'out_indices must be a non-empty subset of (0, 1, 2, 3), got {out_indices}')
        if not -1 <= frozen_stages <= 3:
            raise ValueError(f'frozen_stages must be in -1..3, got {frozen_stages}')
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.in_channels = self.patch_embed1.proj.in_channels
        self._freeze_stages()

    def init_weights(self) -> None:
        cfg = self.init_cfg or {}
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            load_encoder_weights(self, cfg['checkpoint'])
        else:
            self._init_encoder_weights()
        self._is_init = True
        self._freeze_stages()

    def _frozen_modules(self):
        stage3 = [self.patch_embed3, self.patch_embed4, self.blocks3]
        if self.out_type == 'avg_featmap':
            stage3.append(self.fc_norm)
        groups = [
            [self.patch_embed1],
            [self.blocks1],
            [self.patch_embed2, self.blocks2],
            stage3,
        ]
        return [m for g in groups[:self.frozen_stages + 1] for m in g]

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad = False
        if self.frozen_stages >= 3:
            self.pos_embed.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        return self

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'ConvMAE expects images of shape (B, {self.in_channels}, H, W), '
                             f'got {tuple(x.shape)}')
        if x.shape[2] < 32 or x.shape[3] < 32:
            raise ValueError(f'ConvMAE expects H and W of at least 32 pixels, got {tuple(x.shape[2:])}')

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """(B, C, H, W) -> the maps of ``out_indices`` (NCHW), or ``((B, C3),)`` with ``out_type='avg_featmap'``."""
        self._check_input(x)
        h, w = x.shape[2], x.shape[3]
        maps = list(self.forward_features(self.pad_to_patch(x)))
        if self.out_type == 'avg_featmap':
            s3 = maps[2][:, :, :-(-h // 16), :-(-w // 16)]
            return (self.fc_norm(s3.mean(dim=(2, 3))),)
        if 3 in self.out_indices:
            maps.append(F.max_pool2d(maps[2], kernel_size=2, stride=2, ceil_mode=True))
        outs = []
        for i in self.out_indices:
            s = 4 * 2 ** i
            outs.append(maps[i][:, :, :-(-h // s), :-(-w // s)])
        return tuple(outs)
