"""The ConvMAE architecture a state dict was made with, read from its tensor shapes.

Shapes give the input channels, patch sizes, embedding dims, depths, MLP ratios and the pretraining image size
(grid of ``pos_embed``). The number of stage-3 heads leaves no trace in the shapes except in relative-position
tables (fine-tuned checkpoints with ``use_rel_pos_bias``): it is taken from the caller, else from those tables,
else 64-channel heads are assumed (as in ConvMAE-Base and -Large).
"""
import math
import re
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

from torch import Tensor

from ..checkpoint import CheckpointError
from .utils import pos_embed_layout

#: The :class:`ConvViT` keyword arguments that weight shapes fix, compared by :func:`check_arch`. ``img_size``
#: is not among them (``pos_embed`` is resized to the model's grid on loading), nor ``num_heads``.
SHAPE_FIELDS = ('in_channels', 'patch_sizes', 'embed_dims', 'depths', 'mlp_ratios', 'conv_kernel_size')

#: The :class:`ConvViT` keyword arguments a named size (``arch``) sets.
ARCH_FIELDS = ('patch_sizes', 'embed_dims', 'depths', 'num_heads', 'mlp_ratios')

#: Named sizes of ``arch`` (ConvViT, the ``ConvMAE`` backbone and ``ConvMAEPretrainer``).
#: ``'base'`` (``'b'``): ConvMAE-Base, the official ``convmae_convvit_base_patch16`` (Alpha-VL/ConvMAE
#: models_convmae.py) and ``fastconvmae_convvit_base_patch16`` (Alpha-VL/FastConvMAE models_fastconvmae.py).
#: ``'demo'``: the small model of configs/pretrain/convmae-tiny_demo.py (tools/demo.py).
#: The ConvMAE-v2 Small/Base/Large/Huge checkpoints (README of Alpha-VL/ConvMAE) are not named: neither the
#: repository nor its issues state their sizes in text, and Alpha-VL/ConvMAE#32 reports that the checkpoints'
#: MLP ratios (Large, Huge) and patch size (Huge) differ from the v2 paper; ``arch='auto'`` of the backbone reads
#: them from the checkpoint's shapes.
ARCH_SETTINGS: Dict[str, Dict[str, object]] = {
    'base': dict(patch_sizes=(4, 2, 2), embed_dims=(256, 384, 768), depths=(2, 2, 11), num_heads=12,
                 mlp_ratios=(4, 4, 4)),
    'demo': dict(patch_sizes=(4, 2, 2), embed_dims=(32, 64, 128), depths=(1, 1, 3), num_heads=4,
                 mlp_ratios=(4, 4, 4)),
}
ARCH_ALIASES = {'b': 'base'}

HEAD_DIM = 64


def arch_settings(arch: Union[None, str, Mapping[str, object]]) -> Dict[str, object]:
    """The :data:`ARCH_FIELDS` of ``arch``: a name of :data:`ARCH_SETTINGS` (or an alias), a dict with at least
    ``embed_dims``, ``depths`` and ``num_heads`` (``patch_sizes`` and ``mlp_ratios`` default to Base's), or None
    (ConvMAE-Base)."""
    base = ARCH_SETTINGS['base']
    if arch is None:
        return dict(base)
    if isinstance(arch, str):
        name = ARCH_ALIASES.get(arch.lower(), arch.lower())
        if name not in ARCH_SETTINGS:
            raise ValueError(f'unknown arch {arch!r}; the named sizes are '
                             f'{sorted([*ARCH_SETTINGS, *ARCH_ALIASES])} (or a dict of {list(ARCH_FIELDS)})')
        return dict(ARCH_SETTINGS[name])
    if isinstance(arch, Mapping):
        unknown = sorted(set(arch) - set(ARCH_FIELDS))
        missing = [k for k in ('embed_dims', 'depths', 'num_heads') if k not in arch]
        if unknown or missing:
            raise ValueError(f'an arch dict takes {list(ARCH_FIELDS)} and needs embed_dims, depths and num_heads; '
                             f'got unknown {unknown}, missing {missing}')
        return {**base, **arch}
    raise TypeError(f'arch must be a name, a dict or None, got {type(arch).__name__}')


