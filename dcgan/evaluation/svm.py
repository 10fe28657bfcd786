"""A linear L2-SVM (squared hinge loss, L2 penalty), one-vs-rest, as in the paper's protocols.

Solves the LinearSVC primal, 0.5 |w|^2 + C sum_i max(0, 1 - y_i (w.x_i + b))^2 per class (b
unregularised), on standardised float32 features in torch, on the evaluation device. The dense
45k x 28,672 CIFAR-10 problem is what shapes the solver (liblinear would first copy it to
float64 and then to its sparse nodes: over 30 GB):

- Newton's method with conjugate gradients (the primal solver of LIBLINEAR and TRON), for all
  ten one-vs-rest problems at once: each pass over the features multiplies by an (F, 10)
  matrix, which costs about what one column costs, since streaming the 5 GB of features
  dominates (several C values can share a solve the same way).
- Each pass is fused per block of rows (X_b v, then X_b^T of it, while X_b is in cache), and
  the step length is found exactly on the tracked X d without another pass.
- CG is preconditioned by the top eigenvectors of X^T X estimated from a subsample of rows
  (a Nystrom preconditioner), which removes the few huge eigenvalues of correlated conv
  features that made plain gradient methods crawl.
- The CG's Hessian products may read a bfloat16 copy of X (dcgan.precision): a
  third of float32's time per pass where the hardware has bfloat16 products. The gradient, and
  so the optimum and the stopping test, stay float32; a Newton step that stops converging
  (as an approximate Hessian does close to the optimum of an ill-conditioned problem) switches
  that solve's products back to float32.
- Columns leave the batch as they converge. C values are solved from small (cheap, well
  conditioned) to large, each from the previous solution, and the ascent stops once the
  validation accuracy falls; the refit on the whole training set starts from the chosen C's.

C is chosen on a validation split held out from the training set (features standardised with
the statistics of the rest), each C solved to liblinear's default tolerance, then the model is
refit on the whole training set to a ten times tighter one. The grid extends by its own ratio
while the best C sits at one of its ends.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dcgan.evaluation.progress import Progress, duration
from dcgan.precision import use_bfloat16

log = logging.getLogger(__name__)

C_GRID = (1e-6, 1e-5, 1e-4, 1e-3)
GRID_EXTENSIONS = 3  # at most this many extra C values per end of the grid
FORCING = 0.1  # each Newton step solves H d = -g by CG to this fraction of |g| (as TRON)
STALL = 0.5  # a Newton step that cuts |gradient| less than this: the bfloat16 Hessian no longer pays
TOL = 1e-4  # converged when |gradient| <= TOL * |gradient at w = 0|, per class and C
# C values are scored at liblinear's own default for its primal solver on 10 balanced classes:
# eps 0.01 * min(positives, negatives) / n = 1e-3 (ten times looser than TOL).
SELECT_TOL = 1e-3
RANK = 1024  # eigenvectors in the CG's preconditioner


@dataclass
class LinearSVM:
    weight: torch.Tensor  # (F, K)
    bias: torch.Tensor  # (K,)
    mean: torch.Tensor  # (F,)
    scale: torch.Tensor  # (F,)
    classes: np.ndarray
    C: float
    grid_end: str | None = None  # "low"/"high": the selection stopped with C at that end of its grid

    def decision(self, x: np.ndarray, batch: int = 4096) -> np.ndarray:
        out = []
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(np.asarray(x[i : i + batch])).to(self.weight.device, torch.float32)
            out.append(torch.addmm(self.bias, (xb - self.mean) / self.scale, self.weight).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes[self.decision(x).argmax(1)]

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float((self.predict(x) == np.asarray(y)).mean())


def _chunk(x: torch.Tensor) -> int:
    """Rows per fused block: a few MB of float32 on a CPU (measured fastest), large on a GPU or in bfloat16."""
    if x.device.type == "cuda":
        return 8192
    return 1024 if x.dtype == torch.bfloat16 else 32


def to_device_float32(x: np.ndarray, rows: np.ndarray, device: str | torch.device, batch: int = 4096) -> torch.Tensor:
    """x[rows] as one float32 tensor on the device, converted block by block (no float32 copy on the host)."""
    out = torch.empty(len(rows), x.shape[1], dtype=torch.float32, device=device)
    for i in range(0, len(rows), batch):
        out[i : i + batch] = torch.from_numpy(np.asarray(x[rows[i : i + batch]])).to(device, torch.float32)
    return out


def standardise_(x: torch.Tensor, n_stats: int, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise x in place with the mean and std of its first n_stats rows; returns (mean, scale).

    Statistics are summed over blocks of rows small enough to stay in cache (float32 within a
    block, float64 across blocks; no full-size temporary). A constant column (all zeros, say)
    becomes exactly 0, not noise divided by a tiny std.
    """
    f = x.shape[1]
    high = torch.full((f,), -torch.inf, dtype=x.dtype, device=x.device)
    low = torch.full((f,), torch.inf, dtype=x.dtype, device=x.device)
    total = torch.zeros(f, dtype=torch.float64, device=x.device)
    for i in range(0, n_stats, batch):
        b = x[i : min(i + batch, n_stats)]
        torch.maximum(high, b.amax(0), out=high)
        torch.minimum(low, b.amin(0), out=low)
        total += b.sum(0)
    mean = (total / n_stats).to(x.dtype)
    squares = torch.zeros(f, dtype=torch.float64, device=x.device)
    for i in range(0, n_stats, batch):
        squares += ((x[i : min(i + batch, n_stats)] - mean) ** 2).sum(0)
    const = high == low
    mean = torch.where(const, x[0], mean)
    std = (squares / max(n_stats - 1, 1)).sqrt().to(x.dtype)
    scale = torch.where(const, torch.ones_like(mean), std.clamp_min(1e-6))
    inverse = 1 / scale
    for i in range(0, len(x), batch):
        x[i : i + batch].sub_(mean).mul_(inverse)
    return mean, scale


