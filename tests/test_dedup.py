"""Near-duplicate removal: the autoencoder, code grouping, the stage's invariants and bad input."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SHARED, encode
from PIL import Image

from dedup.autoencoder import (
    AEConfig,
    AutoencoderError,
    DenoisingAutoencoder,
    encode_bits,
    load_autoencoder,
    save_autoencoder,
    train_autoencoder,
)
from dedup.settings import DedupSettings
from dedup.stage import DedupError, collect_crops, encode_items, group_items, prepare_autoencoder
from preprocessing.photo_stages import run_photo_stage
from preprocessing.settings import IngestSettings
from preprocessing.sharding import ShardError, build_shards
from preprocessing.tar_shards import iter_samples

INGEST32 = IngestSettings(size=32, max_pixels=8_000_000)
CIFAR_TEST = SHARED / "data" / "cifar10" / "test.parquet"
FAST = DedupSettings(max_epochs=4)


def test_autoencoder_is_3072_128_3072_relu_with_dropout() -> None:
    model = DenoisingAutoencoder()
    assert (model.encoder.in_features, model.encoder.out_features) == (3072, 128)
    assert (model.decoder.in_features, model.decoder.out_features) == (128, 3072)
    code = model.code(torch.rand(5, 3072))
    assert code.shape == (5, 128) and code.min() >= 0
    assert isinstance(model.dropout, torch.nn.Dropout) and model.dropout.p == 0.2


def test_training_stops_on_plateau_and_round_trips(tmp_path: Path) -> None:
    crops = np.random.default_rng(0).integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    model, info = train_autoencoder(crops, AEConfig(max_epochs=40, patience=2, min_improvement=0.5))
    assert len(info["epochs"]) < 40  # a 50% improvement bar is never met twice in a row
    save_autoencoder(model, AEConfig(), info, tmp_path / "ae.pt")
    loaded, ckpt = load_autoencoder(tmp_path / "ae.pt")
    assert ckpt["config"]["max_items"] == 200_000 and "epochs" in ckpt["info"]
    assert np.array_equal(encode_bits(model, crops), encode_bits(loaded, crops))


def test_corrupted_or_foreign_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(AutoencoderError, match="cannot read"):
        load_autoencoder(tmp_path / "junk.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(AutoencoderError, match="not a dcgan-pipeline dedup"):
        load_autoencoder(tmp_path / "other.pt")
    model = DenoisingAutoencoder()
    state = {k: v[:10] if k == "encoder.weight" else v for k, v in model.state_dict().items()}
    torch.save({"format": "dcgan-pipeline-dedup-autoencoder/2", "state": state, "config": {}}, tmp_path / "bad.pt")
    with pytest.raises(AutoencoderError, match="does not hold a 3072-128-3072"):
        load_autoencoder(tmp_path / "bad.pt")
    v1 = {"format": "dcgan-pipeline-dedup-autoencoder/1", "state": model.state_dict(), "config": {}}
    torch.save(v1, tmp_path / "v1.pt")
    with pytest.raises(AutoencoderError, match="older version .* without brightness/contrast normalisation"):
        load_autoencoder(tmp_path / "v1.pt")  # hashed raw crops: its codes would not match today's


def _image_folder(root: Path, images: list[bytes]) -> Path:
    root.mkdir(parents=True)
    for i, data in enumerate(images):
        (root / f"img{i:03d}.png").write_bytes(data)
    return root


@pytest.fixture(scope="module")
def cifar_pngs() -> list[bytes]:
    table = pq.read_table(CIFAR_TEST).slice(0, 120)
    return [encode(Image.open(io.BytesIO(b)).convert("RGB"), "PNG") for b in table["image"].to_pylist()]


def _dedup(work: Path, radius: int = FAST.radius) -> dict:
    collect_crops(work)
    prepare_autoencoder(work, FAST)
    encode_items(work)
    return group_items(work, FAST.model_copy(update={"radius": radius}))


def test_same_file_names_in_two_sources_stay_distinct_and_copies_merge(tmp_path: Path, cifar_pngs: list) -> None:
    settings = INGEST32
    for name in ("site_a", "site_b"):  # identical folders: same names, same pixels
        run_photo_stage(_image_folder(tmp_path / name, cifar_pngs[:40]), tmp_path / "w", name, settings, workers=1)
    run_photo_stage(
        _image_folder(tmp_path / "site_c", cifar_pngs[40:120]), tmp_path / "w", "site_c", settings, workers=1
    )
    summary = _dedup(tmp_path / "w")
    codes = pq.read_table(tmp_path / "w" / "dedup" / "codes.parquet").to_pylist()
    assert len({(r["source"], r["key"]) for r in codes}) == len(codes) == 160  # every ok item exactly once
    by_key = {}
    for r in codes:
        by_key.setdefault((r["key"], r["source"]), r)
    for r in codes:
        if r["source"] == "site_b":
            twin = by_key[(r["key"], "site_a")]
            assert twin["group"] == r["group"] and twin["keep"] != r["keep"]  # copies merge, one kept
    assert summary["removed"] >= 40
    report = (tmp_path / "w" / "dedup" / "report.md").read_text()
    assert "| items hashed | 160 |" in report and (tmp_path / "w" / "dedup" / "collisions.png").exists()

    index = build_shards(tmp_path / "w")
    kept = sorted(f"{r['source']}/{r['key']}" for r in codes if r["keep"])
    shard_keys = sorted(k for tar in (tmp_path / "w" / "shards").glob("*.tar") for k, _ in iter_samples(tar))
    assert shard_keys == kept and index["total"] == len(kept)  # final shards hold exactly the keep items


def test_regrouping_with_another_radius_reuses_the_codes(tmp_path: Path, cifar_pngs: list) -> None:
    run_photo_stage(_image_folder(tmp_path / "p", cifar_pngs), tmp_path / "w", "p", INGEST32, workers=1)
    r0 = _dedup(tmp_path / "w", 0)
    hashes = (tmp_path / "w" / "dedup" / "hashes.parquet").stat().st_mtime_ns
    r8 = group_items(tmp_path / "w", DedupSettings(radius=8))
    assert (tmp_path / "w" / "dedup" / "hashes.parquet").stat().st_mtime_ns == hashes
    assert r8["groups"] <= r0["groups"] and r8["radius"] == 8


def test_all_identical_images_collapse_to_one(tmp_path: Path, cifar_pngs: list) -> None:
    run_photo_stage(
        _image_folder(tmp_path / "same", [cifar_pngs[0]] * 10),
        tmp_path / "w",
        "same",
        INGEST32,
        workers=1,
    )
    summary = _dedup(tmp_path / "w")
    assert summary["groups"] == 1 and summary["removed"] == 9


def test_all_black_images_are_reported_not_silently_merged_with_others(tmp_path: Path, cifar_pngs: list) -> None:
    black = encode(Image.new("RGB", (32, 32)), "PNG")
    run_photo_stage(
        _image_folder(tmp_path / "mix", [black] * 5 + cifar_pngs[:30]),
        tmp_path / "w",
        "mix",
        INGEST32,
        workers=1,
    )
    _dedup(tmp_path / "w")
    codes = pq.read_table(tmp_path / "w" / "dedup" / "codes.parquet").to_pylist()
    manifest = pq.read_table(tmp_path / "w" / "extract" / "mix" / "manifest.parquet").to_pylist()
    black_keys = {r["key"] for r in manifest if r["photo_path"] in {f"img{i:03d}.png" for i in range(5)}}
    black_rows = [r for r in codes if r["key"] in black_keys]
    black_groups = {r["group"] for r in black_rows}
    assert len(black_groups) == 1  # identical black images are one group
    others = [r for r in codes if r["group"] in black_groups and r not in black_rows]
    assert not others  # and nothing else joined them


def test_one_item_and_empty_work_dirs(tmp_path: Path, cifar_pngs: list) -> None:
    with pytest.raises(DedupError, match="no extracted data"):
        collect_crops(tmp_path / "empty")
    run_photo_stage(
        _image_folder(tmp_path / "one", cifar_pngs[:1]),
        tmp_path / "w",
        "one",
        INGEST32,
        workers=1,
    )
    summary = _dedup(tmp_path / "w")
    assert summary == {**summary, "items": 1, "groups": 1, "removed": 0}


def test_stale_dedup_results_stop_sharding(tmp_path: Path, cifar_pngs: list) -> None:
    settings = INGEST32
    run_photo_stage(_image_folder(tmp_path / "p", cifar_pngs[:20]), tmp_path / "w", "p", settings, workers=1)
    _dedup(tmp_path / "w")
    shutil.rmtree(tmp_path / "w" / "extract" / "p")
    run_photo_stage(_image_folder(tmp_path / "p2", cifar_pngs[:25]), tmp_path / "w", "p", settings, workers=1)
    with pytest.raises(ShardError, match="rerun the dedup stage"):
        build_shards(tmp_path / "w")


@pytest.mark.slow
def test_dedup_cli_regroups_without_retraining(prefect_api: None, extracted_work: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    work = tmp_path / "work"
    shutil.copytree(extracted_work, work)
    runner = CliRunner()
    first = runner.invoke(app, ["dedup", "--work", str(work), "--max-epochs", "3"])
    assert first.exit_code == 0, first.output
    ae = (work / "dedup" / "autoencoder.pt").stat().st_mtime_ns
    second = runner.invoke(app, ["dedup", "--work", str(work), "--radius", "6", "--max-epochs", "3"])
    assert second.exit_code == 0, second.output
    assert (work / "dedup" / "autoencoder.pt").stat().st_mtime_ns == ae  # cached: no retraining
    assert "| Hamming radius | 6 |" in (work / "dedup" / "report.md").read_text()
    assert runner.invoke(app, ["dedup", "--work", str(tmp_path / "nothing")]).exit_code == 2


def test_a_grown_set_is_deduplicated_against_what_was_kept(tmp_path: Path, cifar_pngs: list) -> None:
    w = tmp_path / "w"
    run_photo_stage(_image_folder(tmp_path / "old", cifar_pngs[:40]), w, "old", INGEST32, workers=1)
    first = _dedup(w)
    ae = (w / "dedup" / "autoencoder.pt").read_bytes()
    before = pq.read_table(w / "dedup" / "codes.parquet")
    assert not first["incremental"]
    # the new batch: 20 new photos, 5 copies of old ones, and one new photo three times
    batch = cifar_pngs[40:60] + cifar_pngs[:5] + [cifar_pngs[60]] * 3
    run_photo_stage(_image_folder(tmp_path / "new", batch), w, "new", INGEST32, workers=1)
    second = _dedup(w)
    assert (w / "dedup" / "autoencoder.pt").read_bytes() == ae  # the hash is reused, not retrained
    after = pq.read_table(w / "dedup" / "codes.parquet")
    assert after.slice(0, before.num_rows).equals(before)  # no churn: earlier rows, groups and keep flags stay
    assert second["incremental"] and second["new_items"] == 28
    assert second["duplicates_of_existing"] >= 5 and second["duplicates_among_new"] >= 2

    def by_path(source: str) -> dict[str, str]:
        manifest = pq.read_table(w / "extract" / source / "manifest.parquet", columns=["key", "photo_path"])
        return dict(zip(manifest["photo_path"].to_pylist(), manifest["key"].to_pylist(), strict=True))

    old_rows = {r["key"]: r for r in before.to_pylist()}
    new_rows = {r["key"]: r for r in after.slice(before.num_rows).to_pylist()}
    old_key, new_key = by_path("old"), by_path("new")
    for i in range(5):  # img020..img024 of the new batch copy img000..img004 of the old one
        copy, twin = new_rows[new_key[f"img{20 + i:03d}.png"]], old_rows[old_key[f"img{i:03d}.png"]]
        assert twin["keep"] and not copy["keep"] and copy["group"] == twin["group"]
    triple = [new_rows[new_key[f"img{i:03d}.png"]] for i in (25, 26, 27)]
    assert sum(r["keep"] for r in triple) == 1 and len({r["group"] for r in triple}) == 1
    report = (w / "dedup" / "report.md").read_text()
    assert "## This update" in report and (w / "dedup" / "new_vs_existing.png").exists()
    assert len({(r["source"], r["key"]) for r in after.to_pylist()}) == after.num_rows == 68  # each item once

    third = _dedup(w)  # nothing new: the same codes, nothing regrouped differently
    assert pq.read_table(w / "dedup" / "codes.parquet").equals(after) and third["new_items"] == 0


def test_an_incremental_dedup_killed_midway_ends_the_same(tmp_path: Path, cifar_pngs: list) -> None:
    import shutil

    w = tmp_path / "w"
    run_photo_stage(_image_folder(tmp_path / "old", cifar_pngs[:30]), w, "old", INGEST32, workers=1)
    _dedup(w)
    run_photo_stage(_image_folder(tmp_path / "new", cifar_pngs[25:45]), w, "new", INGEST32, workers=1)
    clean = tmp_path / "clean"
    shutil.copytree(w, clean)
    _dedup(clean)
    collect_crops(w)  # killed after collecting (and again after encoding): the rerun picks up from there
    encode_items(w)
    _dedup(w)
    for name in ("codes.parquet", "hashes.parquet", "items.parquet"):
        a, b = pq.read_table(w / "dedup" / name), pq.read_table(clean / "dedup" / name)
        assert a.equals(b), name


def test_a_codes_file_of_an_older_version_is_regrouped_never_reused(tmp_path: Path, cifar_pngs: list) -> None:
    import pyarrow as pa

    w = tmp_path / "w"
    run_photo_stage(_image_folder(tmp_path / "p", cifar_pngs[:30] + cifar_pngs[:5]), w, "p", INGEST32, workers=1)
    _dedup(w)
    fresh = pq.read_table(w / "dedup" / "codes.parquet")
    # what the previous version wrote: no format key, a `degenerate` column, the radius in the metadata
    old = fresh.drop_columns(["low_content", "similarity"]).append_column("degenerate", pa.array([False] * 35))
    old = old.set_column(old.column_names.index("keep"), "keep", pa.array([True] * 35))  # its (other) keep flags
    pq.write_table(old.replace_schema_metadata({"radius": "8"}), w / "dedup" / "codes.parquet")
    summary = group_items(w, FAST)
    again = pq.read_table(w / "dedup" / "codes.parquet")
    assert summary["migrated"] and not summary["incremental"]  # regrouped from scratch, not grown from the old file
    assert again.equals(fresh) and summary["removed"] == 5
    assert "written by an older version" in (w / "dedup" / "report.md").read_text()
    hashes = pq.read_table(w / "dedup" / "hashes.parquet")
    pq.write_table(hashes.replace_schema_metadata({}), w / "dedup" / "hashes.parquet")  # an older version's codes
    with pytest.raises(DedupError, match="older version"):
        group_items(w, FAST)
    encode_items(w)  # re-encodes: the format is not this version's
    assert group_items(w, FAST)["removed"] == 5


def test_all_black_and_all_white_sets_are_two_low_content_groups(tmp_path: Path) -> None:
    black, white = (encode(Image.new("RGB", (32, 32), c), "PNG") for c in ("black", "white"))
    w = tmp_path / "w"
    run_photo_stage(_image_folder(tmp_path / "bw", [black] * 5 + [white] * 5), w, "bw", INGEST32, workers=1)
    summary = _dedup(w)
    codes = pq.read_table(w / "dedup" / "codes.parquet").to_pylist()
    assert summary["groups"] == 2 and summary["low_content"] == 10 and all(r["low_content"] for r in codes)
    assert "low-content items (flat or dark) | 10 |" in (w / "dedup" / "report.md").read_text()


def test_groups_are_stars_every_member_verified_against_its_keeper(tmp_path: Path) -> None:
    """Framings of one photo a few pixels apart chain (each like the next); the stage's groups must not."""
    from conftest import celeba_jpegs

    photos = []
    for data in celeba_jpegs(3, offset=40):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        photos += [encode(img.crop((dx, 20, dx + 140, 160)), "PNG") for dx in range(0, 36, 3)]
    run_photo_stage(_image_folder(tmp_path / "p", photos), tmp_path / "w", "p", INGEST32, workers=1)
    settings = DedupSettings(max_epochs=FAST.max_epochs, radius=12)
    collect_crops(tmp_path / "w")
    checkpoint, _ = prepare_autoencoder(tmp_path / "w", settings)
    encode_items(tmp_path / "w", checkpoint)
    summary = group_items(tmp_path / "w", settings)
    codes = pq.read_table(tmp_path / "w" / "dedup" / "codes.parquet").to_pylist()
    members = [r for r in codes if not r["keep"] and not r["low_content"]]
    assert summary["removed"] >= 6 and members  # framings did merge
    assert all(r["similarity"] >= settings.min_similarity for r in members), sorted(r["similarity"] for r in members)
    keepers = {r["group"] for r in codes if r["keep"]}
    assert len(keepers) == len({r["group"] for r in codes})  # one keeper per group
