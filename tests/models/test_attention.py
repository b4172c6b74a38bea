"""attn_impl="flex" (FlexAttention, the CPB bias and the shift mask as a score_mod) against the plain path.

A two-stage 32px/window-4 model covers what a block meets: shifted windows, four per image (stage 1), and a
window that is the whole feature map, unshifted (stage 2); 2 and 4 heads, batch 2. Each attention shape is
one compiled kernel (about 20 s each on a loaded 2-core CPU), hence the small number of shapes.
torch's FlexAttention has no CPU backward, so on CPU the model is compared in inference and the score_mod's
gradient through the captured CPB table is checked under aot_eager (the joint graph that the GPU kernel
compiles); whole-model gradients are compared on CUDA (scripts/bench/gpu/run_all.sh runs this file there).
"""
import pytest
import torch

from models.swinv2 import SwinTransformerV2, flex_score_mod, relative_position_index, region_mask, shift_regions
from swinv2_cases import MICRO, randomize_

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no CPU backward")
TWO_STAGES = {**MICRO, "img_size": 32, "embed_dim": 32, "depths": [2, 2], "num_heads": [2, 4],
              "pretrained_window_sizes": [0, 0]}  # head dim 16: FlexAttention's GPU kernel wants >= 16


def _plain_and_flex(device: str, sequential: bool):
    """The same randomised weights in both paths; sequential attention (3-window chunks: 3, 3, 2 of the 8
    windows) in stage 1 only, so that stage 2 reuses the kernel of the batched model."""
    torch.manual_seed(0)
    cfg = {**TWO_STAGES, "sequential_attn": [sequential, False]}
    plain = randomize_(SwinTransformerV2(num_classes=10, **{**cfg, "attn_impl": "plain"}))
    flex = SwinTransformerV2(num_classes=10, **{**cfg, "attn_impl": "flex"})
    flex.load_state_dict(plain.state_dict())
    return plain.to(device).eval(), flex.to(device).eval(), torch.randn(2, 3, 32, 32, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sequential", [False, True])
def test_flex_forward_equals_plain(device, sequential):
    plain, flex, x = _plain_and_flex(device, sequential)
    assert [b.shift_size for b in flex.blocks()] == [0, 2, 0, 0]
    with torch.no_grad():
        torch.testing.assert_close(flex.forward_features(x), plain.forward_features(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_flex_bf16_autocast_is_as_close_to_fp32_as_plain(device):
    """The shifted block: one more compiled kernel, not one per block."""
    plain, flex, _ = _plain_and_flex(device, sequential=False)
    block, flex_block = plain.layers[0].blocks[1], flex.layers[0].blocks[1]
    x = torch.randn(2, 64, 32, device=device)
    with torch.no_grad():
        expected = block(x)
        with torch.autocast(device, dtype=torch.bfloat16):
            flex_error = (flex_block(x).float() - expected).abs().max()
            plain_error = (block(x).float() - expected).abs().max()
    assert flex_error < 0.05 and flex_error < 2 * plain_error, (flex_error, plain_error)


@pytest.mark.parametrize("shifted", [False, True])
def test_score_mod_gradient_reaches_the_cpb_table(shifted):
    """One window attention call, (2 images x 4 windows, 2 heads, 16 tokens): outputs and the gradient of the
    captured (heads, 49) table against the gathered (heads, 16, 16) bias plus region mask of the plain path."""
    from torch.nn.attention.flex_attention import flex_attention
    torch.manual_seed(0)
    window, heads, images = 4, 2, 2
    regions = shift_regions(8, 8, window, window // 2) if shifted else None
    windows, N = 4, window * window
    q, k, v = (torch.randn(images * windows, heads, N, 8) for _ in range(3))
    table = (torch.rand(heads, (2 * window - 1) ** 2) * 16).requires_grad_()
    compiled = torch.compile(flex_attention, backend="aot_eager", dynamic=False)
    out = compiled(q, k, v, score_mod=flex_score_mod(table, window, regions), scale=1.0)
    bias = table[:, relative_position_index(window).view(-1)].view(heads, N, N).repeat(windows, 1, 1)
    if regions is not None:
        bias = bias + region_mask(regions).repeat_interleave(heads, 0)
    flat = [t.reshape(images, windows * heads, N, -1) for t in (q, k, v)]
    expected = (torch.softmax(flat[0] @ flat[1].transpose(-2, -1) + bias, -1) @ flat[2]).view_as(out)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    weights = torch.randn_like(out)
    (flex_grad,) = torch.autograd.grad(out, table, weights)
    (plain_grad,) = torch.autograd.grad(expected, table, weights)
    assert plain_grad.abs().min() > 0  # every offset gets a gradient
    torch.testing.assert_close(flex_grad, plain_grad, rtol=1e-5, atol=1e-5 * plain_grad.abs().max().item())


def test_flex_refuses_to_train_on_cpu():
    _, flex, x = _plain_and_flex("cpu", sequential=False)
    with pytest.raises(NotImplementedError, match="attn_impl='flex' cannot train on CPU"):
        flex(x)


def _output_and_grads(model, x, dtype):
    x = x.clone().requires_grad_()
    model.zero_grad()
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model.forward_features(x)
    (out.float() * torch.linspace(-1, 1, out.shape[-1], device=x.device)).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out.float(), {"input": x.grad, **grads}


@cuda_only
@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_flex_gradients_equal_plain_on_cuda(sequential, dtype):
    """Input, qkv, logit_scale and cpb_mlp gradients (all of them), relative to each gradient's largest entry:
    1e-5 in fp32; in bf16 autocast the flex model's distance to the plain fp32 model at most twice plain bf16's."""
    plain, flex, x = _plain_and_flex("cuda", sequential)
    plain.train(), flex.train()
    out, grads = _output_and_grads(plain, x, None)
    flex_out, flex_grads = _output_and_grads(flex, x, dtype)
    assert any("cpb_mlp" in name for name in flex_grads) and all(g is not None for g in flex_grads.values())
    if dtype is None:
        torch.testing.assert_close(flex_out, out, rtol=0, atol=1e-5)
        for name, g in grads.items():
            torch.testing.assert_close(flex_grads[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item(), msg=name)
        return
    low_out, low_grads = _output_and_grads(plain, x, dtype)

    def error(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()
    assert error(flex_out, out) <= 2 * error(low_out, out) + 1e-3
    for name, g in grads.items():
        assert error(flex_grads[name], g) <= 2 * error(low_grads[name], g) + 1e-3, name
