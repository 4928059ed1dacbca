"""``ConvMAEPretrainer``: masked-autoencoder pretraining of the ConvMAE encoder."""
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import torch
from mmengine.model import BaseModel
from torch import Tensor, nn

from ..registry import register
from .attention import TransformerBlock
from .convvit import ConvViT
from .masking import MASKINGS, BlockMask, batch_masks, check_mask_ratio, mask_strategy, num_visible_tokens
from .mimic import Teacher, build_teachers, distance
from .sparse_conv import conv_as_linear
from .utils import get_2d_sincos_pos_embed, norm_pix, patchify
from .weights import PRETRAINING_ONLY

#: The name of the reconstruction term among the pretrainer's losses; a mimic teacher NAME's term is
#: ``f'{MIMIC_LOSS}{NAME}'``.
RECONSTRUCTION_LOSS = 'loss_rec'
MIMIC_LOSS = 'loss_mimic_'


class MAEOutput(NamedTuple):
    """What :meth:`ConvMAEPretrainer.forward_mae` returns.

    Attributes:
        losses: the named loss terms, scalars, already weighted: ``loss_rec`` (the reconstruction) and one
            ``loss_mimic_<teacher>`` per mimic teacher; mmengine logs each and optimises their sum.
        pred: (V*B, L, p*p*3) the decoder's prediction for every token.
        mask: (V*B, L) bool, True = masked; views view-major (row k*B + b is view k of image b).
    """
    losses: Dict[str, Tensor]
    pred: Tensor
    mask: Tensor

    @property
    def loss(self) -> Tensor:
        """The objective: the sum of :attr:`losses`."""
        terms = list(self.losses.values())
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total


