"""Reference formulations of the official code, kept for the parity tests and the benchmark (never used by the
models themselves): explicit softmax(QK^T)V attention, as the official ``Attention`` computes it."""
from typing import Optional, Tuple

from torch import Tensor, nn

from .attention import Attention, RelativePositionBias


class ExplicitAttention(Attention):
    """:class:`Attention` computing softmax(q k^T * scale + mask) v with the full (N, N) attention matrix."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, hw: Optional[Tuple[int, int]], pad: Optional[Tensor],
               shared: Optional[RelativePositionBias] = None) -> Tensor:
        attn = (q * self.scale) @ k.transpose(-2, -1)
        mask = self.attn_mask(q, hw, pad, shared=shared)
        if mask is not None:
            attn = attn + mask
        return attn.softmax(dim=-1) @ v


def with_explicit_attention(model: nn.Module) -> nn.Module:
    """``model`` with every :class:`Attention` replaced by an :class:`ExplicitAttention` holding the same
    parameters (shared, not copied). Returns ``model``."""
    for name, module in list(model.named_modules()):
        if type(module) is Attention and name:
            explicit = ExplicitAttention.__new__(ExplicitAttention)
            explicit.__dict__.update(module.__dict__)  # same submodules, parameters and settings
            parent, _, attr = name.rpartition('.')
            setattr(model.get_submodule(parent), attr, explicit)
    return model

