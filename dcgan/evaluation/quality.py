"""Sample quality without a pretrained network, and latent-space walks.

Sliced Wasserstein distance (SWD) on Laplacian-pyramid patches, after Karras et al. (2018,
"Progressive Growing of GANs", appendix D): 7x7 patches drawn from every pyramid level down
to 16 px, each level normalised by channel, compared with random 1-D projections. Lower is
better; the numbers are comparable only at equal image counts and resolution. Latent walks
(paper section 6.1) interpolate linearly between random points of Z.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_KERNEL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = (_KERNEL[:, None] * _KERNEL[None, :]).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k, groups=x.shape[1])


def laplacian_pyramid(x: torch.Tensor, min_res: int = 16) -> list[torch.Tensor]:
    """Band-pass levels from full resolution down, then the low-pass residual at `min_res`."""
    levels = []
    while x.shape[-1] > min_res:
        down = _blur(x)[..., ::2, ::2]
        up = F.interpolate(down, scale_factor=2, mode="nearest")
        levels.append(x - _blur(up))
        x = down
    levels.append(x)
    return levels


def _patches(level: torch.Tensor, per_image: int, size: int, g: torch.Generator) -> torch.Tensor:
    n, c, h, w = level.shape
    ys = torch.randint(0, h - size + 1, (n, per_image), generator=g)
    xs = torch.randint(0, w - size + 1, (n, per_image), generator=g)
    offs = torch.arange(size)
    rows = (ys[..., None] + offs)[..., :, None].expand(n, per_image, size, size)
    cols = (xs[..., None] + offs)[..., None, :].expand(n, per_image, size, size)
    batch = torch.arange(n)[:, None, None, None].expand_as(rows)
    out = level.permute(0, 2, 3, 1)[batch, rows, cols]  # (n, per_image, size, size, c)
    return out.reshape(n * per_image, size * size * c)


def _sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: int, repeats: int, g: torch.Generator) -> float:
    results = []
    for _ in range(repeats):
        d = torch.randn(a.shape[1], directions, generator=g)
        d /= d.norm(dim=0, keepdim=True)
        # (directions, descriptors), sorted along the contiguous last axis by numpy: ~10x torch's CPU sort
        pa, pb = np.sort((d.T @ a.T).numpy(), axis=1), np.sort((d.T @ b.T).numpy(), axis=1)
        results.append(float(np.abs(pa - pb).mean()))
    return float(np.mean(results))


def _to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def sliced_wasserstein_distance(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    per_image: int = 128,
    size: int = 7,
    directions: int = 512,
    repeats: int = 4,
    max_descriptors: int = 16_384,
    seed: int = 0,
) -> dict[str, float]:
    """SWD x 1e3 per pyramid resolution and their mean, between two (N, H, W, 3) uint8 sets of equal N.

    At most `max_descriptors` random patches per level and set enter the projections, which
    keeps a CPU run to seconds (the projections cost descriptors x 147 x directions).
    """
    if real.shape != fake.shape:
        raise ValueError(f"SWD needs sets of the same shape, got {real.shape} and {fake.shape}")
    if real.shape[1] < 16:
        raise ValueError("SWD needs images of at least 16 px")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for lr, lf in zip(laplacian_pyramid(_to_float(real)), laplacian_pyramid(_to_float(fake)), strict=True):
        a, b = _patches(lr, per_image, size, g), _patches(lf, per_image, size, g)
        if len(a) > max_descriptors:
            a = a[torch.randperm(len(a), generator=g)[:max_descriptors]]
            b = b[torch.randperm(len(b), generator=g)[:max_descriptors]]
        mean, std = a.reshape(-1, size * size, 3).mean((0, 1)), a.reshape(-1, size * size, 3).std((0, 1)) + 1e-8
        a = ((a.reshape(-1, size * size, 3) - mean) / std).reshape(len(a), -1)
        b = ((b.reshape(-1, size * size, 3) - mean) / std).reshape(len(b), -1)
        out[str(lr.shape[-1])] = 1e3 * _sliced_wasserstein(a, b, directions, repeats, g)
    out["mean"] = float(np.mean(list(out.values())))
    return out


@torch.no_grad()
def generate(G: nn.Module, z: torch.Tensor, batch: int = 256) -> np.ndarray:
    """uint8 (N, H, W, 3) images on the host from G in eval mode (G may sit on any device)."""
    G.eval()
    device = next(G.parameters()).device
    chunks = [G(z[i : i + batch].to(device)).float() for i in range(0, len(z), batch)]
    x = torch.cat(chunks).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def prior_noise(nz: int, noise: str, n: int, seed: int) -> torch.Tensor:
    """(n, nz) z's from a run's prior, uniform on [-1, 1] or standard normal, from a seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, nz, generator=g) * 2 - 1 if noise == "uniform" else torch.randn(n, nz, generator=g)


def real_and_generated(G: nn.Module, cfg: dict, n: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Up to `n` training images of a run and as many samples: the same two sets on every call."""
    real = real_images(cfg["shards"], n)
    return real, generate(G, prior_noise(cfg["nz"], cfg.get("noise", "uniform"), len(real), seed))


def latent_walks(
    G: nn.Module, nz: int, *, rows: int = 8, steps: int = 10, seed: int = 0, noise: str = "uniform"
) -> np.ndarray:
    """(rows * steps, H, W, 3): each row walks linearly from one random z to another."""
    g = torch.Generator().manual_seed(seed)
    ends = torch.rand(rows, 2, nz, generator=g) * 2 - 1 if noise == "uniform" else torch.randn(rows, 2, nz, generator=g)
    t = torch.linspace(0, 1, steps)[None, :, None]
    z = (1 - t) * ends[:, :1] + t * ends[:, 1:]
    return generate(G, z.reshape(rows * steps, nz))


def real_images(shards: str, n: int, seed: int = 0) -> np.ndarray:
    """Up to `n` training images (uint8, N x H x W x 3) drawn with a seed from a run's shards.

    Positions are drawn from the index's per-shard counts first, so only the chosen samples are
    decoded and only the shards holding them are read (not all 3M images of an LSUN run).
    """
    from pathlib import Path

    from preprocessing.images import SAMPLE_EXT, decode_ppm
    from preprocessing.sharding import read_index
    from preprocessing.tar_shards import index_tar, read_member

    index = read_index(Path(shards))
    counts = [s["nsamples"] for s in index["shardlist"]]
    pick = np.sort(np.random.default_rng(seed).permutation(sum(counts))[:n])
    starts = np.cumsum([0, *counts])
    images = []
    for shard, lo, hi in zip(index["shardlist"], starts[:-1], starts[1:], strict=True):
        wanted = set((pick[(pick >= lo) & (pick < hi)] - lo).tolist())
        if not wanted:
            continue
        path = Path(shards) / shard["url"]
        members = [m for m in index_tar(path) if m.ext == SAMPLE_EXT]
        with open(path, "rb") as fh:
            images += [decode_ppm(read_member(fh, members[i])) for i in sorted(wanted)]
    return np.stack(images)