@register('MODELS')
class ConvMAEPretrainer(ConvViT, BaseModel):
    """ConvMAE pretraining: block-wise masking, masked convolution in stages 1-2, stage 3 on visible tokens,
    multi-scale fusion and an MAE decoder that reconstructs the masked patches (16x16 pixels).

    With ``sparse=True`` (default) stages 1-2 run on the visible positions only; ``sparse=False`` computes them
    densely over the whole masked image, as the official code does. Both run the same layers (see
    :mod:`.masking`) and give the same results; the sparse path needs about a quarter of the stage-1/2 work.

    ``masking='complementary'`` is Fast ConvMAE (Alpha-VL/FastConvMAE): every image is encoded under V =
    1 / (1 - mask_ratio) masks whose visible sets are disjoint (4 at 0.75), as V*B sequences, view-major; the loss
    is the mean over the masked tokens of all views. In the sparse layout the V views hold every position of the
    image once: the position-wise layers of stages 1-2 see each position once, as in the official code (which runs
    them densely), and the depthwise convolutions run on the V views' scattered maps, as the official code's V
    masked convolutions per block do. Per view the computation is block-wise ConvMAE with that view's mask.

    Ablation switches of the paper: ``conv_kernel_size`` (an encoder argument), ``multiscale_fusion=False``
    (no ``stage1_output_decode``/``stage2_output_decode``: the decoder sees stage 3 only).

    ``mimic=dict(teachers=dict(NAME=dict(...), ...))`` adds MR-MAE-style feature mimicking (:mod:`.mimic`): a
    projection head per frozen teacher (``mimic_heads.NAME``) predicts, from the visible stage-3 tokens the decoder
    receives, the teacher's features of the unmasked image at those tokens; each teacher adds a weighted term
    ``loss_mimic_NAME`` to the reconstruction's ``loss_rec``. The teachers are held outside the module tree
    (:attr:`teachers`): no checkpoint, optimizer, DDP or initialisation sees them; ``.to()``/``.double()`` move them.

    ``state_dict()`` keys equal the official ``MaskedAutoencoderConvViT`` ones. Works for any H, W that are
    multiples of the patch size: the fixed sin-cos position embeddings are built for the actual grid.
    """

    #: The modules on top of the encoder, used only for pretraining (skipped when a backbone loads weights).
    PRETRAINING_ONLY = PRETRAINING_ONLY

    #: The :class:`ConvViT` arguments pretraining takes (the official pretraining encoder: global attention, no
    #: relative position bias, no layer scale).
    ENCODER_ARGS = ('img_size', 'in_channels', 'arch', 'patch_sizes', 'embed_dims', 'depths', 'num_heads',
                    'mlp_ratios', 'conv_kernel_size', 'drop_path_rate', 'with_cp')

    def __init__(self,
                 decoder_embed_dim: int = 512,
                 decoder_depth: int = 8,
                 decoder_num_heads: int = 16,
                 mask_ratio: float = 0.75,
                 norm_pix_loss: bool = True,
                 loss_type: str = 'mse',
                 sparse: bool = True,
                 masking: str = 'block',
                 multiscale_fusion: bool = True,
                 mimic: Optional[dict] = None,
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None,
                 **encoder_args):
        """``masking``: a :data:`~.masking.MASKINGS` name, one block-wise mask per image (``'block'``) or V
        complementary ones (``'complementary'``, Fast ConvMAE). ``mimic``: see the class docstring and
        :mod:`.mimic`. ``encoder_args``: the :attr:`ENCODER_ARGS` of :class:`ConvViT` (defaults: ConvMAE-Base at
        224)."""
        unknown = sorted(set(encoder_args) - set(self.ENCODER_ARGS))
        if unknown:
            raise TypeError(f'ConvMAEPretrainer got unexpected arguments {unknown}; the encoder takes '
                            f'{list(self.ENCODER_ARGS)}')
        check_mask_ratio(mask_ratio)
        strategy = mask_strategy(masking, mask_ratio)
        with torch.random.fork_rng(devices=[]):  # building the teachers draws nothing from the global RNG
            teachers = build_teachers(mimic)
        super().__init__(**encoder_args, init_cfg=init_cfg, data_preprocessor=data_preprocessor)
        if loss_type not in ('mse', 'l1'):
            raise ValueError(f"loss_type must be 'mse' or 'l1', got {loss_type!r}")
        #: masks per image: V complementary views, or 1
        self.num_views = strategy.views(mask_ratio)
        self.masking, self.multiscale_fusion = masking, multiscale_fusion
        dims, p = self.embed_dims, self.patch_sizes
        self.mask_ratio, self.norm_pix_loss, self.loss_type = mask_ratio, norm_pix_loss, loss_type
        self.sparse = sparse
        self.pos_embed.requires_grad = False  # fixed sin-cos
        if multiscale_fusion:  # stage-1/2 features to the stage-3 grid (kernel == stride)
            self.stage1_output_decode = nn.Conv2d(dims[0], dims[2], p[1] * p[2], stride=p[1] * p[2])
            self.stage2_output_decode = nn.Conv2d(dims[1], dims[2], p[2], stride=p[2])
        self.norm = nn.LayerNorm(dims[2], eps=1e-6)

        self.decoder_embed = nn.Linear(dims[2], decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.pos_embed.shape[1], decoder_embed_dim),
                                              requires_grad=False)
        decoder_mlp_ratio = float(self.mlp_ratios[0])
        self.decoder_blocks = nn.ModuleList(
            TransformerBlock(decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size ** 2 * self.in_channels)
        #: the frozen mimic teachers by name, outside the module tree (see :mod:`.mimic`)
        self.teachers: Dict[str, Teacher] = teachers
        if teachers:
            self.mimic_heads = nn.ModuleDict({name: t.head(dims[2]) for name, t in teachers.items()})
        self.init_weights()

    def _apply(self, fn, *args, **kwargs):
        """``to``/``cuda``/``double``/... of the module tree, and of the teachers held outside it."""
        super()._apply(fn, *args, **kwargs)
        for teacher in getattr(self, 'teachers', {}).values():
            teacher.module._apply(fn, *args, **kwargs)
        return self

    def init_random_weights(self) -> None:
        super().init_random_weights()
        with torch.no_grad():
            self.pos_embed.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.pos_grid))
            self.decoder_pos_embed.copy_(get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], self.pos_grid))
        for proj in (self.patch_embed1.proj, self.patch_embed2.proj, self.patch_embed3.proj):
            nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.normal_(self.mask_token, std=0.02)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _fixed_pos(param: Tensor, pos_grid: Tuple[int, int], grid: Tuple[int, int]) -> Tensor:
        """The stored sin-cos embedding for the pretraining grid, a freshly built one for any other grid."""
        if tuple(grid) == pos_grid:
            return param
        return get_2d_sincos_pos_embed(param.shape[-1], grid).to(param)

    def pos_embed_for(self, grid: Tuple[int, int]) -> Tensor:
        return self._fixed_pos(self.pos_embed, self.pos_grid, grid)

    def _check_input(self, imgs: Tensor, mask: Optional[Tensor]) -> Tuple[int, int]:
        if imgs.dim() != 4 or imgs.shape[1] != self.in_channels:
            raise ValueError(f'expected images of shape (B, {self.in_channels}, H, W), got {tuple(imgs.shape)}')
        h, w = imgs.shape[2:]
        p = self.patch_size
        if h % p or w % p or h == 0 or w == 0:
            raise ValueError(f'image height and width must be positive multiples of {p}, got {h}x{w}')
        grid = (h // p, w // p)
        shape = (imgs.shape[0], *((self.num_views,) if self.num_views > 1 else ()), grid[0] * grid[1])
        if mask is not None and tuple(mask.shape) != shape:
            name = '(B, V, L)' if self.num_views > 1 else '(B, L)'
            raise ValueError(f'mask must have shape {name} = {shape} for {h}x{w} images with '
                             f'masking={self.masking!r}, got {tuple(mask.shape)}')
        return grid

    def block_mask(self, imgs: Tensor, mask: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                   from_ratio: bool = False) -> BlockMask:
        """The :class:`BlockMask` of a step (see :meth:`forward_mae`): of ``mask`` (B, L), or (B, V, L) with
        complementary masking (V*B rows, view-major), or drawn when None."""
        grid = self._check_input(imgs, mask)
        b, num_tokens = imgs.shape[0], grid[0] * grid[1]
        num_visible = num_visible_tokens(num_tokens, self.mask_ratio)
        if mask is None:
            masks = MASKINGS[self.masking].draw(b, num_tokens, self.mask_ratio, imgs.device, generator)
            if self.num_views == 1:
                return BlockMask(masks, grid, num_visible)
            return BlockMask.from_views(masks, grid, num_visible)
        mask = mask.to(imgs.device).bool()
        expected = num_visible if from_ratio else None
        try:
            if self.num_views == 1:
                return BlockMask(mask, grid, expected)
            overlap = ((~mask).sum(dim=1) > 1).any()
            msg = 'the visible tokens of the views of an image must be disjoint (complementary masks)'
            if torch.compiler.is_compiling():
                torch._assert_async(~overlap, msg)
            elif overlap:
                raise ValueError(msg)
            return BlockMask.from_views(mask, grid, expected)
        except ValueError as exc:
            if not from_ratio:
                raise
            raise ValueError(f'{exc}: the model has mask_ratio={self.mask_ratio}, masking={self.masking!r}; the '
                             f'data pipeline (RandomBlockMask) must use the same') from exc

    # ------------------------------------------------------------------ model
    def forward_encoder(self, imgs: Tensor, mask: BlockMask) -> Tensor:
        """imgs (B, 3, H, W) and their mask -> latent of the visible tokens (B, Lv, C3), after fusion and norm.

        Sparse: stages 1-2 see only the visible (patch x patch)-pixel blocks, (B, Lv, 16, 16, 3); dense: the
        whole image with masked convolution. The layers are the same (see :mod:`.masking`).
        """
        x = imgs.permute(0, 2, 3, 1)
        if self.sparse:
            x = mask.gather(x)
        s1, s2, x, _ = self.encode(x, mask)
        if self.multiscale_fusion:
            x = x + mask.visible_tokens(conv_as_linear(self.stage1_output_decode, s1))
            x = x + mask.visible_tokens(conv_as_linear(self.stage2_output_decode, s2))
        return self.norm(x)

    def forward_decoder(self, latent: Tensor, mask: BlockMask) -> Tensor:
        """latent (B, Lv, C3) -> prediction for every token (B, L, patch*patch*3)."""
        x = self.decoder_embed(latent)
        b, lv, c = x.shape
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(b, mask.mask.shape[1] - lv, c)], dim=1)
        x = mask.restore(x) + self._fixed_pos(self.decoder_pos_embed, self.pos_grid, mask.grid).to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def reconstruction_target(self, imgs: Tensor) -> Tensor:
        """Patchified images (B, L, patch*patch*3), per-patch normalised when ``norm_pix_loss``."""
        target = patchify(imgs, self.patch_size)
        return norm_pix(target)[0] if self.norm_pix_loss else target

    def predicted_pixels(self, pred: Tensor, imgs: Tensor) -> Tensor:
        """A prediction (B, L, patch*patch*3) as patchified pixels of ``imgs`` (B, 3, H, W): with
        ``norm_pix_loss`` un-normalised with each target patch's own mean and deviation (the inverse of
        :meth:`reconstruction_target`)."""
        if not self.norm_pix_loss:
            return pred
        _, mean, std = norm_pix(patchify(imgs, self.patch_size))
        return pred * std + mean

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean over masked tokens (``mask`` (V*B, L) bool) of the per-token MSE (or L1) between ``pred``
        (V*B, L, p*p*3) and the target of imgs (B, 3, H, W), the same for every view. Always in (at least) fp32,
        also under autocast: the target statistics and the loss."""
        dtype = torch.promote_types(pred.dtype, torch.float32)  # float64 stays float64 (parity tests)
        with torch.autocast(device_type=imgs.device.type, enabled=False):
            target = self.reconstruction_target(imgs.to(dtype))
            diff = pred.to(dtype) - target.repeat(pred.shape[0] // target.shape[0], 1, 1)
            per_token = (diff ** 2 if self.loss_type == 'mse' else diff.abs()).mean(dim=-1)
            m = mask.to(per_token.dtype)
            return (per_token * m).sum() / m.sum()

    def mimic_losses(self, imgs: Tensor, latent: Tensor, mask: BlockMask) -> Dict[str, Tensor]:
        """The weighted mimic term of every teacher: imgs (B, 3, H, W) as the data preprocessor normalised them,
        latent (V*B, Lv, C3) the visible tokens the decoder receives. Per teacher: the mean over the visible tokens
        (and the class token with ``cls_token``) of the distance between the head's prediction and the teacher's
        normalised features of the unmasked image at those tokens, in (at least) fp32."""
        pre = self.data_preprocessor
        normalised = getattr(pre, '_enable_normalize', False)
        pre_mean, pre_std = (pre.mean, pre.std) if normalised else (None, None)
        dtype = torch.promote_types(latent.dtype, torch.float32)
        losses = {}
        for name, teacher in self.teachers.items():
            patches, cls = teacher.targets(teacher.inputs(imgs, pre_mean, pre_std), mask.grid)  # (B, L, Ct)
            head = self.mimic_heads[name]
            preds, targets = [head(latent)], [mask.keep(patches.repeat(self.num_views, 1, 1))]  # (V*B, Lv, Ct)
            if cls is not None:
                preds.append(head(latent.mean(dim=1, keepdim=True)))
                targets.append(cls.repeat(self.num_views, 1)[:, None])
            with torch.autocast(device_type=imgs.device.type, enabled=False):
                per_token = torch.cat([distance(p.to(dtype), t.to(dtype), teacher.distance)
                                       for p, t in zip(preds, targets)], dim=1)  # (V*B, Lv [+ 1])
                losses[MIMIC_LOSS + name] = teacher.weight * per_token.mean()
        return losses

    def forward_mae(self, imgs: Tensor, mask: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                    from_ratio: bool = False) -> MAEOutput:
        """imgs (B, 3, H, W), H and W multiples of 16; mask (B, L) bool, True = masked, or with
        ``masking='complementary'`` (B, V, L), V masks per image with disjoint visible tokens; None draws them.

        ``from_ratio``: a given mask must leave the number of tokens visible that ``mask_ratio`` implies; the
        count is then known without reading the mask (no data-dependent control flow under ``torch.compile``).
        Otherwise any mask with the same visible count in every row is accepted.

        Returns a :class:`MAEOutput`: the named losses (``loss_rec``, and ``loss_mimic_<teacher>`` with
        ``mimic``), pred (V*B, L, 16*16*3) and mask (V*B, L) bool, views view-major (row k*B + b is view k of
        image b; V = 1 for block-wise masking).
        """
        block_mask = self.block_mask(imgs, mask, generator, from_ratio)
        views = imgs.repeat(self.num_views, 1, 1, 1) if self.num_views > 1 else imgs  # the sparse path reads
        latent = self.forward_encoder(views, block_mask)  # each position of each image once
        pred = self.forward_decoder(latent, block_mask)
        losses = {RECONSTRUCTION_LOSS: self.forward_loss(imgs, pred, block_mask.mask)}
        if self.teachers:
            losses.update(self.mimic_losses(imgs, latent, block_mask))
        return MAEOutput(losses, pred, block_mask.mask)

    def forward(self, inputs: Tensor, data_samples: Optional[List] = None,
                mode: str = 'tensor') -> Union[Dict[str, Tensor], Tensor, List]:
        """mmengine entry point: ``loss`` -> the named losses (:attr:`MAEOutput.losses`, which mmengine logs
        term by term and sums), ``tensor``/``predict`` -> (pred, mask).

        inputs (B, 3, H, W); data_samples: per-sample masks (``.mask`` (L,) bool, or (V, L) with complementary
        masking, drawn by the pipeline's ``RandomBlockMask``) when present, else the masks are drawn here.
        """
        out = self.forward_mae(inputs, batch_masks(data_samples), from_ratio=True)
        if mode == 'loss':
            return out.losses
        if mode in ('tensor', 'predict'):
            return out.pred, out.mask
        raise ValueError(f"mode must be 'loss', 'tensor' or 'predict', got {mode!r}")
