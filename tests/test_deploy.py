"""torch.compile, torch.export and ONNX of every backbone variant (tiny models), compared with eager."""
import numpy as np
import pytest
import torch

from convmae_backbone.apis import deploy
from convmae_backbone.models import ConvMAE
from convmae_backbone.models.attention import Attention
from convmae_backbone.testing import TINY_BACKBONE

# window 2 tokens on a 64-pixel (4x4-token) grid: several windows, padded ones at sizes that are not 32k
VARIANTS = {
    'default': dict(),
    'windowed_decomposed': dict(window_size=2, global_attn_indexes=(1,), rel_pos_bias='decomposed'),
    'official_det': dict(window_size=2, global_attn_indexes=(1,), rel_pos_bias='shared', freeze_pos_embed=True),
    'official_seg': dict(rel_pos_bias='per_block', layer_scale_init_value=1.0, norm_eps=1e-5, h32='fpn'),
    # zero-padded windows of 3 tokens (padding at most sizes), a 3x3 position embedding resized at every forward
    'official_vitdet': dict(window_size=3, global_attn_indexes=(1,), rel_pos_bias='decomposed', window_padding='zeros',
                            pos_embed_grid=3, conv_norm_eps=1e-6),
}
# sizes that are multiples of 16 and sizes that are not (odd window counts, odd H/32 maps)
SIZES = [(64, 64), (80, 112), (333, 517), (50, 70)]


def build(name: str) -> ConvMAE:
    """A tiny eval-mode variant with non-zero relative position tables (they start at zero)."""
    torch.manual_seed(0)
    model = ConvMAE(**TINY_BACKBONE, out_indices=(0, 1, 2, 3), **VARIANTS[name])
    model.init_weights()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if 'rel_pos' in key or 'relative_position' in key:
                param.normal_(0, 0.5)
    return model.eval()


@pytest.fixture
def chunked(monkeypatch):
    """Force the row-chunked attention (and its shared bias buffer without autograd) at tiny sizes."""
    monkeypatch.setattr(Attention, 'max_bias_numel', 256)


def _max_diff(outs, refs) -> float:
    assert [tuple(o.shape) for o in outs] == [tuple(r.shape) for r in refs]
    return max(float((torch.as_tensor(o) - r).detach().abs().max()) for o, r in zip(outs, refs))


@pytest.mark.parametrize('name', list(VARIANTS))
def test_compile_inference_has_no_graph_break(name, chunked):
    model = build(name)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(torch.randn(1, 3, 80, 112))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compile_training_equals_eager(chunked):
    """Forward + backward through torch.compile (windows, decomposed tables, chunked attention): no graph break,
    same outputs and gradients."""
    model = build('windowed_decomposed').train()
    x = torch.randn(2, 3, 80, 112)
    refs = model(x)
    sum((r * r).sum() for r in refs).backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    outs = torch.compile(model, backend='aot_eager')(x)
    sum((o * o).sum() for o in outs).backward()
    assert not torch._dynamo.utils.counters['graph_break'], dict(torch._dynamo.utils.counters['graph_break'])
    assert _max_diff(outs, refs) < 1e-5
    assert len(ref_grads) > 20
    for key, param in model.named_parameters():
        if key in ref_grads:
            err = (param.grad - ref_grads[key]).abs().max() / ref_grads[key].abs().max()
            assert err < 1e-4, key


def test_inductor_compiles_chunked_decomposed_bias_without_grad(chunked):
    """The shared bias buffer of the chunked decomposed attention failed in inductor ('Cannot view a tensor');
    compiled, the chunks allocate their own bias, with the same result."""
    torch.manual_seed(0)
    attn = Attention(16, 2, rel_pos='decomposed', rel_pos_size=(4, 4)).eval()
    with torch.no_grad():
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
        x = torch.randn(2, 24, 16)
        ref = attn(x, (4, 6))
        torch._dynamo.reset()
        out = torch.compile(attn)(x, (4, 6))
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize('name', list(VARIANTS))
def test_exported_program_equals_eager_at_any_size(name):
    model = build(name)
    program = deploy.export_program(model)
    padded = deploy.PaddedBackbone(program.module(), model.patch_size, model.out_strides)
    with torch.no_grad():
        for size in SIZES:
            x = torch.randn(1, 3, *size)
            refs = model(x)
            if size[0] % 16 == 0 and size[1] % 16 == 0:
                assert _max_diff(program.module()(x), refs) < 1e-5
            assert _max_diff(padded(x), refs) < 1e-5, size


def test_export_size_constraint_is_named():
    model = build('official_seg')  # needs 48 pixels (fpn)
    padded = deploy.PaddedBackbone.export(model)
    with pytest.raises(deploy.ExportSizeError, match='at least 48'):
        padded(torch.randn(1, 3, 40, 64))
    with pytest.raises(deploy.ExportSizeError, match='multiples of 16 in 48..4096, got 4112x64'):
        padded(torch.randn(1, 3, 4100, 64))
    with pytest.raises(ValueError, match='eval-mode'):
        deploy.export_program(model.train())


@pytest.mark.parametrize('name', list(VARIANTS))
def test_onnx_matches_pytorch_at_any_size(name, tmp_path):
    model = build(name)
    path = deploy.export_onnx(model, tmp_path / f'{name}.onnx')
    runner = deploy.OnnxBackbone(path)
    strict = deploy.OnnxBackbone(path, pad=False)
    with torch.no_grad():
        for size in SIZES:
            x = torch.randn(1, 3, *size)
            refs = model(x)
            assert _max_diff(runner(x.numpy()), refs) < 1e-4, size  # shapes checked first: ceil(H/s), never floor
            if size[0] % 16 or size[1] % 16:
                with pytest.raises(deploy.ExportSizeError, match='multiples of 16'):
                    strict(x.numpy())
            else:
                assert _max_diff(strict(x.numpy()), refs) < 1e-4
    c1, c2, c3 = TINY_BACKBONE['embed_dims']
    np.testing.assert_equal([o.shape for o in runner(np.zeros((1, 3, 333, 517), np.float32))],
                            [(1, c1, 84, 130), (1, c2, 42, 65), (1, c3, 21, 33),
                             (1, c3, 10, 16) if name == 'official_seg' else (1, c3, 11, 17)])
