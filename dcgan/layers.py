"""The DCGAN's layers in forms that compute the same function faster on the CPU.

oneDNN runs the wide stride-2 convolutions of G and D forward near this CPU's bf16 peak, but
not everything else (docs/benchmarks.md, 32 px, batch 128): the layers at the edges of the two
networks take many times their FLOPs (G's projection of z (1x1 to 4x4) and D's logit (4x4 to
1x1) are matrix products run as convolutions with one input or one output pixel, and a
transposed convolution to 3 channels (G's image, and the input gradient of D's first layer)
runs at a tenth of the peak), and the weight gradients of the wide layers run on an older bf16
kernel that loses most when the machine is busy. Here they are:

- `ProjectTranspose2d`, `LogitConv2d`: one matmul each.
- `ImageTranspose2d`: the stride-2 4x4 transposed convolution as one 2x2 convolution to the
  four output phases (4 x C_out channels), interleaved (`phase_transpose`).
- `ImageConv2d`: D's first convolution, its input gradient computed the same way.
- `WideConv2d`, `WideTranspose2d`: the inner stride-2 layers, their bf16 weight gradient as
  one matmul over the layer's 4x4 patches (`weight_grad_s2k4`).

Each subclasses the torch layer (same parameters, same state dict, same initialisation) and
falls back to it for shapes it does not cover. The models use them when built with
`fast_layers=True`; the textbook loop keeps torch's layers.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def layout(t: torch.Tensor) -> torch.memory_format:
    """channels_last when `t` is stored so, else contiguous (a 4-D tensor's own layout)."""
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _compute_dtype(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both in autocast's dtype where autocast is on: custom autograd functions are not autocast."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return x.to(dtype), w.to(dtype)
    return x, w


def phase_transpose(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`conv_transpose2d(x, w, stride=2, padding=1)` for a 4x4 kernel `w` [C_in, C_out, 4, 4].

    Output pixel (2i + py, 2j + px) sees input pixels i - 1 + py .. i + py (and likewise in j)
    through the kernel taps (3, 1) for parity 0 and (2, 0) for parity 1, so a 2x2 convolution
    with padding 1 to 4 x C_out channels computes all four parities at once; they are then
    interleaved into the output. About the same FLOPs ((h + 1) x (w + 1) positions computed per
    parity for h x w used), but 4 x C_out output channels keep the CPU's vector units busy.
    """
    n, _, h, wd = x.shape
    c_in, c_out = w.shape[:2]
    # taps of parity p at window offset a: kernel index 3 - (p + 2a), i.e. the flipped kernel's p + 2a
    taps = w.flip(2, 3).reshape(c_in, c_out, 2, 2, 2, 2)  # [c_in, c_out, a, py, a', px]
    phase_w = taps.permute(3, 5, 1, 0, 2, 4).reshape(4 * c_out, c_in, 2, 2)
    fmt = layout(x)
    y = F.conv2d(x, phase_w.contiguous(memory_format=fmt), padding=1).unflatten(1, (2, 2, c_out))
    out = torch.empty((n, c_out, 2 * h, 2 * wd), dtype=y.dtype, device=y.device, memory_format=fmt)
    for py in (0, 1):
        for px in (0, 1):
            out[:, :, py::2, px::2] = y[:, py, px, :, py : py + h, px : px + wd]
    return out


def _stride2_k4(layer: nn.Conv2d | nn.ConvTranspose2d) -> bool:
    return (
        layer.kernel_size == (4, 4)
        and layer.stride == (2, 2)
        and layer.padding == (1, 1)
        and layer.dilation == (1, 1)
        and layer.groups == 1
        and layer.bias is None
        and getattr(layer, "output_padding", (0, 0)) == (0, 0)
    )


def _even(x: torch.Tensor) -> bool:
    """Even height and width: the parity and patch forms cover exactly these input sizes."""
    return x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0


_SCRATCH = threading.local()
SCRATCH_TENSORS = 8
"""Scratch tensors kept per thread (a model's distinct patch shapes: 4 at 32 and 64 px)."""


def scratch(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of `shape`, reused by every call with the same name, shape, dtype and device.

    The patch matrices are tens of MB, allocated and freed several times a step; freed, glibc hands
    them back to the kernel, and faulting them in again cost about 20 huge-page and 1,500 small
    page faults a step (docs/benchmarks.md). Its contents are the caller's until the next call
    with the same key in the same thread; the oldest of more than `SCRATCH_TENSORS` is dropped.
    """
    tensors: dict = _SCRATCH.__dict__.setdefault("tensors", {})
    key = (name, shape, like.dtype, like.device)
    if key not in tensors:
        if len(tensors) >= SCRATCH_TENSORS:
            tensors.pop(next(iter(tensors)))
        tensors[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return tensors[key]


def im2col_s2k4(x: torch.Tensor, ho: int, wo: int) -> torch.Tensor:
    """The 4x4 patches a stride-2, padding-1 convolution of `x` [N, C, H, W] reads: [N*ho*wo, 16*C].

    Columns in (kh, kw, c) order. The input is padded channels last (only the one-pixel border
    is zeroed), and the patches are one overlapping strided view of it, copied once. Both live in
    `scratch` tensors: the result is valid until the next call for the same shapes in this thread.
    """
    n, c, h, w = x.shape
    padded = scratch("im2col_s2k4.padded", (n, h + 2, w + 2, c), x)
    padded[:, 1:-1, 1:-1] = x.permute(0, 2, 3, 1)
    for border in (padded[:, 0], padded[:, -1], padded[:, 1:-1, 0], padded[:, 1:-1, -1]):
        border.zero_()
    s_n, s_h, s_w, s_c = padded.stride()
    patches = padded.as_strided((n, ho, wo, 4, 4, c), (s_n, 2 * s_h, 2 * s_w, s_h, s_w, s_c))
    cols = scratch("im2col_s2k4.cols", (n, ho, wo, 4, 4, c), x)
    cols.copy_(patches)
    return cols.view(n * ho * wo, 16 * c)


def weight_grad_s2k4(gy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The weight gradient [O, C, 4, 4] of `conv2d(x, w, stride=2, padding=1)` given its output gradient `gy`.

    One [O, N*ho*wo] x [N*ho*wo, 16*C] matmul over the patches: the CPU's bf16 matmul runs near
    its peak where oneDNN's bf16 backward-weights convolution does not (bench/fast_layers.py).
    A transposed convolution's weight gradient [C_in, C_out, 4, 4] is this with the roles swapped:
    `weight_grad_s2k4(x, gy)`. Not differentiable itself (the patches are scratch).
    """
    n, o, ho, wo = gy.shape
    c = x.shape[1]
    g = gy.permute(0, 2, 3, 1).reshape(n * ho * wo, o)
    with torch.no_grad():
        gw = torch.mm(g.t(), im2col_s2k4(x, ho, wo))  # [O, 16*C] in (kh, kw, c) order
    return gw.view(o, 4, 4, c).permute(0, 3, 1, 2)


def _conv_grads(
    gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, transposed: bool, mask: tuple[bool, bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    gy = gy.contiguous(memory_format=layout(x))
    gx, gw, _ = torch.ops.aten.convolution_backward(
        gy, x, w, None, (2, 2), (1, 1), (1, 1), transposed, (0, 0), 1, (mask[0], mask[1], False)
    )
    return gx, gw


class _PhaseTranspose(torch.autograd.Function):
    """Forward by phases; backward by oneDNN, which runs both gradients of this layer well."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x, w)
        return phase_transpose(x, w)

    @staticmethod
    def backward(ctx, gy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # noqa: ANN001
        x, w = ctx.saved_tensors
        return _conv_grads(gy, x, w, True, ctx.needs_input_grad[:2])


class _ImageConv(torch.autograd.Function):
    """Forward and weight gradient by oneDNN; the input gradient by phases."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x, w)
        return F.conv2d(x, w, stride=2, padding=1)

    @staticmethod
    def backward(ctx, gy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # noqa: ANN001
        x, w = ctx.saved_tensors
        gx = phase_transpose(gy, w) if ctx.needs_input_grad[0] else None
        gw = _conv_grads(gy, x, w, False, (False, True))[1] if ctx.needs_input_grad[1] else None
        return gx, gw


MATMUL_WGRAD_MAX_PIXELS = 64
"""The matmul weight gradient pays where the convolution's output map is at most 8x8: its patch
copy grows with the map, and at 16x16 it costs more than oneDNN's kernel loses (bench/fast_layers.py)."""


def _matmul_weight_grad(x: torch.Tensor, small: torch.Tensor) -> bool:
    """bf16 and a small map only: in fp32 oneDNN's weight gradient is as fast and copies nothing."""
    return x.dtype == torch.bfloat16 and small.shape[-2] * small.shape[-1] <= MATMUL_WGRAD_MAX_PIXELS


class _Wide(torch.autograd.Function):
    """Forward and input gradient by oneDNN; the bf16 weight gradient of a small map by one matmul."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, transposed: bool) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x, w)
        ctx.transposed = transposed
        conv = F.conv_transpose2d if transposed else F.conv2d
        return conv(x, w, stride=2, padding=1)

    @staticmethod
    @once_differentiable  # the patch matrix is scratch: nothing may keep it for a second derivative
    def backward(ctx, gy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:  # noqa: ANN001
        x, w = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        small, big = (x, gy) if ctx.transposed else (gy, x)  # a transposed convolution's roles are swapped
        if not (need_w and _matmul_weight_grad(x, small)):
            return (*_conv_grads(gy, x, w, ctx.transposed, (need_x, need_w)), None)
        gx = _conv_grads(gy, x, w, ctx.transposed, (True, False))[0] if need_x else None
        return gx, weight_grad_s2k4(small, big).to(memory_format=layout(w)), None


class ProjectTranspose2d(nn.ConvTranspose2d):
    """G's first layer (z as a 1x1 map to a k x k map): one [N, nz] x [nz, k*k*C] matmul."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-2:] != (1, 1) or self.stride != (1, 1) or self.padding != (0, 0) or self.bias is not None:
            return super().forward(z)
        w = self.weight  # [nz, C, kh, kw]
        nz, c, kh, kw = w.shape
        if layout(w) == torch.channels_last:
            out = torch.matmul(z.flatten(1), w.permute(0, 2, 3, 1).reshape(nz, -1))
            return out.view(z.shape[0], kh, kw, c).permute(0, 3, 1, 2)
        return torch.matmul(z.flatten(1), w.flatten(1)).view(z.shape[0], c, kh, kw)


class LogitConv2d(nn.Conv2d):
    """D's last layer (a k x k map to one logit): one [N, k*k*C] x [k*k*C, O] matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != self.kernel_size or self.stride != (1, 1) or self.padding != (0, 0) or self.bias is not None:
            return super().forward(x)
        w = self.weight  # [O, C, kh, kw]
        if layout(x) == torch.channels_last:  # flatten both in (h, w, c) order: views, no copy
            x2, w2 = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1), w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
        else:
            x2, w2 = x.flatten(1), w.flatten(1)
        return torch.matmul(x2, w2.t()).view(x.shape[0], w.shape[0], 1, 1)


class ImageTranspose2d(nn.ConvTranspose2d):
    """G's last layer (stride 2, 4x4, to the image's few channels), forward by phases."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _stride2_k4(self):
            return super().forward(x)
        return _PhaseTranspose.apply(*_compute_dtype(x, self.weight))


class ImageConv2d(nn.Conv2d):
    """D's first layer (stride 2, 4x4, from the image), its input gradient by phases."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (_stride2_k4(self) and _even(x)):
            return super().forward(x)
        return _ImageConv.apply(*_compute_dtype(x, self.weight))


class WideConv2d(nn.Conv2d):
    """D's inner stride-2 4x4 convolutions, their bf16 weight gradient by one matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (_stride2_k4(self) and _even(x)):
            return super().forward(x)
        return _Wide.apply(*_compute_dtype(x, self.weight), False)


class WideTranspose2d(nn.ConvTranspose2d):
    """G's inner stride-2 4x4 transposed convolutions, their bf16 weight gradient by one matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _stride2_k4(self):
            return super().forward(x)
        return _Wide.apply(*_compute_dtype(x, self.weight), True)
