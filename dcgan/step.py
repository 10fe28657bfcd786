"""One DCGAN update (D on a real and a fake batch, then G), in the textbook form and in ours.

Textbook: pytorch/examples' loop: D ends in a Sigmoid, `nn.BCELoss`, eager fp32, stock Adam.
Ours: the same update with BCE-with-logits (numerically safe under bf16 autocast), G's
backward limited to G's parameters (D's weight gradients from the G loss are never used, so
D runs on detached weights there and no layer computes them),
and, chosen by `StepOptions`, bf16 autocast, channels_last and, on CUDA, the whole update
captured once as a CUDA graph and replayed: at batch 128 the step is launch-bound.
Both add their five statistics into one device tensor, so nothing waits for the GPU
between log steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

METRICS = ("loss_d", "loss_g", "d_x", "d_g_z1", "d_g_z2")


@dataclass(frozen=True)
class StepOptions:
    textbook: bool = False
    autocast: torch.dtype | None = None
    channels_last: bool = False
    cuda_graph: bool = False
    fused_adam: bool = False
    fast_layers: bool = False

    def describe(self) -> str:
        if self.textbook:
            return "textbook (eager fp32, Sigmoid + BCELoss, stock Adam)"
        parts = [str(self.autocast).removeprefix("torch.") + " autocast" if self.autocast else "fp32"]
        named = (
            ("channels_last", self.channels_last),
            ("fused Adam", self.fused_adam),
            ("fast layers", self.fast_layers),
        )
        parts += [name for name, on in named if on]
        parts.append("CUDA graph" if self.cuda_graph else "eager")
        return ", ".join(parts)


def make_adam(params: Iterator[nn.Parameter], lr: float, beta1: float, options: StepOptions) -> torch.optim.Adam:
    """Adam with the paper's betas; fused and graph-capturable when the options ask for it."""
    kwargs = {}
    if options.fused_adam:
        kwargs["fused"] = True
    if options.cuda_graph:
        kwargs["capturable"] = True
    return torch.optim.Adam(params, lr=lr, betas=(beta1, 0.999), **kwargs)