class _Preconditioner:
    """Approximate inverse of I + s X^T X from its top eigenpairs, estimated on a row subsample (Nystrom).

    The eigenvalues of X^T X scale with the row count, so those of the subsample are scaled up.
    """

    def __init__(self, x: torch.Tensor, rank: int, seed: int = 0) -> None:
        n = len(x)
        sample = min(n, 2 * rank)
        rows = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(n, sample, replace=False)))
        xs = x[rows.to(x.device)]
        evals, evecs = torch.linalg.eigh((xs @ xs.T).double())
        keep = evals > 1e-6 * (evals.amax() if sample else 0.0)
        evals, evecs = evals[keep].flip(0)[:rank], evecs[:, keep].flip(1)[:, :rank]
        self.basis = xs.T @ (evecs / evals.sqrt()).to(x.dtype)  # (F, k), orthonormal columns
        self.evals = (evals * (n / max(sample, 1))).to(x.dtype)

    def apply(self, r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """(I + s X^T X)^-1 r on the top eigenvectors; the rest scaled as the smallest of them."""
        if len(self.evals) == 0:
            return r
        tail = 1 / (1 + s * self.evals[-1])
        factor = 1 / (1 + s[None, :] * self.evals[:, None]) - tail
        return self.basis @ ((self.basis.T @ r) * factor) + r * tail


def _gradient_pass(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> tuple:
    """One fused pass: z = x w + b and x^T (y * max(0, 1 - y z)), as (n, m) and (m, F)."""
    z = torch.empty(len(x), w.shape[1], dtype=x.dtype, device=x.device)
    g = torch.zeros(w.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
    step = _chunk(x)
    for i in range(0, len(x), step):
        xb, yb = x[i : i + step], y[i : i + step]
        zb = torch.addmm(b, xb, w)
        z[i : i + step] = zb
        g.addmm_((yb * (1 - yb * zb).clamp_min(0)).T, xb)
    return z, g


def _hessian_pass(x: torch.Tensor, p: torch.Tensor, pb: torch.Tensor, active: torch.Tensor) -> tuple:
    """One fused pass: x p + pb and x^T (active * (x p + pb)), as float32 (n, m) and (m, F).

    x may be a bfloat16 copy (see `hessian_copy`): products then round to bfloat16 per block and
    are summed in float32.
    """
    xp = torch.empty(len(x), p.shape[1], dtype=pb.dtype, device=x.device)
    r = torch.zeros(p.shape[1], x.shape[1], dtype=pb.dtype, device=x.device)
    step, low = _chunk(x), x.dtype != pb.dtype
    p = p.to(x.dtype)
    for i in range(0, len(x), step):
        xb = x[i : i + step]
        if low:
            zb = (xb @ p).to(pb.dtype) + pb
            r += ((zb * active[i : i + step]).to(x.dtype).T @ xb).to(pb.dtype)
        else:
            zb = torch.addmm(pb, xb, p)
            r.addmm_((zb * active[i : i + step]).T, xb)
        xp[i : i + step] = zb
    return xp, r


def _step_length(
    w: torch.Tensor, dw: torch.Tensor, z: torch.Tensor, xd: torch.Tensor, y: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    """Exact minimiser t of the (piecewise quadratic, convex) objective along w + t d, per column."""
    wd, dd = (w * dw).sum(0), (dw * dw).sum(0)
    yxd = y * xd
    t = torch.ones_like(wd)
    for _ in range(30):
        margin = (1 - y * z - t * yxd).clamp_min(0)
        slope = wd + t * dd - s * (margin * yxd).sum(0)
        curvature = dd + s * ((margin > 0) * xd * xd).sum(0)
        t_next = (t - slope / curvature.clamp_min(1e-30)).clamp_min(0)
        if torch.all((t_next - t).abs() <= 1e-7 * t.abs().clamp_min(1)):
            return t_next
        t = t_next
    return t


def _newton_cg(
    x: torch.Tensor,
    xh: torch.Tensor,
    y: torch.Tensor,
    s: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    g0: torch.Tensor,
    pre: _Preconditioner,
    *,
    tol: float,
    max_newton: int = 60,
    max_cg: int = 250,
) -> dict:
    """Minimise 0.5|w_j|^2 + s_j/2 sum max(0, 1 - y_j (x w_j + b_j))^2 for every column j, in place.

    Columns leave the batch once |gradient_j| <= tol * g0_j. Gradients use x; the CG's Hessian
    products use xh (x itself, or its bfloat16 copy): an inexact Hessian only slows Newton's
    steps, while the exact gradient decides where they stop.
    """
    todo = torch.arange(w.shape[1], device=w.device)
    passes = cg_steps = 0
    previous = None  # |gradient| per column at the last Newton step
    start = last_log = time.perf_counter()
    for newton in range(max_newton + 1):
        wa, ba, ya, sa = w[:, todo], b[todo], y[:, todo], s[todo]
        z, g = _gradient_pass(x, wa, ba, ya)
        passes += 1
        margin = (1 - ya * z).clamp_min(0)
        gw, gb = wa - sa * g.T, -sa * (ya * margin).sum(0)
        gnorm = ((gw * gw).sum(0) + gb * gb).sqrt()
        done = gnorm <= tol * g0[todo]
        if previous is not None:
            ratio = (gnorm / previous).max().item()
            log.debug(
                "L2-SVM: Newton step %d, worst |g|/|g0| %.1e, |g| ratio %.2f", newton, (gnorm / g0[todo]).max(), ratio
            )
            if xh is not x and ratio > STALL and newton >= 2:  # step 1 may still be moving the active set
                xh = x
                log.debug("L2-SVM: Hessian products in %s from Newton step %d on", x.dtype, newton)
        if done.all() or newton == max_newton:
            if not done.all():
                worst = (gnorm / g0[todo]).max().item()
                log.warning("L2-SVM: stopped after %d Newton steps at |g|/|g0| = %.1e (tol %.0e)", newton, worst, tol)
            break
        if time.perf_counter() - last_log > 30:  # a long solve is never silent
            last_log = time.perf_counter()
            log.info(
                "L2-SVM: Newton step %d, %d of %d columns converged, worst |g|/|g0| %.1e (tol %.0e), %d passes in %s",
                newton,
                w.shape[1] - int((~done).sum()),
                w.shape[1],
                (gnorm / g0[todo]).max().item(),
                tol,
                passes,
                duration(last_log - start),
            )
        keep = ~done
        todo, wa, ba, ya, sa = todo[keep], wa[:, keep], ba[keep], ya[:, keep], sa[keep]
        z, margin, gw, gb, gnorm = z[:, keep], margin[:, keep], gw[:, keep], gb[keep], gnorm[keep]
        previous = gnorm
        active = (margin > 0).to(x.dtype)
        n_active = active.sum(0)
        s_pre = sa * n_active / len(x)  # the preconditioner is built from all rows; only active ones count
        # Truncated CG on H d = -g, H = [I 0; 0 0] + s [x 1]^T diag(active) [x 1].
        dw, db, xd = torch.zeros_like(wa), torch.zeros_like(ba), torch.zeros_like(z)
        rw, rb = -gw, -gb
        qw, qb = pre.apply(rw, s_pre), rb / (sa * n_active).clamp_min(1e-12)
        pw, pb = qw, qb
        rq = (rw * qw).sum(0) + rb * qb
        forcing = FORCING * gnorm
        open_ = torch.ones_like(gnorm, dtype=torch.bool)
        for _ in range(max_cg):
            xp, r = _hessian_pass(xh, pw, pb, active)
            passes += 1
            cg_steps += 1
            hw, hb = pw + sa * r.T, sa * (xp * active).sum(0)
            alpha = torch.where(open_, rq / ((pw * hw).sum(0) + pb * hb).clamp_min(1e-30), 0)
            dw += alpha * pw
            db += alpha * pb
            xd += alpha * xp
            rw -= alpha * hw
            rb -= alpha * hb
            open_ &= ((rw * rw).sum(0) + rb * rb).sqrt() > forcing
            if not open_.any():
                break
            qw, qb = pre.apply(rw, s_pre), rb / (sa * n_active).clamp_min(1e-12)
            rq_next = (rw * qw).sum(0) + rb * qb
            beta = rq_next / rq.clamp_min(1e-30)
            pw, pb, rq = qw + beta * pw, qb + beta * pb, rq_next
        t = _step_length(wa, dw, z, xd, ya, sa)
        w[:, todo] = wa + t * dw
        b[todo] = ba + t * db
    return {"newton_steps": newton, "passes": passes, "cg_steps": cg_steps}


def _targets(labels: torch.Tensor, n_classes: int, copies: int) -> torch.Tensor:
    """(n, copies * K) one-vs-rest targets +-1, column c * K + k for class k."""
    y = -torch.ones(len(labels), n_classes, device=labels.device)
    y[torch.arange(len(labels), device=labels.device), labels] = 1.0
    return y.repeat(1, copies)


def _gradient_at_zero(x: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """|[x^T y_k, sum y_k]| per class: the gradient norm at w = 0 divided by s = 2C."""
    y = _targets(labels, n_classes, 1)
    g = torch.zeros(n_classes, x.shape[1], dtype=x.dtype, device=x.device)
    for i in range(0, len(x), 4096):
        g.addmm_(y[i : i + 4096].T, x[i : i + 4096])
    return ((g * g).sum(1) + y.sum(0) ** 2).sqrt()


def hessian_copy(x: torch.Tensor, low_precision: bool) -> torch.Tensor:
    """The matrix the CG's Hessian products read: x itself, or a bfloat16 copy of it.

    bfloat16 halves the bytes each pass streams; where the hardware has bfloat16 products
    (dcgan.precision) a pass takes about a third of float32's time.
    """
    return x.to(torch.bfloat16) if low_precision else x


class SvmProblem:
    """Standardised features and labels on the device, with what every solve over them shares."""

    def __init__(
        self, x: torch.Tensor, labels: torch.Tensor, n_classes: int, rank: int, low_precision: bool = False
    ) -> None:
        self.x, self.labels, self.n_classes = x, labels, n_classes
        self.xh = hessian_copy(x, low_precision)
        self.pre = _Preconditioner(x, rank)
        self.g0 = _gradient_at_zero(x, labels, n_classes)

    def solve(
        self,
        Cs: Sequence[float],
        init: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        tol: float = TOL,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights (F, len(Cs) * K) and biases for every C at once (column c * K + k: C value c, class k)."""
        k, dev = self.n_classes, self.x.device
        s = torch.tensor([2 * c for c in Cs for _ in range(k)], dtype=self.x.dtype, device=dev)
        if init is None:
            w = torch.zeros(self.x.shape[1], len(Cs) * k, dtype=self.x.dtype, device=dev)
            b = torch.zeros(len(Cs) * k, dtype=self.x.dtype, device=dev)
        else:
            w, b = init[0].clone(), init[1].clone()
        stats = _newton_cg(
            self.x,
            self.xh,
            _targets(self.labels, k, len(Cs)),
            s,
            w,
            b,
            s * self.g0.repeat(len(Cs)),
            self.pre,
            tol=tol,
        )
        log.debug("L2-SVM: %d C value(s), %d rows: %s", len(Cs), len(self.x), stats)
        return w, b


def _check_inputs(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need as many labels as feature rows (got {len(x)} rows, {len(y)} labels)")
    classes, yi = np.unique(np.asarray(y), return_inverse=True)
    if len(classes) < 2:
        raise ValueError("an SVM needs at least two classes in its training labels")
    return classes, yi


def fit_svm(
    x: np.ndarray,
    y: np.ndarray,
    C: float,
    *,
    device: str = "cpu",
    tol: float = TOL,
    rank: int = RANK,
    precision: str = "auto",
) -> LinearSVM:
    """Train one-vs-rest squared-hinge SVMs for all classes at once, on features standardised here."""
    classes, yi = _check_inputs(x, y)
    low = use_bfloat16(precision, device)
    xs = to_device_float32(x, np.arange(len(x)), device)
    mean, scale = standardise_(xs, len(xs))
    problem = SvmProblem(xs, torch.from_numpy(yi).to(device), len(classes), rank, low)
    w, b = problem.solve([C], tol=tol)
    return LinearSVM(w, b, mean, scale, classes, C)


def choose_c(scores: dict[float, float]) -> float:
    """The C of best validation accuracy; on a tie an interior C (not an end of the grid), then the smallest."""
    best = max(scores.values())
    tied = sorted(c for c, v in scores.items() if v == best)
    interior = [c for c in tied if min(scores) < c < max(scores)]
    return (interior or tied)[0]


def _grid_ratio(grid: Sequence[float]) -> float:
    """The grid's geometric step (10 for a single value), by which it extends at either end."""
    return (grid[-1] / grid[0]) ** (1 / (len(grid) - 1)) if len(grid) > 1 and grid[-1] > grid[0] else 10.0


def select_and_fit(
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    val_fraction: float = 0.1,
    grid: Sequence[float] = C_GRID,
    extensions: int = GRID_EXTENSIONS,
    seed: int = 0,
    device: str = "cpu",
    tol: float = TOL,
    select_tol: float = SELECT_TOL,
    rank: int = RANK,
    precision: str = "auto",
    desc: str = "L2-SVM",
    validation: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[LinearSVM, dict[float, float]]:
    """Choose C on held-out data, then refit on the whole training set; returns the model and the scores.

    Without `validation`, a seeded `val_fraction` of the training set is held out (and the model refit
    on all of it); with it, that set scores the C values and the model is the fit at the chosen C.
    C values are solved from small to large, each from the previous solution (small C is cheap and
    a good start), and the ascent stops once the validation accuracy falls below the best so far:
    larger C values are the costly ones. The grid extends by its own ratio, up to `extensions`
    times per end, while the best C is at an end; model.grid_end says if it still is.
    The C values are scored at `select_tol` (liblinear's own default stopping rule for these
    problems), the returned model is solved to `tol`.
    """
    grid = sorted(float(c) for c in grid)
    if not grid or any(not (math.isfinite(c) and c > 0) for c in grid):
        raise ValueError(f"C values must be positive and finite, got {grid}")
    classes, yi = _check_inputs(x_train, y_train)
    k, n = len(classes), len(x_train)
    low = use_bfloat16(precision, device)
    if validation is None:
        order = np.random.default_rng(seed).permutation(n)
        n_val = max(1, int(n * val_fraction))
        val, fit = np.sort(order[:n_val]), np.sort(order[n_val:])
        rows = np.concatenate([fit, val])  # fit rows first: both splits are views of one float32 copy
        xs = to_device_float32(x_train, rows, device)
        labels = torch.from_numpy(yi[rows]).to(device)
        mean, scale = standardise_(xs, len(fit))
        x_fit, x_val, y_fit, y_val = xs[: len(fit)], xs[len(fit) :], labels[: len(fit)], labels[len(fit) :]
    else:
        xs = x_fit = to_device_float32(x_train, np.arange(n), device)
        labels = y_fit = torch.from_numpy(yi).to(device)
        mean, scale = standardise_(xs, n)
        x_val = (to_device_float32(validation[0], np.arange(len(validation[0])), device) - mean) / scale
        y_val = torch.from_numpy(np.searchsorted(classes, np.asarray(validation[1]))).to(device)
        known = torch.from_numpy(np.isin(np.asarray(validation[1]), classes)).to(device)
        y_val = torch.where(known, y_val.clamp_max(k - 1), -1)  # a class the training set lacks is never right
    problem = SvmProblem(x_fit, y_fit, k, rank, low)
    ratio = _grid_ratio(grid)
    scores: dict[float, float] = {}
    solutions: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    progress = Progress(f"{desc}: C grid", len(grid) + (validation is None), unit="C", pace="last")

    def solve(C: float, start: float | None) -> float:
        w, b = problem.solve([C], solutions.get(start), tol=select_tol)
        solutions[C] = (w, b)
        scores[C] = float((torch.addmm(b, x_val, w).argmax(1) == y_val).float().mean())
        log.info("%s C=%g: validation accuracy %.4f", desc, C, scores[C])
        progress.update(1, f"C={C:g} validation accuracy {scores[C]:.4f}")
        return scores[C]

    previous = None
    for i, C in enumerate(grid):
        if solve(C, previous) < max(scores.values()):
            progress.set_total(progress.total - (len(grid) - i - 1))
            break
        previous = C
    for _ in range(extensions):  # larger C: only reached when the last grid value was the best
        high = max(scores)
        if choose_c(scores) != high:
            break
        progress.set_total(progress.total + 1)
        solve(high * ratio, high)
    for _ in range(extensions):  # smaller C, from the smallest solved
        low = min(scores)
        if choose_c(scores) != low:
            break
        progress.set_total(progress.total + 1)
        solve(low / ratio, low)
    best = choose_c(scores)
    grid_end = "low" if best == min(scores) else "high" if best == max(scores) else None
    if grid_end:
        log.warning("%s: the chosen C=%g is at the %s end of the C values tried %s", desc, best, grid_end, list(scores))
    w, b = solutions[best]
    if validation is None:
        # Refit on every training row, standardised with all rows' statistics; the fit-split
        # solution, rewritten for the new scaling, is the starting point.
        shift, stretch = standardise_(xs, len(xs))
        del problem  # its bfloat16 copy goes before the refit makes one
        problem = SvmProblem(xs, labels, k, rank, low)
        w, b = problem.solve([best], (w * stretch[:, None], b + shift @ w), tol=tol)
        mean, scale = mean + scale * shift, scale * stretch
        progress.update(1, f"refit on {n} images at C={best:g}")
    else:
        w, b = problem.solve([best], (w, b), tol=tol)
    progress.close()
    return LinearSVM(w, b, mean, scale, classes, best, grid_end), scores
