"""Evaluation: D features, the L2-SVM, the CIFAR-10 protocol and the evaluate command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SHARED
from pydantic import ValidationError

from dcgan.checkpoint import CheckpointError
from dcgan.evaluation.cifar import EvaluationError, cifar10_protocol, load_labelled_images, seeded
from dcgan.evaluation.features import conv_outputs, extract_features, feature_size
from dcgan.evaluation.runs import load_run
from dcgan.evaluation.svm import fit_svm, select_and_fit
from dcgan.models import Discriminator, ImageNetDiscriminator32
from dcgan.settings import EvaluateSettings
from dcgan.train import TrainConfig, train

CIFAR = SHARED / "data" / "cifar10"


def test_paper_imagenet_discriminator_gives_28672_features() -> None:
    D = ImageNetDiscriminator32()
    assert feature_size(D, 32) == 28_672  # (128+128+256+256+512+512) x 4 x 4, as in the paper
    assert len(conv_outputs(D)) == 6 and D(torch.zeros(2, 3, 32, 32)).shape == (2,)
    assert feature_size(Discriminator(32), 32) == (64 + 128 + 256) * 16


def test_features_are_max_pooled_activations_of_each_layer() -> None:
    torch.manual_seed(0)
    D = Discriminator(32, ndf=4).eval()
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    feats = extract_features(D, images, batch=2)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        first = D.main[1](D.main[0](x))  # conv + LeakyReLU: the first layer's representation
    expected = torch.nn.functional.adaptive_max_pool2d(first, 4).flatten(1)
    assert feats.dtype == np.float16 and feats.shape == (3, (4 + 8 + 16) * 16)
    assert np.allclose(feats[:, : 4 * 16], expected.numpy(), atol=2e-3)


def test_l2svm_reaches_liblinears_optimum() -> None:
    from sklearn.svm import LinearSVC

    rng = np.random.default_rng(0)
    x = rng.normal(size=(1500, 40)).astype(np.float32)
    y = (x @ rng.normal(size=(40, 4)) + rng.normal(size=(1500, 4))).argmax(1)
    ours = fit_svm(x, y, 1.0)
    xs = (x - x.mean(0)) / x.std(0)
    ref = LinearSVC(
        C=1.0, loss="squared_hinge", penalty="l2", dual=False, tol=1e-8, max_iter=100_000, intercept_scaling=100
    ).fit(xs, y)  # a large scaling all but unregularises the bias, as ours

    def primal(w: np.ndarray, b: np.ndarray) -> np.ndarray:  # LinearSVC's objective, per class
        t = np.where(y[:, None] == np.arange(4), 1.0, -1.0)
        margin = np.clip(1 - t * (xs @ w + b), 0, None)
        return 0.5 * (w**2).sum(0) + (margin**2).sum(0)

    assert np.all(primal(ours.weight.numpy(), ours.bias.numpy()) <= primal(ref.coef_.T, ref.intercept_) * (1 + 1e-4))
    assert abs(ours.accuracy(x, y) - ref.score(xs, y)) < 0.01


def test_svm_selects_c_on_held_out_data_and_refuses_one_class() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 10)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int)
    model, scores = select_and_fit(x, y, grid=(1e-3, 1.0), extensions=0)
    assert set(scores) == {1e-3, 1.0} and model.C in scores and model.accuracy(x, y) > 0.95
    with pytest.raises(ValueError, match="two classes"):
        fit_svm(x, np.zeros(400), 1.0)


def test_cifar_tables_load_and_bad_tables_are_clear_errors(tmp_path: Path) -> None:
    images, labels = load_labelled_images(CIFAR / "test.parquet", limit=50)
    assert images.shape == (50, 32, 32, 3) and images.dtype == np.uint8 and set(labels) <= set(range(10))
    pq.write_table(pa.table({"key": ["a"], "image": [b"x"]}), tmp_path / "nolabel.parquet")
    with pytest.raises(EvaluationError, match=r"lacks column\(s\) \['label'\]"):
        load_labelled_images(tmp_path / "nolabel.parquet")
    with pytest.raises(EvaluationError, match="not found"):
        load_labelled_images(tmp_path / "missing.parquet")


@pytest.fixture(scope="module")
def tiny_run(shards_dir: Path) -> Path:
    run = shards_dir.parent / "train" / "eval-run"
    if not (run / "checkpoints").exists():
        train(
            TrainConfig(shards=str(shards_dir), run_dir=str(run), steps=2, resolution=32, batch_size=16, ngf=8, ndf=8)
        )
    return run


def test_cifar10_protocol_runs_trained_random_and_pixel_features(tiny_run: Path) -> None:
    cfg, _, D, step = load_run(tiny_run)
    random_d = seeded(load_run(tiny_run)[2], 1)
    assert step == 2 and not torch.equal(random_d.main[0].weight, D.main[0].weight)
    results = cifar10_protocol(D, random_d, CIFAR, 32, limit_train=400, limit_test=200)
    assert set(results) == {"trained_D", "random_D", "raw_pixels"}
    assert results["raw_pixels"]["feature_dim"] == 3072 and results["trained_D"]["feature_dim"] == (8 + 16 + 32) * 16
    for r in results.values():
        assert r["n_train"] == 400 and r["n_test"] == 200 and 0.1 < r["test_accuracy"] <= 1.0  # above chance


def test_run_without_checkpoints_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="holds no checkpoints"):
        load_run(tmp_path)


def test_imagenet32_discriminator_trains_and_is_32px_only(shards_dir: Path, tmp_path: Path) -> None:
    result = train(
        TrainConfig(
            shards=str(shards_dir),
            run_dir=str(tmp_path / "r"),
            steps=1,
            resolution=32,
            batch_size=8,
            ngf=8,
            discriminator="imagenet32",
        )
    )
    assert result["steps"] == 1
    _, _, D, _ = load_run(tmp_path / "r")
    assert isinstance(D, ImageNetDiscriminator32)
    with pytest.raises(ValueError, match="resolution 32"):
        TrainConfig(shards="s", run_dir="r", resolution=64, discriminator="imagenet32")


@pytest.mark.slow
def test_evaluate_cli_writes_metrics_and_report(
    prefect_api: None, tiny_run: Path, fid_weights: Path, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from typer.testing import CliRunner

    from flows.cli import app

    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"samples": [{"index": 4, "boxes": [[0, 0, 16, 32]]}]}))
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["evaluate", "--run", str(tiny_run), "--cifar10", str(CIFAR), "--limit-train", "300", "--limit-test", "100"]
        + ["--inception", str(fid_weights), "--arithmetic", "A=1,2;B=3;C=5,6,7", "--expression", "A-B+C"]
        + ["--boxes", str(boxes)],
    )
    assert result.exit_code == 0, result.output
    out = tiny_run.parent.parent / "eval" / tiny_run.name
    assert f"sample sheet: {out}/figures/sample_sheet.png" in result.output and "FID" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 2 and set(metrics["cifar10"]) == {"trained_D", "random_D", "raw_pixels"}
    assert metrics["samples"]["images"] == 60 and metrics["samples"]["swd"]["mean"] > 0  # all 60 training images
    assert metrics["fid"]["images"] == 60 and metrics["fid"]["fid"] > 0 and "pytorch-fid" in metrics["fid"]["network"]
    assert metrics["arithmetic"]["expression"] == "A - B + C" and metrics["feature_removal"]["annotated_samples"] == [4]
    assert len(metrics["guided_backprop"]["trained_D"]["channels"]) == 6 and metrics["sample_sheet"]["samples"] == 100
    assert np.load(out / "sample_sheet_z.npy").shape == (100, 100)
    report = (out / "report.md").read_text()
    for section in ("CIFAR-10", "Sliced Wasserstein", "Memorisation", "FID and KID", "Sample sheet"):
        assert section in report
    for section in ("guided backpropagation", "Vector arithmetic", "Feature-map removal"):
        assert section in report
    figures = ("samples", "latent_walks", "memorisation", "sample_sheet", "guided_backprop", "vector_arithmetic")
    for name in (*figures, "feature_removal"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000 and f"figures/{name}.png" in report
    with get_client(sync_client=True) as client:
        artifact = client.read_artifacts()
    full = [a for a in artifact if a.key == "eval-eval-run-report"]
    assert full and full[0].data.count("](data:image/") == 7 and len(full[0].data) <= 500_000  # thumbnails

    bad = runner.invoke(app, ["evaluate", "--run", str(tiny_run), "--cifar10", str(tmp_path)])
    assert bad.exit_code == 2 and "train.parquet" in bad.output
    empty = runner.invoke(app, ["evaluate", "--run", str(tmp_path), "--cifar10", str(CIFAR)])
    assert empty.exit_code == 2 and "no checkpoints" in empty.output


@pytest.mark.slow
def test_bad_input_leaves_no_evaluation_behind(prefect_api: None, tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    from typer.testing import CliRunner

    from flows.cli import app
    from flows.evaluate import evaluate_flow

    fresh = tmp_path / "work" / "train" / "fresh"
    shutil.copytree(tiny_run, fresh)
    (tmp_path / "boxes.json").write_text("")
    result = CliRunner().invoke(app, ["evaluate", "--run", str(fresh), "--boxes", str(tmp_path / "boxes.json")])
    assert result.exit_code == 2 and "is empty" in result.output
    with pytest.raises(EvaluationError, match="out of range"):  # the flow checks too, for deployment runs
        evaluate_flow(str(fresh), EvaluateSettings(arithmetic="A=100", expression="A"))
    assert not (tmp_path / "work" / "eval").exists()


def _write_svhn(path: Path, n: int, seed: int) -> None:
    """A small file in the official SVHN format: X (32, 32, 3, N) uint8, y (N, 1) in 1..10 (10 = digit 0)."""
    import scipy.io

    rng = np.random.default_rng(seed)
    y = rng.integers(1, 11, n)
    x = rng.integers(0, 60, (32, 32, 3, n)).astype(np.uint8)
    for i, label in enumerate(y):  # a class-dependent bright square, so features can separate classes
        r, c = divmod(int(label) - 1, 4)
        x[r * 8 : r * 8 + 8, c * 8 : c * 8 + 8, :, i] += 150
    scipy.io.savemat(path, {"X": x, "y": y.reshape(-1, 1)})


def test_svhn_loader_reads_the_official_layout_and_rejects_others(tmp_path: Path) -> None:
    import scipy.io

    from dcgan.evaluation.svhn import load_svhn_mat

    _write_svhn(tmp_path / "train_32x32.mat", 30, 0)
    images, labels = load_svhn_mat(tmp_path / "train_32x32.mat")
    assert images.shape == (30, 32, 32, 3) and set(labels) <= set(range(10))
    raw = scipy.io.loadmat(tmp_path / "train_32x32.mat")
    assert np.array_equal(labels, np.where(raw["y"].ravel() == 10, 0, raw["y"].ravel()))  # 10 means digit 0
    scipy.io.savemat(tmp_path / "wrong.mat", {"images": np.zeros((2, 2))})
    with pytest.raises(EvaluationError, match="lacks the official keys"):
        load_svhn_mat(tmp_path / "wrong.mat")
    (tmp_path / "junk.mat").write_bytes(b"not a mat file")
    with pytest.raises(EvaluationError):
        load_svhn_mat(tmp_path / "junk.mat")


def test_svhn_protocol_draws_balanced_labels_and_reports_spread(tmp_path: Path) -> None:
    from dcgan.evaluation.cifar import pixel_features
    from dcgan.evaluation.svhn import load_svhn_mat, svhn_protocol

    _write_svhn(tmp_path / "train_32x32.mat", 700, 1)
    _write_svhn(tmp_path / "test_32x32.mat", 200, 2)
    train, test = load_svhn_mat(tmp_path / "train_32x32.mat"), load_svhn_mat(tmp_path / "test_32x32.mat")
    r = svhn_protocol(pixel_features, train, test, val_size=200, per_class=20, draws=3)
    assert r["labelled"] == 200 and r["draws"] == 3 and len(r["errors"]) == 3 and r["n_val"] == 200
    assert r["test_error_mean"] < 0.5 and r["test_error_std"] >= 0
    with pytest.raises(EvaluationError, match="too few"):
        svhn_protocol(pixel_features, train, test, val_size=200, per_class=200, draws=1)


@pytest.mark.slow
def test_evaluate_cli_runs_svhn_on_official_files(prefect_api: None, tiny_run: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    _write_svhn(tmp_path / "train_32x32.mat", 11_500, 3)  # the paper's 10,000 validation images + a pool
    _write_svhn(tmp_path / "test_32x32.mat", 300, 4)
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "--run", str(tiny_run), "--svhn", str(tmp_path), "--svhn-draws", "2"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tiny_run.parent.parent / "eval" / tiny_run.name / "metrics.json").read_text())
    assert metrics["svhn"]["draws"] == 2 and metrics["svhn"]["labelled"] == 1000
    assert metrics["svhn"]["n_val"] == 10_000 and 0 <= metrics["svhn"]["test_error_mean"] < 0.9
    (tmp_path / "test_32x32.mat").unlink()
    missing = runner.invoke(app, ["evaluate", "--run", str(tiny_run), "--svhn", str(tmp_path)])
    assert missing.exit_code == 2 and "test_32x32.mat" in missing.output


def test_swd_separates_real_from_noise_and_is_small_between_real_halves() -> None:
    from dcgan.evaluation.quality import laplacian_pyramid, sliced_wasserstein_distance

    images, _ = load_labelled_images(CIFAR / "test.parquet", limit=400)
    noise = np.random.default_rng(0).integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    same = sliced_wasserstein_distance(images[:200], images[200:])
    different = sliced_wasserstein_distance(images[:200], noise)
    assert set(same) == {"32", "16", "mean"} and different["mean"] > 5 * same["mean"]
    levels = laplacian_pyramid(torch.zeros(1, 3, 64, 64))
    assert [lv.shape[-1] for lv in levels] == [64, 32, 16]
    with pytest.raises(ValueError, match="same shape"):
        sliced_wasserstein_distance(images[:10], images[:20])


def test_latent_walks_interpolate_between_endpoints(tiny_run: Path) -> None:
    from dcgan.evaluation.quality import generate, latent_walks

    cfg, G, _, _ = load_run(tiny_run)
    walks = latent_walks(G, cfg["nz"], rows=2, steps=5, seed=3)
    assert walks.shape == (10, 32, 32, 3) and walks.dtype == np.uint8
    g = torch.Generator().manual_seed(3)
    ends = torch.rand(2, 2, cfg["nz"], generator=g) * 2 - 1
    assert np.array_equal(walks[0], generate(G, ends[0, :1])[0]) and np.array_equal(
        walks[4], generate(G, ends[0, 1:])[0]
    )


def test_memorisation_flags_copied_training_images(tiny_run: Path) -> None:
    from dcgan.evaluation.memorisation import memorisation_check, nearest

    _, _, D, _ = load_run(tiny_run)
    images, _ = load_labelled_images(CIFAR / "test.parquet", limit=300)
    reference, held_out = images[:250], images[250:]
    copies = reference[:20].copy()
    noise = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    copied, grid = memorisation_check(copies, reference, held_out, D)
    fresh, _ = memorisation_check(noise, reference, held_out, D)
    assert copied["pixels"]["samples"]["median"] < 0.02  # exact copies: 0 up to float32 rounding (real pairs: ~10)
    assert copied["pixels"]["ratio_of_medians"] < 0.01 < fresh["pixels"]["ratio_of_medians"]
    assert grid.shape == (8 * 4, 32, 32, 3) and np.array_equal(grid[1], reference[0])  # sample, then its neighbours
    d, i = nearest(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), k=2)
    assert i[:, 0].tolist() == [0, 1, 2] and np.allclose(d[:, 0], 0, atol=1e-3)


def test_frechet_distance_is_zero_on_equal_sets_and_grows_with_a_shift() -> None:
    from scipy import linalg

    from dcgan.evaluation.fid import frechet_distance

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    assert abs(frechet_distance(x, x)) < 1e-8 * np.trace(np.cov(x, rowvar=False))
    shifts = [frechet_distance(x, x + s) for s in (0.5, 1.0, 2.0)]
    assert np.allclose(shifts, [16 * s**2 for s in (0.5, 1.0, 2.0)], rtol=1e-6)  # same covariance: ||shift||^2
    y = rng.normal(size=(300, 16)) * 1.5 + 0.3
    s_x, s_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    reference = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s_x + s_y - 2 * linalg.sqrtm(s_x @ s_y).real)
    assert np.isclose(frechet_distance(x, y), reference, rtol=1e-6)  # pytorch-fid's formula
    few_x, few_y = x[:10], y[:12]  # fewer images than dimensions: the nuclear-norm path
    s_x, s_y = np.cov(few_x, rowvar=False), np.cov(few_y, rowvar=False)
    root = linalg.sqrtm(s_x @ s_y + 1e-12 * np.eye(16))
    reference = ((few_x.mean(0) - few_y.mean(0)) ** 2).sum() + np.trace(s_x + s_y - 2 * root.real)
    assert np.isclose(frechet_distance(few_x, few_y), reference, rtol=1e-5)
    assert abs(frechet_distance(few_x, few_x)) < 1e-10 * np.trace(s_x)


def test_kid_is_the_unbiased_mmd_estimate() -> None:
    from dcgan.evaluation.fid import kernel_inception_distance, mmd2_unbiased

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(4, 3))

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (a @ b / 3 + 1) ** 3

    explicit = (
        sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
        + sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / 12
        - 2 * sum(k(a, b) for a in x for b in y) / 20
    )
    assert np.isclose(mmd2_unbiased(x, y), explicit)
    # Equal distributions: the unbiased estimate averages to ~0, while the biased one (with the
    # diagonal kernel terms) stays clearly positive at this subset size.
    a, b = rng.normal(size=(4000, 64)), rng.normal(size=(4000, 64))
    same = kernel_inception_distance(a, b, subsets=50, subset_size=100)

    def biased(p: np.ndarray, q: np.ndarray) -> float:  # the V-statistic: keeps the k(x_i, x_i) terms
        def k(u: np.ndarray, v: np.ndarray) -> np.ndarray:
            return (u @ v.T / 64 + 1) ** 3

        return k(p, p).mean() + k(q, q).mean() - 2 * k(p, q).mean()

    v_statistic = np.mean([biased(a[i : i + 100], b[i : i + 100]) for i in range(0, 4000, 100)])
    assert abs(same["mean"]) < 3 * same["std"] / np.sqrt(50) < 0.1 * v_statistic
    shifted = kernel_inception_distance(a, b + 0.5, subsets=20, subset_size=100)
    assert shifted["mean"] > 10 * abs(same["mean"]) and shifted["subset_size"] == 100


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised network in the layout of pytorch-fid's pt_inception file."""
    from dcgan.evaluation.inception import fid_inception

    torch.manual_seed(0)
    net = fid_inception()
    for m in net.modules():  # init_weights=False leaves tiny default weights; give the features some range
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_weights_load_from_a_local_path_for_fid(fid_weights: Path) -> None:
    from dcgan.evaluation.fid import frechet_distance
    from dcgan.evaluation.inception import FID_NETWORK, load_inception, pool3_features

    net = load_inception(fid_weights)
    assert net.network == FID_NETWORK and len(net.sha256) == 64 and net.path == str(fid_weights)
    images, _ = load_labelled_images(CIFAR / "test.parquet", limit=6)
    feats = pool3_features(net, images, batch=4)
    assert feats.shape == (6, 2048) and np.isfinite(feats).all() and feats.std() > 0
    brighter = pool3_features(net, np.clip(images.astype(int) + 60, 0, 255).astype(np.uint8))
    assert abs(frechet_distance(feats, feats)) < 1e-6 * frechet_distance(feats, brighter)