class StepRunner:
    """Runs updates on uint8 batches; `acc` accumulates the statistics of `METRICS`.

    `G` and `D` may be DDP wrappers; `D_plain` is D itself, used for the G loss so that
    D's DDP hooks only see the D update (its gradient from the G loss is not needed).
    """

    def __init__(
        self,
        G: nn.Module,
        D: nn.Module,
        D_plain: nn.Module,
        optG: torch.optim.Optimizer,
        optD: torch.optim.Optimizer,
        options: StepOptions,
        acc: torch.Tensor,
    ) -> None:
        self.G, self.D, self.D_plain = G, D, D_plain
        self.optG, self.optD = optG, optD
        self.options = options
        self.acc = acc
        self.g_params = [p for p in G.parameters() if p.requires_grad]
        self.d_named_params = list(D_plain.named_parameters())  # detached per step for the G loss
        self.graph: torch.cuda.CUDAGraph | None = None
        self._labels: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, real_u8: torch.Tensor, z: torch.Tensor) -> None:
        if self.options.textbook:
            self._textbook(real_u8, z)
        elif not self.options.cuda_graph:
            self._ours(real_u8, z)
        else:
            if self.graph is None:
                self._capture(real_u8, z)
            self._static_real.copy_(real_u8)
            self._static_z.copy_(z)
            self.graph.replay()

    # -- the two step forms ------------------------------------------------------------
    def _labels_for(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if n not in self._labels:
            self._labels[n] = (torch.ones(n, device=device), torch.zeros(n, device=device))
        return self._labels[n]

    def _to_input(self, real_u8: torch.Tensor) -> torch.Tensor:
        real = real_u8.float().div_(127.5).sub_(1.0)  # keeps the batch's layout (the GPU cache gives NHWC)
        fmt = torch.channels_last if self.options.channels_last else torch.contiguous_format
        return real.contiguous(memory_format=fmt)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.options.autocast is None:
            return contextlib.nullcontext()
        # The cast cache (each weight cast once per region, not once per call) must be off while a
        # CUDA graph is captured (torch.cuda.graph docs).
        return torch.autocast(
            self.acc.device.type, dtype=self.options.autocast, cache_enabled=not self.options.cuda_graph
        )

    def _ours(self, real_u8: torch.Tensor, z: torch.Tensor) -> None:
        ones, zeros = self._labels_for(real_u8.shape[0], real_u8.device)
        real = self._to_input(real_u8)
        self.optD.zero_grad(set_to_none=True)
        with self._autocast():
            out_real = self.D(real).float()
            fake = self.G(z)
            out_fake = self.D(fake.detach()).float()
        loss_d = F.binary_cross_entropy_with_logits(out_real, ones) + F.binary_cross_entropy_with_logits(
            out_fake, zeros
        )
        loss_d.backward()
        self.optD.step()
        self.optG.zero_grad(set_to_none=True)
        with self._autocast():  # D's weights detached: no weight gradients are computed for the G loss
            frozen = {name: p.detach() for name, p in self.d_named_params}
            out_g = torch.func.functional_call(self.D_plain, frozen, (fake,)).float()
        loss_g = F.binary_cross_entropy_with_logits(out_g, ones)
        loss_g.backward(inputs=self.g_params)
        self.optG.step()
        with torch.no_grad():
            stats = torch.stack(
                [loss_d, loss_g, out_real.sigmoid().mean(), out_fake.sigmoid().mean(), out_g.sigmoid().mean()]
            )
            self.acc.add_(stats)

    def _textbook(self, real_u8: torch.Tensor, z: torch.Tensor) -> None:
        """pytorch/examples/dcgan/main.py, step for step (its D's last layer is the Sigmoid)."""
        ones, zeros = self._labels_for(real_u8.shape[0], real_u8.device)
        real = self._to_input(real_u8)
        self.D.zero_grad()
        out_real = torch.sigmoid(self.D(real))
        err_real = F.binary_cross_entropy(out_real, ones)
        err_real.backward()
        fake = self.G(z)
        out_fake = torch.sigmoid(self.D(fake.detach()))
        err_fake = F.binary_cross_entropy(out_fake, zeros)
        err_fake.backward()
        self.optD.step()
        self.G.zero_grad()
        out_g = torch.sigmoid(self.D(fake))
        err_g = F.binary_cross_entropy(out_g, ones)
        err_g.backward()
        self.optG.step()
        with torch.no_grad():
            stats = torch.stack([err_real + err_fake, err_g, out_real.mean(), out_fake.mean(), out_g.mean()])
            self.acc.add_(stats)

    # -- CUDA graph --------------------------------------------------------------------
    def _state_tensors(self) -> list[torch.Tensor]:
        tensors = [self.acc]
        for module in (self.G, self.D):
            tensors += list(module.parameters()) + list(module.buffers())
        for opt in (self.optG, self.optD):
            for st in opt.state.values():
                tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
        return tensors

    @torch.no_grad()
    def _restore(self, saved: list[tuple[torch.Tensor, torch.Tensor]], had_state: set[int]) -> None:
        for tensor, copy in saved:
            tensor.copy_(copy)
        for opt in (self.optG, self.optD):  # Adam state born in the warm-up: back to "never stepped"
            for p, st in opt.state.items():
                if id(p) not in had_state:
                    for v in st.values():
                        if isinstance(v, torch.Tensor):
                            v.zero_()

    def _capture(self, real_u8: torch.Tensor, z: torch.Tensor) -> None:
        """Warm up on a side stream, undo what the warm-up changed, then capture one update.

        Capturing records kernels without running them, so after the restore the model and
        optimizer state are exactly what they were: replaying the graph is the first step.
        """
        had_state = {id(p) for opt in (self.optG, self.optD) for p in opt.state}
        saved = [(t, t.detach().clone()) for t in self._state_tensors()]
        self._static_real = real_u8.clone()
        self._static_z = z.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._ours(self._static_real, self._static_z)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self._restore(saved, had_state)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (the DataLoader's pin-memory thread) must not
        # invalidate the capture (pytorch/pytorch#146924)
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self._ours(self._static_real, self._static_z)
