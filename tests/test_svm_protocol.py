"""The L2-SVM solver of the CIFAR-10 / SVHN protocols: optimum, C grid, bad input, progress."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import SHARED
from pydantic import ValidationError

from dcgan.evaluation import cifar
from dcgan.evaluation import progress as progress_module
from dcgan.evaluation.cifar import EvaluationError, check_c_grid, cifar10_protocol, load_labelled_images, svm_protocol
from dcgan.evaluation.features import extract_features
from dcgan.evaluation.progress import Progress
from dcgan.evaluation.svhn import svhn_protocol
from dcgan.evaluation.svm import SvmProblem, choose_c, fit_svm, select_and_fit, standardise_, to_device_float32
from dcgan.models import Discriminator
from dcgan.precision import use_bfloat16
from dcgan.settings import EvaluateSettings
from preprocessing.errors import UserError

CIFAR = SHARED / "data" / "cifar10"


def _liblinear(xs: np.ndarray, y: np.ndarray, C: float) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.svm import LinearSVC

    ref = LinearSVC(
        C=C, loss="squared_hinge", penalty="l2", dual=False, tol=1e-8, max_iter=100_000, intercept_scaling=100
    ).fit(xs, y)  # a large scaling all but unregularises the bias, as ours
    return ref.coef_.T, ref.intercept_


def _primal(xs: np.ndarray, y: np.ndarray, C: float, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """LinearSVC's objective, per class."""
    t = np.where(y[:, None] == np.arange(w.shape[1]), 1.0, -1.0)
    margin = np.clip(1 - t * (xs @ w + b), 0, None)
    return 0.5 * (w**2).sum(0) + C * (margin**2).sum(0)


def _pixels(n: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_labelled_images(CIFAR / "train.parquet", limit=n, seed=3)
    return cifar.pixel_features(images[:, ::4, ::4]), labels  # 192-d: real, correlated features


@pytest.mark.parametrize("low_precision", [False, True], ids=["fp32", "bf16 Hessian"])
def test_every_c_of_one_batched_solve_reaches_liblinears_optimum(low_precision: bool) -> None:
    """Also with the Hessian products in bfloat16: only the steps are approximate, not the optimum."""
    x, y = _pixels(400)
    xs = to_device_float32(x, np.arange(len(x)), "cpu")
    standardise_(xs, len(xs))
    Cs = [1e-4, 1e-3, 1e-2]
    problem = SvmProblem(xs, torch.from_numpy(y), 10, rank=64, low_precision=low_precision)
    assert problem.xh.dtype == (torch.bfloat16 if low_precision else torch.float32)
    w, b = problem.solve(Cs)  # 30 columns in one Newton-CG
    xn = xs.numpy().astype(np.float64)
    for i, C in enumerate(Cs):
        ours = _primal(xn, y, C, w[:, i * 10 : (i + 1) * 10].numpy(), b[i * 10 : (i + 1) * 10].numpy())
        ref = _primal(xn, y, C, *_liblinear(xn, y, C))
        assert np.all(ours <= ref * (1 + 1e-4)), (C, ours / ref - 1)


def test_refit_equals_a_fresh_fit_at_the_chosen_c() -> None:
    x, y = _pixels(400)
    model, scores = select_and_fit(x, y, grid=(1e-4, 1e-3, 1e-2))
    fresh = fit_svm(x, y, model.C)
    assert np.allclose(model.decision(x[:50]), fresh.decision(x[:50]), atol=1e-3)
    assert model.accuracy(x, y) == fresh.accuracy(x, y)


def test_choose_c_prefers_interior_values_on_ties() -> None:
    assert choose_c({1e-3: 0.5, 1e-2: 0.7, 1e-1: 0.6}) == 1e-2
    assert choose_c({1e-3: 0.5, 1e-2: 0.5, 1e-1: 0.5}) == 1e-2  # a plateau is interior, not an end
    assert choose_c({1e-3: 0.8, 1e-2: 0.7}) == 1e-3


def test_grid_extends_until_the_chosen_c_is_interior_or_says_it_hit_an_end(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 300)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=400) > 0).astype(int)  # one useful feature, 299 of noise
    model, scores = select_and_fit(x, y, grid=(0.1, 1.0), extensions=2)  # the best C is the grid's top
    assert max(scores) > 1.0 and model.grid_end is None and min(scores) < model.C < max(scores)
    with caplog.at_level(logging.WARNING, logger="dcgan"):
        model, scores = select_and_fit(x, y, grid=(0.1, 1.0), extensions=0)
    assert set(scores) == {0.1, 1.0} and model.grid_end == "high" and "at the high end" in caplog.text