def test_torchvision_inception_weights_are_recognised_and_bad_files_are_clear_errors(tmp_path: Path) -> None:
    from dcgan.evaluation.inception import TORCHVISION_NETWORK, load_inception, torchvision_inception

    state = torchvision_inception().state_dict()
    torch.save(state, tmp_path / "inception_v3_google.pth")
    assert load_inception(tmp_path / "inception_v3_google.pth").network == TORCHVISION_NETWORK
    with pytest.raises(EvaluationError, match="not found.*nothing is downloaded"):
        load_inception(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not weights")
    with pytest.raises(EvaluationError, match="not a PyTorch weights file"):
        load_inception(tmp_path / "junk.pth")
    torch.save(Discriminator(32, ndf=4).state_dict(), tmp_path / "d.pth")
    with pytest.raises(EvaluationError, match="not an Inception-v3 state dict"):
        load_inception(tmp_path / "d.pth")
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(EvaluationError, match="does not fit the torchvision"):
        load_inception(tmp_path / "partial.pth")


def test_vector_arithmetic_combines_concept_means(tiny_run: Path) -> None:
    from dcgan.evaluation.arithmetic import parse_arithmetic, vector_arithmetic
    from dcgan.evaluation.quality import generate
    from dcgan.evaluation.sample_sheet import SHEET_SIZE, numbered_sheet, sheet_noise

    cfg, G, _, _ = load_run(tiny_run)
    z = sheet_noise(cfg)
    assert z.shape == (SHEET_SIZE, cfg["nz"]) and torch.equal(z, sheet_noise(cfg)) and z.abs().max() <= 1
    sheet = numbered_sheet(generate(G, z))
    assert sheet.shape == (10 * (64 + 14 + 2) + 2, 10 * 66 + 2, 3)  # 10x10 tiles of 64 px under their index
    spec = parse_arithmetic("A=1,5,9; B=2,3,4 ;C=7", " A - B + C", SHEET_SIZE)
    assert spec.concepts == {"A": [1, 5, 9], "B": [2, 3, 4], "C": [7]} and spec.expression == "A - B + C"
    grid, summary = vector_arithmetic(G, z, spec, neighbours=8, noise_scale=0.25)
    assert summary["concepts"] == spec.concepts and summary["neighbours"] == 8
    assert grid.shape == (4 * 80 + 2, 9 * 66 + 2, 3)  # 3 concept rows + the result row, 9 columns
    expected = z[[1, 5, 9]].mean(0) - z[[2, 3, 4]].mean(0) + z[7]
    result_tile = grid[3 * 80 + 2 + 14 : 3 * 80 + 2 + 78, 2:66]
    assert np.array_equal(result_tile, np.kron(generate(G, expected[None])[0], np.ones((2, 2, 1), np.uint8)))


def test_vector_arithmetic_rejects_bad_concepts_and_expressions() -> None:
    from dcgan.evaluation.arithmetic import parse_arithmetic

    cases = {
        ("A=1,100;B=2", "A-B"): "index 100 is out of range",
        ("A=1;B=2", "A-D"): r"unknown concept\(s\) \['D'\]",
        ("A=;B=2", "A-B"): "A has no exemplar indices",
        ("A=1;A=2", "A"): "defined twice",
        ("A=x", "A"): "whole numbers",
        ("A 1", "A"): "NAME=i,j,k",
        ("A=1;B=2", "A*B"): "joined by \\+ and -",
        ("", "A"): "no concepts",
    }
    for (concepts, expression), message in cases.items():
        with pytest.raises(EvaluationError, match=message):
            parse_arithmetic(concepts, expression, 100)


def test_guided_relu_passes_only_positive_gradients_with_the_leaky_slope() -> None:
    from dcgan.evaluation.guided_backprop import GuidedLeakyReLU, guided_copy

    x = torch.tensor([-2.0, -1.0, 1.0, 2.0], requires_grad=True)
    GuidedLeakyReLU(0.2)(x).backward(torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert x.grad.tolist() == pytest.approx([0.2, 0.0, 1.0, 0.0])  # leaky side keeps its slope; negatives clamped
    D = Discriminator(32, ndf=4)
    guided = guided_copy(D)
    assert not any(type(m) is torch.nn.LeakyReLU for m in guided.modules())
    assert any(type(m) is torch.nn.LeakyReLU for m in D.modules())  # the original is untouched


def test_guided_backprop_figure_for_trained_and_random_d(tiny_run: Path) -> None:
    from dcgan.evaluation.guided_backprop import channel_maxima, guided_gradients, trained_vs_random

    _, _, D, _ = load_run(tiny_run)
    images, _ = load_labelled_images(CIFAR / "test.parquet", limit=40)
    figure, summary = trained_vs_random(D, seeded(load_run(tiny_run)[2], 1), images, features=4, per_feature=2)
    assert len(summary["trained_D"]["channels"]) == 4 and summary["images"] == 40
    maxima = channel_maxima(D, images)
    top = summary["trained_D"]["channels"]
    assert maxima.shape == (40, 32) and maxima.mean(0)[top[0]] == maxima.mean(0).max()
    assert figure.shape[0] == 18 + 4 * 80 + 2 and figure.shape[1] == 2 * (4 * 66 + 2) + 12
    grads = guided_gradients(D, images[:3], top[0])
    assert grads.shape == (3, 32, 32, 3) and np.abs(grads).sum() > 0


def test_logistic_regression_weights_the_maps_that_mark_the_boxes_positive() -> None:
    from dcgan.evaluation.feature_removal import fit_logistic

    g = torch.Generator().manual_seed(0)
    inside = torch.rand(2000, generator=g) < 0.2
    x = torch.rand(2000, 6, generator=g)
    x[:, 0] += 2 * inside  # map 0 fires inside boxes, map 1 outside, the rest is noise
    x[:, 1] += 2 * ~inside
    weights, accuracy = fit_logistic(x, inside)
    assert weights[0] > 0 > weights[1] and accuracy > 0.99


def test_feature_map_removal_drops_positive_maps_and_regenerates(tiny_run: Path) -> None:
    from dcgan.evaluation.feature_removal import (
        before_after_grid,
        box_mask,
        feature_map_removal,
        generate_without,
        layer_activations,
    )
    from dcgan.evaluation.quality import generate
    from dcgan.evaluation.sample_sheet import sheet_noise

    cfg, G, _, _ = load_run(tiny_run)
    z = sheet_noise(cfg)
    assert layer_activations(G, z[:2]).shape == (2, 8, 16, 16)  # ngf maps at half resolution feed the output
    mask = box_mask([(0, 0, 8, 16)], 32, 16)
    assert mask.sum() == 4 * 8 and mask[0, 3] and not mask[0, 4]  # cell centres 1, 3, 5, 7 px are inside x < 8
    boxes = {3: [(0.0, 0.0, 16.0, 16.0)], 10: [(4.0, 20.0, 30.0, 32.0), (0.0, 0.0, 6.0, 6.0)]}
    images, summary = feature_map_removal(G, z, boxes, 32)
    assert images["before"].shape == images["after"].shape == (100, 32, 32, 3)
    assert 0 < summary["maps_dropped"] < 8 and summary["positions_inside"] + summary["positions_outside"] == 2 * 256
    assert not np.array_equal(images["before"], images["after"])
    assert np.array_equal(generate_without(G, z, torch.zeros(8, dtype=torch.bool)), generate(G, z))
    grid = before_after_grid(images, summary["annotated_samples"])
    assert grid.shape == (4 * 80 + 2, 10 * 66 + 2, 3)  # 20 samples: before, after, before, after
    first_after = grid[80 + 2 + 14 : 80 + 2 + 78 : 2, 2:66:2]  # row 2, column 1: sample 3 after removal
    assert summary["annotated_samples"] == [3, 10] and np.array_equal(first_after, images["after"][3])
    with pytest.raises(EvaluationError, match="cover every position"):
        feature_map_removal(G, z, {0: [(0.0, 0.0, 32.0, 32.0)]}, 32)


def test_bad_boxes_files_are_clear_errors(tmp_path: Path) -> None:
    from dcgan.evaluation.feature_removal import load_boxes

    good = {"samples": [{"index": 3, "boxes": [[0, 0, 16, 16]]}, {"index": 7, "boxes": [[1.5, 2, 30, 31]]}]}
    (tmp_path / "good.json").write_text(json.dumps(good))
    assert load_boxes(tmp_path / "good.json", 32, 100) == {3: [(0, 0, 16, 16)], 7: [(1.5, 2, 30, 31)]}
    cases = {
        "": "is empty",
        "{not json": "not valid JSON",
        '{"samples": []}': "non-empty list",
        '{"samples": [{"index": 100, "boxes": [[0, 0, 4, 4]]}]}': "index 100 is out of range",
        '{"samples": [{"index": 1, "boxes": [[0, 0, 40, 4]]}]}': "outside the 32x32 image",
        '{"samples": [{"index": 1, "boxes": [[5, 0, 5, 4]]}]}': "outside the 32x32 image or empty",
        '{"samples": [{"index": 1, "boxes": [[0, 0, 4]]}]}': r"must be \[x0, y0, x1, y1\]",
        '{"samples": [{"index": 1, "boxes": []}]}': 'non-empty "boxes"',
        '{"samples": [{"index": 1, "boxes": [[0, 0, 4, 4]]}, {"index": 1, "boxes": [[0, 0, 4, 4]]}]}': "twice",
    }
    for text, message in cases.items():
        (tmp_path / "boxes.json").write_text(text)
        with pytest.raises(EvaluationError, match=message):
            load_boxes(tmp_path / "boxes.json", 32, 100)
    with pytest.raises(EvaluationError, match="not found"):
        load_boxes(tmp_path / "missing.json", 32, 100)


def test_checkpoint_of_another_resolution_is_a_clear_error(tiny_run: Path, tmp_path: Path) -> None:
    from dcgan.checkpoint import list_checkpoints, load_checkpoint

    state = load_checkpoint(list_checkpoints(tiny_run)[-1])
    state["config"] = {**state["config"], "resolution": 64}
    torch.save(state, tmp_path / "step-00000064.pt")
    with pytest.raises(CheckpointError, match=r"not a model of run eval-run: resolution 64 \(run: 32\)"):
        load_run(tiny_run, tmp_path / "step-00000064.pt")
    with pytest.raises(CheckpointError, match="does not hold a model"):  # a run without config.json: weights clash
        load_run(tmp_path, tmp_path / "step-00000064.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_run(tiny_run, tmp_path / "nothing.pt")


def test_every_bad_input_is_rejected_before_anything_is_written(tiny_run: Path, tmp_path: Path) -> None:
    from dcgan.evaluation.inputs import check_inputs

    def rejects(message: str, **inputs: object) -> None:
        paths = {k: str(inputs.pop(k)) for k in ("cifar10", "svhn", "inception") if k in inputs}
        with pytest.raises((EvaluationError, CheckpointError), match=message):
            check_inputs(tiny_run, EvaluateSettings.model_construct(**paths), **inputs)

    ok = check_inputs(tiny_run, EvaluateSettings(arithmetic="A=1;B=2", expression="A-B"))
    assert ok.config["resolution"] == 32 and ok.arithmetic.terms == [(1, "A"), (-1, "B")] and ok.boxes is None
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    for name in ("train.parquet", "test.parquet"):
        pq.write_table(pa.table({"key": ["a"], "image": [b"x"]}), cifar / name)
    rejects(r"train.parquet lacks column\(s\) \['label'\]", cifar10=cifar)
    svhn = tmp_path / "svhn"
    svhn.mkdir()
    _write_svhn(svhn / "train_32x32.mat", 5, 0)
    import scipy.io

    scipy.io.savemat(svhn / "test_32x32.mat", {"images": np.zeros((2, 2))})
    rejects("test_32x32.mat lacks the official keys", svhn=svhn)
    (tmp_path / "boxes.json").write_text("")
    rejects("boxes file .* is empty", boxes=tmp_path / "boxes.json")
    with pytest.raises(ValidationError, match="needs both"):
        EvaluateSettings(arithmetic="A=1")
    rejects("Inception weights not found", inception=tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match="holds no checkpoints"):
        check_inputs(tmp_path, EvaluateSettings())


def _count_load_run(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every load_run of the evaluation code (each module binds its own name), recorded."""
    import dcgan.evaluation.inputs
    import flows.evaluate

    calls: list[tuple] = []

    def spy(*args: object) -> tuple:
        calls.append(args)
        return load_run(*args)

    for module in (flows.evaluate, dcgan.evaluation.inputs):
        monkeypatch.setattr(module, "load_run", spy)
    return calls


def test_tasks_get_copies_of_the_run_loaded_once(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dcgan.evaluation.inputs import check_inputs
    from flows.evaluate import _LOADED, _loaded_once, run_models

    calls = _count_load_run(monkeypatch)
    checked = check_inputs(tiny_run, EvaluateSettings())  # the flow's check loads the run
    run, ckpt = str(tiny_run), str(checked.checkpoint)
    assert checked.checkpoint.name == "step-00000002.pt" and checked.loaded[3] == 2 and len(calls) == 1
    with _loaded_once(run, ckpt, checked.loaded):
        (_, g1, _, step), (_, g2, _, _) = run_models(run, ckpt), run_models(run, ckpt)
        assert len(calls) == 1 and step == 2
        assert g1 is not g2 and torch.equal(g1.main[0].weight, g2.main[0].weight)  # copies: no task sees another's
        with torch.no_grad():
            g1.main[0].weight.zero_()
        assert not torch.equal(run_models(run, ckpt)[1].main[0].weight, g1.main[0].weight)
    assert not _LOADED and len(calls) == 1  # released when the flow run ends
    assert run_models(run, ckpt)[3] == 2 and len(calls) == 2  # outside a flow run: a task loads itself


@pytest.mark.slow
def test_evaluate_flow_loads_the_run_once(
    prefect_api: None, tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from flows.evaluate import _LOADED, evaluate_flow

    run = tmp_path / "work" / "train" / "once"
    shutil.copytree(tiny_run, run)
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"samples": [{"index": 4, "boxes": [[0, 0, 16, 32]]}]}))
    calls = _count_load_run(monkeypatch)
    settings = EvaluateSettings(swd_images=32, guided_images=8, arithmetic="A=1,2;B=3", expression="A-B", device="cpu")
    metrics = evaluate_flow(str(run), settings, boxes=str(boxes))  # six tasks need the models
    assert metrics["step"] == 2 and metrics["feature_removal"]["annotated_samples"] == [4]
    assert "arithmetic" in metrics and (tmp_path / "work" / "eval" / "once" / "metrics.json").is_file()
    assert len(calls) == 1, calls
    assert calls[0][1] is not None and Path(calls[0][1]).name == "step-00000002.pt"  # resolved once, by the flow
    assert not _LOADED


@pytest.mark.slow
def test_an_earlier_checkpoint_is_evaluated_beside_the_run_not_over_it(
    prefect_api: None, tiny_run: Path, tmp_path: Path
) -> None:
    import shutil

    from flows.evaluate import eval_dir_for, evaluate_flow

    run = tmp_path / "work" / "train" / "lengths"
    shutil.copytree(tiny_run, run)
    earlier = run / "checkpoints" / "step-00000001.pt"
    shutil.copy(run / "checkpoints" / "step-00000002.pt", earlier)
    settings = EvaluateSettings(swd_images=32, guided_images=8, device="cpu")
    main = Path(evaluate_flow(str(run), settings)["eval_dir"])
    assert main == tmp_path / "work" / "eval" / "lengths"
    before = {p: p.read_bytes() for p in main.rglob("*") if p.is_file()}
    other = Path(evaluate_flow(str(run), settings, checkpoint=str(earlier))["eval_dir"])
    assert other == tmp_path / "work" / "eval" / "lengths@step-00000001"
    assert (other / "metrics.json").is_file() and (other / "figures" / "samples.png").is_file()
    assert "lengths@step-00000001" in (other / "report.md").read_text()
    assert {p: p.read_bytes() for p in main.rglob("*") if p.is_file()} == before  # the run's evaluation untouched
    assert (tmp_path / "work" / "reports" / "eval-lengths-step-00000001.md").is_file()
    assert eval_dir_for(run, run / "checkpoints" / "step-00000002.pt") == main  # naming the newest is the default
