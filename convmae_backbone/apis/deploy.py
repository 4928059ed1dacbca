"""Deployment of the ``ConvMAE`` backbone: ``torch.export`` and ONNX programs with dynamic height and width.

An exported program (and its ONNX file) takes images whose height and width are multiples of the backbone's
``patch_size`` (16), the sizes at which the backbone does not pad. :class:`PaddedBackbone` runs such a program on
any size the eager model accepts: it zero-pads the image to the next multiple of 16 and crops the maps back, as
the eager forward does itself, so its outputs equal the eager ones. Sizes outside the constraint raise
:class:`ExportSizeError` in this module's runners (``OnnxBackbone(pad=False)``, and beyond ``max_size``); the raw
programs fail loudly on them (a reshape error in torch and in onnxruntime), never with a wrong shape.

The batch size is fixed at export (the example batch); height and width are symbolic.
"""
import json
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from ..models.backbone import ConvMAE, crop_maps

#: ONNX metadata key holding what :class:`OnnxBackbone` needs to pad and crop (JSON).
ONNX_META_KEY = 'convmae_backbone'


class ExportSizeError(ValueError):
    """An image size an exported program does not take."""


def _least_size(model: ConvMAE) -> int:
    return (3 if model.h32 == 'fpn' else 2) * model.patch_size


def check_export_size(hw: Tuple[int, int], multiple: int, least: int, max_size: int) -> None:
    """Raise :class:`ExportSizeError` unless H and W are multiples of ``multiple`` in ``least .. max_size``."""
    h, w = int(hw[0]), int(hw[1])
    if h % multiple or w % multiple or min(h, w) < least or max(h, w) > max_size:
        raise ExportSizeError(
            f'the exported ConvMAE program takes H and W that are multiples of {multiple} in {least}..{max_size}, '
            f'got {h}x{w}; run it through convmae_backbone.apis.deploy.PaddedBackbone / OnnxBackbone (they pad and '
            'crop, as the eager model does) or pad the image yourself')