def resolve_arch(arch: Union[None, str, Mapping[str, object]], given: Mapping[str, object]) -> Dict[str, object]:
    """The :data:`ARCH_FIELDS` of a model: ``given`` values (None = not given) override those of ``arch``
    (:func:`arch_settings`), as a config that inherits ``arch`` and sets a field replaces that field."""
    fields = arch_settings(arch)
    fields.update({k: v for k, v in given.items() if k in ARCH_FIELDS and v is not None})
    return fields


def model_arch(model_cfg: Mapping[str, object]) -> Dict[str, object]:
    """The keyword arguments of a model config (dict or mmengine ``ConfigDict``) with its :data:`ARCH_FIELDS`
    resolved as the model resolves them (``arch`` and explicit fields): what was built, named or not."""
    return {**model_cfg, **resolve_arch(model_cfg.get('arch'), model_cfg)}


def _ratio(hidden: int, dim: int) -> Union[int, float]:
    """The MLP ratio that gives ``hidden`` channels over ``dim`` as the blocks compute them,
    ``int(dim * ratio)``: ``hidden / dim``, or the next float above it where rounding would lose a channel
    (e.g. 15 / 11)."""
    r = hidden / dim
    if r.is_integer():
        return int(r)
    while int(dim * r) < hidden:
        r = math.nextafter(r, math.inf)
    return r


def infer_arch(state_dict: Mapping[str, Tensor], num_heads: Optional[int] = None) -> Dict[str, object]:
    """ConvMAE keyword arguments (``img_size``, ``in_channels``, ``patch_sizes``, ``embed_dims``, ``depths``,
    ``num_heads``, ``mlp_ratios``, ``conv_kernel_size``) of the encoder weights in ``state_dict`` (encoder names, no wrapper prefix:
    see :func:`.weights.extract_state_dict`). Per-stage values are 3-tuples; ``img_size`` is an int (the
    square ``pos_embed`` grid times the product of the patch sizes). Raises ``ValueError`` naming a missing
    key or an impossible shape.

    ConvMAE-v2 layouts read the same way: a ``cls_token`` is not an architecture field, and a ``pos_embed`` with
    one class-token row before its square grid gives the grid's ``img_size``."""
    def get(key: str) -> Tensor:
        if key not in state_dict:
            raise ValueError(f'no {key} among the weights (first keys: {list(state_dict)[:5]}); not a ConvMAE '
                             f'encoder?')
        return state_dict[key]

    projections = [get(f'patch_embed{i}.proj.weight') for i in (1, 2, 3)]  # (C_out, C_in, p, p)
    embed_dims = tuple(int(w.shape[0]) for w in projections)
    patch_sizes = tuple(int(w.shape[-1]) for w in projections)
    depths = tuple(len({m.group(1) for k in state_dict for m in [re.match(rf'blocks{i}\.(\d+)\.', k)] if m})
                   for i in (1, 2, 3))
    mlp_ratios = tuple(_ratio(int(get(f'blocks{i}.0.mlp.fc1.weight').shape[0]), embed_dims[i - 1])
                       for i in (1, 2, 3))
    tokens = int(get('pos_embed').shape[1])
    try:
        side, _ = pos_embed_layout(tokens)  # a class-token row (ConvMAE-v2) is not part of the grid
    except ValueError as exc:
        raise ValueError(f'{exc}; cannot infer img_size') from None
    if num_heads is None:
        rel_pos = state_dict.get('blocks3.0.attn.rel_pos_h')  # (2 * size - 1, head_dim)
        num_heads = embed_dims[2] // int(rel_pos.shape[1] if rel_pos is not None else HEAD_DIM)
    if num_heads < 1 or embed_dims[2] % num_heads:
        raise ValueError(f'num_heads must divide the stage-3 width {embed_dims[2]}, got {num_heads}')
    kernels = [state_dict[k] for k in ('blocks1.0.attn.weight', 'blocks2.0.attn.weight') if k in state_dict]
    return dict(img_size=side * math.prod(patch_sizes), in_channels=int(projections[0].shape[1]),
                patch_sizes=patch_sizes, embed_dims=embed_dims, depths=depths, num_heads=int(num_heads),
                mlp_ratios=mlp_ratios, conv_kernel_size=int(kernels[0].shape[-1]) if kernels else 5)


