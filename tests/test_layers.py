"""The fast layers compute torch's layers: outputs and both gradients, fp32 and bf16, both layouts."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcgan.layers import (
    ImageConv2d,
    ImageTranspose2d,
    LogitConv2d,
    ProjectTranspose2d,
    WideConv2d,
    WideTranspose2d,
    im2col_s2k4,
    phase_transpose,
    scratch,
    weight_grad_s2k4,
)
from dcgan.models import Discriminator, Generator, ImageNetDiscriminator32

LAYOUTS = (torch.contiguous_format, torch.channels_last)


def pair(fast_cls: type[nn.Module], torch_cls: type[nn.Module], *args: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    fast = fast_cls(*args, bias=False)
    ref = torch_cls(*args, bias=False)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def outputs_and_grads(layer: nn.Module, x: torch.Tensor, gy_seed: int, autocast: bool) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(gy_seed))
    y.float().backward(gy)
    return [y.float(), x.grad.float(), layer.weight.grad.float()]


CASES = [  # (fast, torch, constructor args, input shape)
    (ProjectTranspose2d, nn.ConvTranspose2d, (100, 32, 4, 1, 0), (6, 100, 1, 1)),
    (LogitConv2d, nn.Conv2d, (32, 1, 4, 1, 0), (6, 32, 4, 4)),
    (ImageTranspose2d, nn.ConvTranspose2d, (16, 3, 4, 2, 1), (6, 16, 8, 8)),
    (ImageTranspose2d, nn.ConvTranspose2d, (16, 3, 4, 2, 1), (6, 16, 5, 7)),
    (ImageConv2d, nn.Conv2d, (3, 16, 4, 2, 1), (6, 3, 16, 16)),
    (ImageConv2d, nn.Conv2d, (3, 16, 4, 2, 1), (6, 3, 10, 14)),
    (WideConv2d, nn.Conv2d, (16, 24, 4, 2, 1), (6, 16, 8, 8)),  # 4x4 out: matmul weight gradient in bf16
    (WideConv2d, nn.Conv2d, (16, 24, 4, 2, 1), (3, 16, 32, 32)),  # 16x16 out: oneDNN's
    (WideTranspose2d, nn.ConvTranspose2d, (24, 16, 4, 2, 1), (6, 24, 4, 4)),
    (WideTranspose2d, nn.ConvTranspose2d, (24, 16, 4, 2, 1), (6, 24, 5, 3)),
    (WideTranspose2d, nn.ConvTranspose2d, (24, 16, 4, 2, 1), (3, 24, 16, 16)),  # 16x16 in: oneDNN's
]


@pytest.mark.parametrize("fast_cls,torch_cls,args,shape", CASES)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "channels_last"])
def test_fast_layer_matches_torch_in_fp32(fast_cls, torch_cls, args, shape, fmt) -> None:  # noqa: ANN001
    fast, ref = pair(fast_cls, torch_cls, *args)
    fast.to(memory_format=fmt)
    ref.to(memory_format=fmt)
    x = torch.randn(shape).contiguous(memory_format=fmt)
    for a, b in zip(outputs_and_grads(fast, x, 1, False), outputs_and_grads(ref, x, 1, False), strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fast_cls,torch_cls,args,shape", CASES)
def test_fast_layer_matches_torch_under_bf16_autocast(fast_cls, torch_cls, args, shape) -> None:  # noqa: ANN001
    """bf16 products either way: agreement to bf16 rounding, gradients in the weight's float32."""
    fast, ref = pair(fast_cls, torch_cls, *args)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    for m in (fast, ref):
        m.to(memory_format=torch.channels_last)
    got, want = outputs_and_grads(fast, x, 2, True), outputs_and_grads(ref, x, 2, True)
    assert fast.weight.grad.dtype == torch.float32
    for a, b in zip(got, want, strict=True):
        scale = b.abs().max()
        assert (a - b).abs().max() <= 0.02 * scale, (a - b).abs().max() / scale


