"""Guided backpropagation of strongly activating discriminator features (paper section 6.2, figure 5).

The layer is D's last hidden convolution (its activation after batchnorm and LeakyReLU). Its
channels are ranked by their spatial maximum averaged over real images; for each of the top
channels, the real images that activate it most are explained by guided backpropagation
(Springenberg et al. 2015) from that channel's strongest position to the input pixels.

Guided backprop passes a gradient backwards through a rectifier only where the forward input
was positive and the incoming gradient is positive. D uses LeakyReLU(0.2), whose negative side
is not dead: here the leaky side keeps its slope (the true local derivative, 0.2) and the
result is clamped at zero, i.e. only positive gradients pass, through either side. The same
rule applied to a ReLU (slope 0) is the original guided backprop.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcgan.evaluation.features import conv_outputs
from dcgan.evaluation.figures import captioned_grid, side_by_side, titled


class _GuidedLeaky(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, slope: float) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x)
        ctx.slope = slope
        return F.leaky_relu(x, slope)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        (x,) = ctx.saved_tensors
        local = torch.where(x > 0, torch.ones_like(x), torch.full_like(x, ctx.slope))
        return (grad * local).clamp_min(0), None


class GuidedLeakyReLU(nn.LeakyReLU):
    """LeakyReLU (or ReLU with slope 0) whose backward lets only positive gradients through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GuidedLeaky.apply(x, self.negative_slope)


def guided_copy(model: nn.Module) -> nn.Module:
    """A copy of the model in eval mode with every (Leaky)ReLU replaced by its guided version."""
    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.LeakyReLU | nn.ReLU):
                slope = child.negative_slope if isinstance(child, nn.LeakyReLU) else 0.0
                setattr(parent, name, GuidedLeakyReLU(slope))
    return model


def _to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def channel_maxima(D: nn.Module, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """(N, C) spatial maximum of every channel of D's last hidden conv layer, per image."""
    D = D.eval()
    tap = conv_outputs(D)[-1]
    captured: list[torch.Tensor] = []
    hook = tap.register_forward_hook(lambda _m, _i, out: captured.append(out.amax((2, 3))))
    try:
        for i in range(0, len(images), batch):
            D(_to_input(images[i : i + batch]))
    finally:
        hook.remove()
    return torch.cat(captured)


def guided_gradients(D: nn.Module, images: np.ndarray, channel: int) -> np.ndarray:
    """(N, H, W, 3) guided-backprop gradients of each image's strongest unit of `channel` w.r.t. its pixels."""
    guided = guided_copy(D)
    tap = conv_outputs(guided)[-1]
    captured: list[torch.Tensor] = []
    hook = tap.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        x = _to_input(images).requires_grad_(True)
        guided(x)
    finally:
        hook.remove()
    maps = captured[0][:, channel].flatten(1)  # (N, h*w); images are independent in eval mode
    maps.max(1).values.sum().backward()
    return x.grad.permute(0, 2, 3, 1).numpy()


def gradient_image(grad: np.ndarray) -> np.ndarray:
    """A gradient as a viewable uint8 image: centred, scaled to 0.1 per standard deviation, around grey."""
    g = (grad - grad.mean()) / (grad.std() + 1e-12) * 0.1 + 0.5
    return (np.clip(g, 0, 1) * 255).round().astype(np.uint8)


def visualise_features(
    D: nn.Module, images: np.ndarray, *, features: int = 6, per_feature: int = 3
) -> tuple[np.ndarray, dict]:
    """Grid (a row per top channel: each top image beside its guided gradient) and the channels' statistics."""
    maxima = channel_maxima(D, images)
    strength = maxima.mean(0)
    top = strength.argsort(descending=True)[:features].tolist()
    tiles: list[np.ndarray | None] = []
    captions: list[str] = []
    for c in top:
        best = maxima[:, c].argsort(descending=True)[:per_feature].numpy()
        grads = guided_gradients(D, images[best], c)
        for i, g in zip(best, grads, strict=True):
            tiles += [images[i], gradient_image(g)]
            captions += [f"ch {c}", "guided"]
    summary = {"channels": top, "mean_max_activation": [float(strength[c]) for c in top]}
    return captioned_grid(tiles, captions, 2 * per_feature), summary


def trained_vs_random(
    D: nn.Module, random_D: nn.Module, images: np.ndarray, *, features: int = 6, per_feature: int = 3
) -> tuple[np.ndarray, dict]:
    """The trained D's and a random D's feature visualisations side by side, as in the paper's figure 5."""
    left, trained = visualise_features(D, images, features=features, per_feature=per_feature)
    right, random = visualise_features(random_D, images, features=features, per_feature=per_feature)
    figure = side_by_side(titled(left, "trained D"), titled(right, "random D"))
    channels = channel_maxima(D, images[:1]).shape[1]
    return figure, {
        "layer": f"last hidden conv layer of D ({channels} channels, after its LeakyReLU)",
        "images": len(images),
        "trained_D": trained,
        "random_D": random,
    }