def _prepare(model: ConvMAE, batch: int, example_hw: Optional[Tuple[int, int]], max_size: int
             ) -> Tuple[Tensor, dict]:
    if not isinstance(model, ConvMAE) or model.out_type != 'featmaps':
        raise TypeError('export needs a ConvMAE backbone with out_type="featmaps"')
    if model.training:
        raise ValueError('export an eval-mode model (model.eval()): dropout paths and BatchNorm would be traced '
                         'in training mode')
    p = model.patch_size
    least = _least_size(model)
    example_hw = example_hw or (max(least, 5 * p), max(least, 6 * p))
    check_export_size(example_hw, p, least, max_size)
    # A symbolic count of patches times p: every stride then divides the size provably (no guard per size).
    h = Dim('h_patches', min=-(-least // p), max=max_size // p)
    w = Dim('w_patches', min=-(-least // p), max=max_size // p)
    x = torch.randn(batch, model.in_channels, *example_hw)
    return x, {'x': {2: p * h, 3: p * w}}


def _oblivious():
    # Size-oblivious reasoning: no guard on whether a symbolic size is 1 (contiguity checks), see
    # torch.fx.experimental._config.backed_size_oblivious.
    return torch.fx.experimental._config.patch(backed_size_oblivious=True)


def export_program(model: ConvMAE, batch: int = 1, example_hw: Optional[Tuple[int, int]] = None,
                   max_size: int = 4096) -> ExportedProgram:
    """``torch.export`` of an eval-mode ``model``: (batch, C, H, W) -> its maps, H and W symbolic multiples of
    ``patch_size`` from the least size the model accepts up to ``max_size``."""
    x, shapes = _prepare(model, batch, example_hw, max_size)
    with _oblivious():
        return torch.export.export(model, (x,), dynamic_shapes=shapes)


def export_onnx(model: ConvMAE, path: Union[str, Path], batch: int = 1,
                example_hw: Optional[Tuple[int, int]] = None, max_size: int = 4096,
                opset_version: Optional[int] = None) -> Path:
    """Write ``model`` as ONNX (``torch.onnx.export(dynamo=True)``, torch's recommended exporter) with symbolic
    H and W (multiples of ``patch_size``), input ``images``, outputs ``out0..``; the metadata needed to pad and
    crop (:class:`OnnxBackbone`) is stored under :data:`ONNX_META_KEY`. Returns the path."""
    import onnx
    x, shapes = _prepare(model, batch, example_hw, max_size)
    path = Path(path)
    with _oblivious():
        program = torch.onnx.export(model, (x,), dynamic_shapes=shapes, dynamo=True, input_names=['images'],
                                    output_names=[f'out{i}' for i in range(len(model.out_indices))],
                                    opset_version=opset_version, external_data=False)
    program.save(str(path))
    proto = onnx.load(str(path))
    # Keep only the graph's input and output shapes: onnxruntime infers the rest. The exporter's intermediate
    # annotations misled its buffer planning for the table variants ('Shape mismatch attempting to re-use buffer').
    del proto.graph.value_info[:]
    meta = dict(multiple=model.patch_size, least=_least_size(model), max_size=max_size,
                strides=list(model.out_strides), batch=batch)
    proto.metadata_props.add(key=ONNX_META_KEY, value=json.dumps(meta))
    onnx.save(proto, str(path))
    return path


class PaddedBackbone(nn.Module):
    """Run a program taking H, W multiples of ``multiple`` on any (B, C, H, W) with H, W >= ``least``: zero-pad
    to the next multiple, run, crop each map to ceil(H/s) x ceil(W/s) (``strides``), as ``ConvMAE.forward``.

    ``program``: e.g. ``export_program(model).module()``.
    """

    def __init__(self, program: Callable[[Tensor], Sequence[Tensor]], multiple: int, strides: Sequence[int],
                 least: int = 32, max_size: int = 4096):
        super().__init__()
        self.program, self.multiple, self.strides = program, multiple, tuple(strides)
        self.least, self.max_size = least, max_size

    @classmethod
    def export(cls, model: ConvMAE, **kwargs) -> 'PaddedBackbone':
        """:func:`export_program` of ``model`` (keyword arguments passed on), wrapped."""
        max_size = kwargs.get('max_size', 4096)
        return cls(export_program(model, **kwargs).module(), model.patch_size, model.out_strides,
                   _least_size(model), max_size)

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """(B, C, H, W) -> the maps, as the eager backbone returns them."""
        h, w = x.shape[2], x.shape[3]
        m = self.multiple
        hp, wp = -(-h // m) * m, -(-w // m) * m
        if min(h, w) < self.least:
            raise ExportSizeError(f'ConvMAE expects H and W of at least {self.least} pixels, got {h}x{w}')
        check_export_size((hp, wp), m, self.least, self.max_size)
        maps = self.program(F.pad(x, (0, wp - w, 0, hp - h)))
        return crop_maps(maps, self.strides, (h, w))


class OnnxBackbone:
    """An ONNX file from :func:`export_onnx` in onnxruntime (CPU), on any size the eager model accepts (padded to
    the export multiple and cropped back, as :class:`PaddedBackbone`); ``pad=False`` runs only the sizes the
    file takes and raises :class:`ExportSizeError` for others."""

    def __init__(self, path: Union[str, Path], pad: bool = True):
        import onnxruntime as ort
        self.session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
        meta = self.session.get_modelmeta().custom_metadata_map
        if ONNX_META_KEY not in meta:
            raise ValueError(f'{path} was not written by convmae_backbone.apis.deploy.export_onnx (no {ONNX_META_KEY!r} '
                             'metadata)')
        self.meta = json.loads(meta[ONNX_META_KEY])
        self.pad = pad

    def __call__(self, images: Union[np.ndarray, Tensor]) -> Tuple[np.ndarray, ...]:
        """(B, C, H, W) float32 -> the maps as numpy arrays."""
        x = torch.as_tensor(np.asarray(images, dtype=np.float32))
        meta = self.meta
        if x.shape[0] != meta['batch']:
            raise ExportSizeError(f'the ONNX program was exported for batch {meta["batch"]}, got {x.shape[0]}')
        if not self.pad:
            check_export_size(x.shape[2:], meta['multiple'], meta['least'], meta['max_size'])

        def run(padded: Tensor) -> Tuple[Tensor, ...]:
            outs = self.session.run(None, {'images': padded.numpy()})
            return tuple(torch.from_numpy(o) for o in outs)

        runner = PaddedBackbone(run, meta['multiple'], meta['strides'], meta['least'], meta['max_size'])
        return tuple(o.numpy() for o in runner(x))