def test_constant_and_all_zero_features_give_clear_results() -> None:
    x, y = _pixels(300)
    x = x.astype(np.float32)
    with_const = np.concatenate([x, np.full((len(x), 5), 7.0, np.float32)], 1)
    a, b = fit_svm(x, y, 1e-3), fit_svm(with_const, y, 1e-3)
    assert torch.isfinite(b.weight).all() and np.array_equal(a.predict(x), b.predict(with_const))
    assert torch.all(b.weight[-5:] == 0)
    zeros = np.zeros((len(y), 20), np.float16)
    model, scores = select_and_fit(zeros, y)
    majority = np.bincount(y).max() / len(y)
    assert torch.isfinite(model.weight).all() and torch.isfinite(model.bias).all()
    assert len(set(model.predict(zeros))) == 1 and model.accuracy(zeros, y) == pytest.approx(majority)
    assert all(np.isfinite(v) for v in scores.values())


def test_bad_c_grids_are_user_errors_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_work(*_a: object, **_k: object) -> None:
        raise AssertionError("work started before the C grid was checked")

    monkeypatch.setattr(cifar, "load_labelled_images", no_work)
    for grid in ((0.0, 1.0), (-1e-3,), (), (float("inf"),), ("x",)):
        with pytest.raises(EvaluationError, match="C grid"):
            cifar10_protocol(None, None, CIFAR, 32, c_grid=grid)  # type: ignore[arg-type]
    with pytest.raises(EvaluationError, match="C grid"):
        svhn_protocol(
            no_work, (np.zeros((5, 32, 32, 3)), np.zeros(5)), (np.zeros((5, 32, 32, 3)), np.zeros(5)), c_grid=(0,)
        )
    assert issubclass(EvaluationError, UserError) and check_c_grid([1.0, 1e-3]) == (1e-3, 1.0)


def test_limit_train_beyond_the_table_is_a_user_error_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cifar, "load_labelled_images", lambda *a, **k: pytest.fail("decoded before the check"))
    with pytest.raises(EvaluationError, match=r"--limit-train 50001 is outside 1\.\.50000"):
        cifar10_protocol(None, None, CIFAR, 32, limit_train=50_001)  # type: ignore[arg-type]
    with pytest.raises(EvaluationError, match=r"--limit-test 0 is outside"):
        cifar10_protocol(None, None, CIFAR, 32, limit_test=0)  # type: ignore[arg-type]


def test_nan_features_are_refused() -> None:
    train = (np.zeros((40, 32, 32, 3), np.uint8), np.arange(40) % 2)

    def broken(images: np.ndarray, _label: str) -> np.ndarray:
        return np.full((len(images), 8), np.nan, np.float16)

    with pytest.raises(EvaluationError, match="NaN or inf"):
        svm_protocol(train, train, broken, name="trained_D")


def test_features_and_c_grid_report_progress_in_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    train = load_labelled_images(CIFAR / "train.parquet", limit=200)
    test = load_labelled_images(CIFAR / "test.parquet", limit=100)
    torch.manual_seed(0)
    D = Discriminator(32, ndf=4)
    with caplog.at_level(logging.INFO, logger="dcgan"):
        r = svm_protocol(
            train,
            test,
            lambda x, label: extract_features(D, x, batch=64, progress=label),
            name="trained_D",
            c_grid=(1e-3, 1e-2),
        )
    text = caplog.text
    assert "trained_D of 200 training images: done, 200 images" in text
    assert "C=0.001 validation accuracy" in text and "ETA" in text and "refit on 200 images" in text
    assert 0.1 <= r["test_accuracy"] <= 1 and set(r["validation_accuracy"]) <= {str(c) for c in (1e-4, 1e-3, 1e-2, 0.1)}


def test_bf16_features_stay_close_to_fp32_and_bad_precisions_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    images, _ = load_labelled_images(CIFAR / "test.parquet", limit=64)
    torch.manual_seed(0)
    D = Discriminator(32, ndf=8)
    exact = extract_features(D, images, precision="fp32").astype(np.float32)
    fast = extract_features(D, images, precision="bf16").astype(np.float32)
    error = np.linalg.norm(fast - exact) / np.linalg.norm(exact)
    assert 0 < error < 0.02, error  # bfloat16 ran (not bit-equal) and is within its rounding
    assert use_bfloat16("fp32", "cpu") is False and use_bfloat16("bf16", "cpu") is True
    assert use_bfloat16("auto", "cuda") is True  # a GPU never needs the timing
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        use_bfloat16("fp16", "cpu")
    monkeypatch.setattr(cifar, "load_labelled_images", lambda *a, **k: pytest.fail("decoded before the check"))
    with pytest.raises(EvaluationError, match="precision"):
        cifar10_protocol(None, None, CIFAR, 32, precision="half")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="precision"):
        EvaluateSettings(precision="half")


def test_progress_eta_follows_the_latest_step_when_steps_grow_dearer(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: clock[0])
    mean, last = Progress("mean", 5), Progress("last", 5, pace="last")
    for seconds in (1.0, 2.0, 4.0):  # each C costs more than the one before
        clock[0] += seconds
        mean.update(1)
        last.update(1)
    assert mean.eta() == pytest.approx(7 / 3 * 2) and last.eta() == pytest.approx(4 * 2)
    with pytest.raises(ValueError, match="pace"):
        Progress("x", 1, pace="median")
