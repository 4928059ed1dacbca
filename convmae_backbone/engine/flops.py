"""FLOPs of this package's operations in mmengine's counter.

mmengine's ``FlopAnalyzer`` and ``get_model_complexity_info`` (hence mmdet's and mmseg's
``tools/analysis_tools/get_flops.py``) trace the model and count the operators they have a handle for, one fused
multiply-add as one flop. Out of the box they have no handle for ``aten::scaled_dot_product_attention`` (every
stage-3 attention) and cannot look inside an autograd ``Function``, which the trace records as one
``prim::PythonOp``: :class:`~..models.utils.GeluLinear` (the second layer of every MLP while autograd records, as
in ``get_flops.py``). :func:`register_flop_handles` adds handles for them to the table every ``FlopAnalyzer``
starts from; ``import convmae_backbone`` calls it. The convolutions our layers call as functions
(``conv_as_linear``, the depthwise convolution) are traced as ``aten::linear`` / ``aten::_convolution`` and
counted (under the enclosing module, which is why mmengine lists e.g. ``mlp.fc2`` as never called).

Like mmengine's own handles these count matrix products and convolutions only (no softmax, GELU or masking). The
sparse pretraining path cannot be traced at all (its depthwise kernel takes the ``BlockMask`` object);
``tools/benchmark.py`` counts its FLOPs with ``torch.utils.flop_counter``.
"""
import math
from typing import Any, Dict, List

from mmengine.analysis import complexity_analysis
from mmengine.analysis.jit_handles import Handle, get_shape

from ..models.utils import GeluLinear


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``scaled_dot_product_attention(q, k, v)``, q (..., Lq, E), k (..., Lk, E), v (..., Lk, Ev): the two
    products q k^T and attn v, (...) * Lq * Lk * (E + Ev) multiply-adds."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    return math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def gelu_linear_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``GeluLinear(h, weight, bias)``, h (..., hidden), weight (out, hidden): the linear layer,
    (...) * out * hidden multiply-adds."""
    h, weight = get_shape(inputs[0]), get_shape(inputs[1])
    return math.prod(h[:-1]) * weight[0] * weight[1]


#: Operator name in the trace -> handle.
FLOP_HANDLES: Dict[str, Handle] = {
    'aten::scaled_dot_product_attention': sdpa_flop_jit,
    f'prim::PythonOp.{GeluLinear.__name__}': gelu_linear_flop_jit,
}


def register_flop_handles() -> None:
    """Add :data:`FLOP_HANDLES` to the handles every mmengine ``FlopAnalyzer`` is created with."""
    complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS.update(FLOP_HANDLES)
