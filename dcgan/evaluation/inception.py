"""Inception-v3 pool3 features for FID and KID, from a weights file the user supplies.

Nothing is ever downloaded. Two files are recognised by their classifier shape:

- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (fc 1008 x 2048): the TensorFlow
  Inception of the original FID code, ported. This is the network behind published FIDs.
  Its architecture is torchvision's Inception3 with pytorch-fid's patched blocks (TensorFlow's
  average pooling excludes the zero padding, and the last block max-pools), imported from the
  `pytorch-fid` package; we assemble them ourselves because its builder fetches weights by URL.
- torchvision's `inception_v3_google-0cc3c7bd.pth` (fc 1000 x 2048, with AuxLogits): an
  ImageNet classifier with other weights; its FIDs are not comparable with published ones.

Images are fed as pytorch-fid does: [0, 1], bilinearly resized to 299 x 299, scaled to
[-1, 1] (torchvision's `transform_input` maps its normalised input to the same range).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
from torchvision.models.inception import Inception3

from dcgan.evaluation.cifar import EvaluationError

FID_NETWORK = "pytorch-fid FID Inception (TensorFlow inception-2015-12-05, pt_inception-2015-12-05)"
TORCHVISION_NETWORK = "torchvision inception_v3 IMAGENET1K_V1 (inception_v3_google; not the FID-standard network)"


def fid_inception() -> Inception3:
    """pytorch-fid's FID Inception architecture with uninitialised weights (no download)."""
    net = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net


def torchvision_inception() -> Inception3:
    """torchvision's ImageNet Inception-v3 architecture with uninitialised weights (no download)."""
    return Inception3(num_classes=1000, aux_logits=True, init_weights=False)


@dataclass
class InceptionNet:
    model: Inception3
    network: str  # which of the two networks, in words, for the report
    path: str
    sha256: str


def load_inception(path: Path) -> InceptionNet:
    """Build the network matching a local weights file and load it; clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"Inception weights not found: {path} (nothing is downloaded; pass a local file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for files it cannot read
        raise EvaluationError(f"{path} is not a PyTorch weights file: {type(exc).__name__}: {exc}") from exc
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    shapes = {(1008, 2048): (fid_inception, FID_NETWORK), (1000, 2048): (torchvision_inception, TORCHVISION_NETWORK)}
    if not isinstance(fc, torch.Tensor) or tuple(fc.shape) not in shapes:
        raise EvaluationError(
            f"{path} is not an Inception-v3 state dict: expected pytorch-fid's pt_inception-2015-12-05-*.pth "
            "or torchvision's inception_v3_google-*.pth"
        )
    build, network = shapes[tuple(fc.shape)]
    model = build()
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise EvaluationError(f"{path} does not fit the {network}: {exc}") from exc
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return InceptionNet(model.eval(), network, str(path), digest)


@torch.no_grad()
def pool3_features(net: InceptionNet, images: np.ndarray, *, batch: int = 50, device: str = "cpu") -> np.ndarray:
    """(N, H, W, 3) uint8 images -> (N, 2048) float64 activations of the final average pool."""
    m = net.model.to(device)
    layers = [
        m.Conv2d_1a_3x3, m.Conv2d_2a_3x3, m.Conv2d_2b_3x3, m.maxpool1, m.Conv2d_3b_1x1, m.Conv2d_4a_3x3, m.maxpool2,
        m.Mixed_5b, m.Mixed_5c, m.Mixed_5d, m.Mixed_6a, m.Mixed_6b, m.Mixed_6c, m.Mixed_6d, m.Mixed_6e,
        m.Mixed_7a, m.Mixed_7b, m.Mixed_7c, m.avgpool,
    ]  # fmt: skip
    out = np.empty((len(images), 2048))
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).to(device).permute(0, 3, 1, 2).float() / 255
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        for layer in layers:
            x = layer(x)
        out[i : i + len(x)] = x.flatten(1).double().cpu().numpy()
    return out