def test_phase_transpose_is_conv_transpose() -> None:
    x, w = torch.randn(4, 8, 6, 6, dtype=torch.float64), torch.randn(8, 5, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(phase_transpose(x, w), F.conv_transpose2d(x, w, stride=2, padding=1))


@pytest.mark.parametrize("shape", [(4, 8, 8, 8), (3, 8, 10, 6), (2, 8, 7, 9)])
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "channels_last"])
def test_weight_grad_s2k4_is_the_convolutions_weight_gradient(shape, fmt) -> None:  # noqa: ANN001
    """For a convolution and, roles swapped, for a transposed one (float64: exact to rounding)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, dtype=torch.float64, generator=g).contiguous(memory_format=fmt)
    w = torch.randn(5, shape[1], 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    y = F.conv2d(x, w, stride=2, padding=1)
    gy = torch.randn(y.shape, dtype=torch.float64, generator=g).contiguous(memory_format=fmt)
    (want,) = torch.autograd.grad(y, w, gy)
    torch.testing.assert_close(weight_grad_s2k4(gy, x), want)
    wt = torch.randn(5, shape[1], 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    yt = F.conv_transpose2d(gy, wt, stride=2, padding=1)  # [.., 2h, 2w]: x's size only when it is even
    gyt = torch.randn(yt.shape, dtype=torch.float64, generator=g)
    (want_t,) = torch.autograd.grad(yt, wt, gyt)
    torch.testing.assert_close(weight_grad_s2k4(gy, gyt), want_t)


@pytest.mark.parametrize("shape", [(3, 8, 8, 8), (2, 5, 10, 6), (2, 4, 7, 9)])
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "channels_last"])
def test_im2col_s2k4_copies_unfolds_patches(shape, fmt) -> None:  # noqa: ANN001
    """Bit for bit the patches `unfold` reads (zeros at the border), reordered to (kh, kw, c) columns."""
    x = torch.randn(shape).to(torch.bfloat16).contiguous(memory_format=fmt)
    n, c, h, w = shape
    ho, wo = (h - 2) // 2 + 1, (w - 2) // 2 + 1
    want = F.unfold(x.float(), 4, padding=1, stride=2).view(n, c, 16, ho * wo).permute(0, 3, 2, 1)
    assert torch.equal(im2col_s2k4(x, ho, wo).float(), want.reshape(n * ho * wo, 16 * c))


def test_scratch_is_reused_per_key_and_thread_and_bounded() -> None:
    """One allocation per (name, shape, dtype, device) and thread; the oldest goes beyond the bound."""
    import dcgan.layers as layers

    like = torch.zeros(1, dtype=torch.bfloat16)
    a = scratch("t.a", (4, 5), like)
    assert scratch("t.a", (4, 5), like) is a and a.is_contiguous() and a.dtype == torch.bfloat16
    assert scratch("t.a", (4, 6), like) is not a and scratch("t.b", (4, 5), like) is not a
    assert scratch("t.a", (4, 5), torch.zeros(1)) is not a  # float32: another tensor
    other: list[torch.Tensor] = []
    thread = threading.Thread(target=lambda: other.append(scratch("t.a", (4, 5), like)))
    thread.start()
    thread.join()
    assert other[0] is not a
    for i in range(layers.SCRATCH_TENSORS):
        scratch("t.fill", (i + 1,), like)
    assert len(layers._SCRATCH.tensors) == layers.SCRATCH_TENSORS
    assert scratch("t.a", (4, 5), like) is not a  # dropped as the oldest


def test_repeated_patch_matrices_reuse_their_memory() -> None:
    """The step's patch matrices are scratch: the second call writes the first one's memory."""
    x = torch.randn(2, 8, 8, 8).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    first = im2col_s2k4(x, 4, 4)
    ptr, want = first.data_ptr(), first.clone()
    second = im2col_s2k4(x * 2, 4, 4)
    assert second.data_ptr() == ptr and torch.equal(second, want * 2)


def test_uncovered_shapes_fall_back_to_torch() -> None:
    """Other strides, paddings or input sizes run torch's own layer (same numbers, no error)."""
    for layer, x in (
        (ImageConv2d(3, 8, 4, 2, 1, bias=False), torch.randn(2, 3, 9, 9)),  # odd size
        (WideConv2d(8, 4, 4, 2, 1, bias=False), torch.randn(2, 8, 9, 9)),  # odd size
        (WideTranspose2d(8, 4, 3, 2, 1, bias=False), torch.randn(2, 8, 5, 5)),  # 3x3 kernel
        (ImageTranspose2d(8, 3, 4, 1, 0, bias=False), torch.randn(2, 8, 5, 5)),  # stride 1
        (LogitConv2d(8, 1, 4, 1, 0, bias=False), torch.randn(2, 8, 6, 6)),  # not a single pixel out
        (ProjectTranspose2d(8, 4, 4, 1, 0, bias=False), torch.randn(2, 8, 2, 2)),  # not 1x1 in
    ):
        base = nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.ConvTranspose2d
        torch.testing.assert_close(layer(x), base.forward(layer, x))


def test_models_with_fast_layers_share_state_dicts_and_outputs() -> None:
    """Checkpoints load either way; the same weights give the same images and logits."""
    for plain, fast, x in (
        (Generator(32, ngf=8), Generator(32, ngf=8, fast_layers=True), torch.randn(3, 100)),
        (Discriminator(64, ndf=8), Discriminator(64, ndf=8, fast_layers=True), torch.randn(3, 3, 64, 64)),
        (ImageNetDiscriminator32(), ImageNetDiscriminator32(fast_layers=True), torch.randn(3, 3, 32, 32)),
    ):
        assert plain.state_dict().keys() == fast.state_dict().keys()
        fast.load_state_dict(plain.state_dict())
        plain.eval(), fast.eval()
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)
    assert isinstance(Generator(32, fast_layers=True).main[0], ProjectTranspose2d)
    assert isinstance(Generator(32, fast_layers=True).main[3], WideTranspose2d)
    assert isinstance(Discriminator(32, fast_layers=True).main[2], WideConv2d)
    assert type(Generator(32).main[0]) is nn.ConvTranspose2d