def _per_stage(value) -> Tuple:
    return tuple(value) if isinstance(value, Sequence) else (value,) * 3


def _normalised(field: str, value, embed_dims: Sequence[int]):
    """Comparable form of a config ``value``: per-stage fields as 3-tuples, MLP ratios as hidden widths."""
    if field in ('in_channels', 'conv_kernel_size'):
        return int(value)
    value = _per_stage(value)
    if field == 'mlp_ratios':
        return tuple(int(d * r) for d, r in zip(embed_dims, value))
    return tuple(int(v) for v in value)


def check_arch(config: Mapping[str, object], inferred: Mapping[str, object], source: str) -> None:
    """Raise one ``ValueError`` listing every :data:`SHAPE_FIELDS` entry of ``config`` (ConvMAE keyword
    arguments; fields it does not set are not compared) that differs from ``inferred`` (:func:`infer_arch` of
    the weights in ``source``). MLP ratios agree when they give the same hidden widths."""
    dims = inferred['embed_dims']
    differing = [f'{field}: config {config[field]!r}, checkpoint {inferred[field]!r}'
                 for field in SHAPE_FIELDS
                 if field in config and _normalised(field, config[field], dims) != _normalised(
                     field, inferred[field], dims)]
    if differing:
        raise ValueError(f'the architecture in the config differs from the weights in {source}: '
                         + '; '.join(differing))


def stored_elements(state: Mapping[str, Tensor], source: str) -> int:
    """How many elements the tensors of ``state`` store, each storage counted once. Raises
    :class:`CheckpointError` naming ``source`` and the first tensor whose shape claims more elements than its
    storage holds (an expanded or self-overlapping view: a few stored bytes standing for a large tensor)."""
    storages: Dict[int, int] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            continue
        storage = value.untyped_storage()
        if value.numel() * value.element_size() > storage.nbytes():
            raise CheckpointError(f'{source}: {key} of shape {tuple(value.shape)} is stored in {storage.nbytes()} '
                                  f'bytes (an expanded view); weights must be stored whole')
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes() //
                                           value.element_size())
    return sum(storages.values())


def parameter_floor(fields: Mapping[str, object]) -> int:
    """At least how many weights an encoder of ``fields`` (:func:`infer_arch`'s, or a config's resolved
    :data:`ARCH_FIELDS` with ``img_size``) holds: the two linear layers of every block's MLP and the
    position embedding of the ``img_size`` grid."""
    dims = [int(d) for d in _per_stage(fields['embed_dims'])]
    hidden = [int(d * r) for d, r in zip(dims, _per_stage(fields['mlp_ratios']))]
    mlps = sum(2 * d * h * int(n) for d, h, n in zip(dims, hidden, _per_stage(fields['depths'])))
    img = _per_stage(fields.get('img_size', 0))
    stride = math.prod(int(p) for p in _per_stage(fields['patch_sizes']))
    return mlps + (int(img[0]) // stride) * (int(img[1]) // stride) * dims[2]


def check_weights_fill(floor: int, state: Mapping[str, Tensor], source: str, what: str) -> None:
    """Before a model of at least ``floor`` weights (``what``, e.g. the sizes a checkpoint's shapes claim) is
    built, raise :class:`CheckpointError` naming ``source`` unless the tensors of ``state`` store that many
    (:func:`stored_elements`): a small file cannot make a large model."""
    stored = stored_elements(state, source)
    if stored < floor:
        raise CheckpointError(f'{source}: {what} needs at least {floor} weights, its tensors store {stored}; '
                              f'refused before building it')
