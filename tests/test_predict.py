"""``anomalyclip predict`` and ``inference.inspect`` on real files with a tiny random model."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalyclip.inputs import gather_images, read_image_csv
from anomalyclip.inspection.records import CSV_FIELDS
from anomalyclip.inspection.run import inspect, iter_predictions, output_names
from anomalyclip.methods.anomalyclip.model import AnomalyCLIP
from tests.factories import tiny_clip
from tests.helpers import (
    IMAGE_SIZE,
    cli,
    copy_tiles,
    model_arguments,
    tiny_config,
    write_tiny_model,
)


@pytest.fixture(scope="module")
def tiny_model_files(tmp_path_factory) -> tuple[Path, Path, AnomalyCLIP]:
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture
def tile_folder(tmp_path, shared_dir) -> Path:
    """8 good and 2 cracked tiles, a good tile's twin with the same name in another
    folder, and a corrupt JPEG."""
    root = tmp_path / "inputs"
    copy_tiles(shared_dir, root, {"good": 8, "crack": 2})
    first_good = sorted((root / "good").iterdir())[0]
    (root / "line2").mkdir()
    shutil.copy(first_good, root / "line2" / first_good.name)
    (root / "good" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return root


def test_predict_writes_every_output_and_skips_the_corrupt_file(
    tmp_path, tile_folder, tiny_model_files, caplog
):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        code = cli(
            "predict",
            tile_folder,
            *model_arguments(tiny_model_files),
            "--output-dir",
            out,
            "--save-maps",
            out / "maps",
            "--threshold",
            "0.5",
            "--pixel-threshold",
            "2.0",
            "--batch-size",
            "4",
            "--no-progress",
        )
    assert code == 0
    corrupt = str(tile_folder / "good" / "corrupt.jpg")
    assert "skipped 1 unreadable inputs" in caplog.text
    assert f"{corrupt}: corrupt or truncated image (Truncated File Read)" in caplog.text

    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 11
    assert corrupt not in {r["image"] for r in records}
    for item in records:
        assert 0.0 <= item["score"] <= 1.0
        assert item["anomalous"] == (item["score"] >= 0.5)
        assert item["image_threshold"] == 0.5

    with (out / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_FIELDS
    assert [r["image"] for r in rows] == [r["image"] for r in records]
    assert [float(r["score"]) for r in rows] == pytest.approx([r["score"] for r in records])
    assert {r["anomalous"] for r in rows} <= {"true", "false"}

    # Overlays and masks at each original's resolution; the twin files do not collide.
    overlays = sorted(p.relative_to(out).as_posix() for p in (out / "overlays").iterdir())
    assert len(overlays) == 11 and len(set(overlays)) == 11
    twin = sorted((tile_folder / "line2").iterdir())[0].stem
    assert f"overlays/good__{twin}.png" in overlays and f"overlays/line2__{twin}.png" in overlays
    for item in records:
        with Image.open(item["image"]) as original:
            size = original.size
        with Image.open(out / item["overlay"]) as shown:
            assert shown.size == size and shown.mode == "RGB"
        with Image.open(out / item["mask"]) as mask:
            assert mask.size == size and mask.mode == "L"
            values = np.asarray(mask)
        assert set(np.unique(values)) <= {0, 255}
        assert (values == 255).mean() == pytest.approx(item["defect_fraction"])
        saved = np.load(out / item["map"])
        assert saved.dtype == np.float32 and saved.shape == (IMAGE_SIZE, IMAGE_SIZE)
        assert float(saved.max()) == pytest.approx(item["map_max"])
        assert (out / item["thumbnail"]).is_file()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"] == 12 and summary["scored"] == 11
    assert summary["skipped"] == [
        {"image": corrupt, "reason": "corrupt or truncated image (Truncated File Read)"}
    ]
    assert summary["image_threshold"] == 0.5 and summary["image_threshold_source"] == "given"
    assert summary["pixel_threshold"] == 2.0 and summary["pixel_threshold_source"] == "given"
    assert summary["anomalous"] == sum(r["anomalous"] for r in records)

    report = (out / "report.html").read_text(encoding="utf-8")
    assert report.count('<figure class="card') == 11
    assert "corrupt.jpg</code>: corrupt or truncated image" in report
    for item in records:
        assert f'src="{item["thumbnail"]}"' in report


def test_predict_scores_equal_the_model_in_any_batching(tmp_path, tile_folder, tiny_model_files):
    *_, model = tiny_model_files
    output = tmp_path / "scores.jsonl"
    code = cli(
        "predict",
        tile_folder / "good",
        *model_arguments(tiny_model_files),
        "--output",
        output,
        "--batch-size",
        "3",
        "--no-progress",
    )
    assert code == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    images = sorted(p for p in (tile_folder / "good").iterdir() if p.name != "corrupt.jpg")
    assert [r["image"] for r in records] == [str(p) for p in images]
    expected = model.predict(images, batch_size=len(images))
    np.testing.assert_allclose(
        [r["score"] for r in records], [p.score for p in expected], atol=1e-5
    )
    # No threshold anywhere: no verdicts, and --output alone writes nothing else but the
    # settings the results were made with (what --resume holds a continued run to).
    assert all(r["anomalous"] is None for r in records)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "inputs",
        "scores.jsonl",
        "scores.run.json",
    ]


def test_predict_reads_a_csv_list_and_reports_missing_files(
    tmp_path, tile_folder, tiny_model_files
):
    listing = tile_folder / "list.csv"
    good = sorted((tile_folder / "good").glob("exp*.jpg"))[:2]
    rows = [f"good/{p.name}" for p in good] + ["good/not_there.png"]
    listing.write_text("image,comment\n" + "\n".join(f"{r},x" for r in rows) + "\n")
    out = tmp_path / "out"
    code = cli(
        "predict", listing, *model_arguments(tiny_model_files), "--output-dir", out, "--no-progress"
    )
    assert code == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [Path(r["image"]).name for r in records] == [p.name for p in good]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == [
        {"image": str(tile_folder / "good" / "not_there.png"), "reason": "no such file"}
    ]
    # No threshold given or calibrated: no verdicts, no masks (none is invented).
    assert summary["pixel_threshold"] is None and summary["pixel_threshold_source"] is None
    assert summary["image_threshold"] is None and summary["anomalous"] is None
    assert not (out / "masks").exists()
    assert all(r["mask"] is None and r["defect_fraction"] is None for r in records)


def test_predict_with_nothing_readable_fails(tmp_path, tiny_model_files):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    code = cli("predict", bad, *model_arguments(tiny_model_files), "--output", tmp_path / "p.jsonl")
    assert code == 1
    assert (tmp_path / "p.jsonl").read_text() == ""


def test_predict_names_an_input_that_matches_nothing(tmp_path, tiny_model_files, caplog):
    code = cli("predict", tmp_path / "nothing*.png", *model_arguments(tiny_model_files))
    assert code == 2
    assert f"no image files match {tmp_path / 'nothing*.png'}" in caplog.text


def test_gather_images_recurses_globs_and_skips_hidden_and_other_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".cache").mkdir()
    for name in ["a/one.png", "a/b/two.JPG", "a/notes.txt", "a/.hidden.png", ".cache/x.png"]:
        (tmp_path / name).write_bytes(b"x")
    found = gather_images([tmp_path])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/b/two.JPG", "a/one.png"]
    assert gather_images([str(tmp_path / "a" / "*.png"), tmp_path / "a" / "one.png"]) == [
        tmp_path / "a" / "one.png"
    ]
    assert gather_images([tmp_path / "a" / "notes.txt"]) == [tmp_path / "a" / "notes.txt"]
    with pytest.raises(FileNotFoundError, match=r"missing does not exist$"):
        gather_images([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"^no images found in folder .*empty$"):
        gather_images([tmp_path / "empty"])


def test_gather_images_skips_annotation_folders_follows_links_and_keeps_odd_files(tmp_path, caplog):
    """Bugs: masks/ and ground_truth/ were scored as products; linked folders, broken
    links and files without an extension were silently missing."""
    for name in ["good/a.png", "ground_truth/crack/a_mask.png", "Masks/b.png", "other/c.png"]:
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name).write_bytes(b"x")
    (tmp_path / "data" / "good" / "raw_frame").write_bytes(b"x")  # no extension
    (tmp_path / "data" / "good" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "data" / "linked").symlink_to(tmp_path / "data" / "other", target_is_directory=True)
    (tmp_path / "data" / "other" / "loop").symlink_to(tmp_path / "data", target_is_directory=True)
    with caplog.at_level(logging.INFO):
        found = gather_images([tmp_path / "data"])
    names = [p.relative_to(tmp_path / "data").as_posix() for p in found]
    # The linked folder is walked once (under its first name), the loop not at all.
    assert names == ["good/a.png", "good/gone.png", "good/raw_frame", "linked/c.png"]
    assert caplog.text.count("not scoring annotation folders") == 1
    assert "--include-annotations" in caplog.text
    everything = gather_images([tmp_path / "data"], include_annotations=True)
    assert len(everything) == len(found) + 2


def test_csv_lists_need_an_image_column(tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\na.png,good\n")
    with pytest.raises(ValueError, match=r"list.csv: an image list needs a column 'image' "):
        read_image_csv(listing)
    listing.write_text("image,label,mask\nsub/a.png,bad,m/a.png\n,good,\n")
    with pytest.raises(ValueError, match="list.csv, line 3: the 'image' cell is empty"):
        read_image_csv(listing)
    listing.write_text("\ufeffimage,label,mask\nsub/a.png,bad,m/a.png\nb.png,good,\n")
    rows = read_image_csv(listing)
    assert [(r.image, r.label, r.mask) for r in rows] == [
        (tmp_path / "sub/a.png", "bad", tmp_path / "m/a.png"),
        (tmp_path / "b.png", "good", None),
    ]


def test_a_csv_row_with_more_cells_than_the_header_is_named_in_one_line(
    tmp_path, tiny_model_files, caplog
):
    """Bug: the extra cells reached ``str.strip`` as a list: AttributeError, a traceback."""
    listing = tmp_path / "list.csv"
    listing.write_text("image,label\na.png,good\n\nb.png,bad,left edge\n")
    with pytest.raises(ValueError) as raised:
        read_image_csv(listing)
    assert str(raised.value) == f"{listing}, line 4: 3 cells, but the header names 2 columns"
    with caplog.at_level(logging.ERROR):
        code = cli("predict", listing, *model_arguments(tiny_model_files), "--no-progress")
    assert code == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        str(raised.value)
    ]
    assert "Traceback" not in caplog.text
    # Named extra columns are kept (they travel into the results), short rows padded.
    listing.write_text("image,label,line\na.png,good,L1\nb.png\n")
    assert [r.columns for r in read_image_csv(listing)] == [
        {"label": "good", "line": "L1"},
        {"label": "", "line": ""},
    ]


def test_output_names_keep_stems_and_tell_twins_apart():
    names = output_names(
        [
            "/data/line1/good/a.png",
            "/data/line2/good/a.png",
            "/data/line1/good/b.png",
            "/data/line1/good/b.jpg",
            "/data/c.png",
            Image.new("RGB", (2, 2)),
        ]
    )
    assert names == [
        "line1__good__a",
        "line2__good__a",
        "b_png",
        "b_jpg",
        "c",
        "image_00006",
    ]
    assert len(set(output_names([f"/x/{i % 2}/{i % 3}/s.png" for i in range(6)]))) == 6


def test_inspect_from_python_uses_the_calibrated_threshold(tmp_path, shared_dir):
    images = copy_tiles(shared_dir, tmp_path / "in", {"good": 3, "blowhole": 2})
    model = AnomalyCLIP(tiny_clip(), tiny_config(image_threshold=0.45, pixel_threshold=2.5))
    in_memory = Image.open(images[0]).convert("RGB")
    summary = inspect([tmp_path / "in", in_memory], model, progress=False)
    assert summary.image_threshold == 0.45 and summary.image_threshold_source == "calibrated"
    assert summary.pixel_threshold == 2.5 and summary.pixel_threshold_source == "calibrated"
    assert len(summary.results) == 6 and summary.skipped == [] and summary.files == {}
    assert summary.results[-1].image == "<Image>"
    assert summary.results[-1].score == pytest.approx(summary.results[2].score, abs=1e-6)
    for result in summary.results:
        assert result.anomalous == (result.score >= 0.45)
        assert result.prediction is not None and result.prediction.is_anomalous == result.anomalous
        full = result.prediction.map_at_original_size()
        assert full.shape == (result.height, result.width)
        assert float((full >= 2.5).mean()) == pytest.approx(result.defect_fraction)
    assert [r.image for r in summary.anomalous] == [
        r.image for r in summary.results if r.score >= 0.45
    ]


def test_inspect_can_drop_maps_and_iter_predictions_reports_skips(tmp_path, shared_dir):
    images = copy_tiles(shared_dir, tmp_path, {"good": 2})
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    model = AnomalyCLIP(tiny_clip(), tiny_config())
    summary = inspect([*images, broken], model, progress=False, keep_maps=False)
    assert [r.prediction for r in summary.results] == [None, None]
    assert [s.image for s in summary.skipped] == [str(broken)]
    assert summary.skipped[0].reason == "corrupt or truncated image (Truncated File Read)"
    outcomes = list(iter_predictions(model, [broken, *images], batch_size=1, progress=False))
    assert [type(o).__name__ for o in outcomes] == ["SkippedImage", "ScoredImage", "ScoredImage"]
    assert [o.index for o in outcomes[1:]] == [1, 2]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        list(iter_predictions(model, images, batch_size=0))
    # Bad display options fail before any image is scored.
    with pytest.raises(ValueError, match="unknown colour map 'plasma'"):
        inspect(images, model, tmp_path / "out", colormap="plasma")
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 2"):
        inspect(images, model, tmp_path / "out", alpha=2)
    assert not (tmp_path / "out").exists()
    single = inspect(Image.open(images[0]), model, progress=False)
    assert [r.image for r in single.results] == ["<JpegImageFile>"]


def test_a_reused_output_dir_is_refused_unless_overwrite_removes_only_that_run(
    tmp_path, tile_folder, tiny_model_files, caplog
):
    """Bug: stale overlays of an earlier run stayed beside a report listing others."""
    out = tmp_path / "out"
    flags = [*model_arguments(tiny_model_files), "--output-dir", out, "--no-progress"]
    assert cli("predict", tile_folder / "good", *flags, "--pixel-threshold", "1.0") == 0
    first = sorted(p.name for p in (out / "overlays").iterdir())
    (out / "notes.txt").write_text("mine")
    (out / "overlays" / "keep_me.png").write_bytes(b"x")
    with caplog.at_level(logging.ERROR):
        assert cli("predict", tile_folder / "crack", *flags) == 2
    assert "holds the results of an earlier run" in caplog.text and "--overwrite" in caplog.text
    assert sorted(p.name for p in (out / "overlays").iterdir()) == sorted([*first, "keep_me.png"])
    assert cli("predict", tile_folder / "crack", *flags, "--overwrite") == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == sorted([Path(r["overlay"]).name for r in records] + ["keep_me.png"])
    assert not (out / "masks").exists()  # the old masks went, the new run writes none
    assert (out / "notes.txt").read_text() == "mine"


def test_predict_prints_a_short_summary(tmp_path, tile_folder, tiny_model_files, capsys):
    out = tmp_path / "out"
    flags = [*model_arguments(tiny_model_files), "--output-dir", out, "--no-progress"]
    assert cli("predict", tile_folder, *flags, "--threshold", "0.0") == 0
    text = capsys.readouterr().out
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    top = max(records, key=lambda r: r["score"])
    assert text.splitlines()[0] == (
        f"{len(records)} images scored, 1 skipped, {len(records)} anomalous at threshold 0 (given)"
    )
    assert f"  {top['score']:.4f}  anomalous  {top['image']}" in text
    assert text.count("  anomalous  ") == 5
    assert f"report: {out / 'report.html'}" in text


def test_a_flag_typo_gets_a_suggestion(capsys):
    """Issue 24: ``--tile-szie`` was refused with no hint of ``--tile-size``."""
    from anomalyclip.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["predict", "part.png", "--tile-szie", "460"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "unrecognized arguments: --tile-szie 460" in error
    assert "--tile-szie: did you mean --tile-size?" in error


def test_a_missing_input_says_it_does_not_exist(tmp_path, caplog):
    """Issue 24: a mistyped path said "no images found", as if the folder were empty."""
    code = cli("predict", tmp_path / "bsdata" / "mixd", "--method", "musc")
    assert code == 2
    assert f"{tmp_path / 'bsdata' / 'mixd'} does not exist" in caplog.text


def test_refusals_known_from_the_arguments_come_before_weights_load(tmp_path, monkeypatch, caplog):
    """Issue 24: a one-image MuSc set and an existing output folder were refused only
    after the weights had loaded (minutes on a CPU)."""
    import anomalyclip.methods.assemble as assembly

    def loading(spec):
        raise AssertionError("weights loaded before the arguments were checked")

    monkeypatch.setattr(assembly, "assemble", loading)
    image = tmp_path / "part.png"
    Image.new("RGB", (32, 32)).save(image)
    assert cli("predict", image, "--method", "musc", "--output-dir", tmp_path / "o") == 2
    assert "--method musc scores the images given against each other; 1 image" in caplog.text
    used = tmp_path / "used"
    used.mkdir()
    (used / "summary.json").write_text("{}")
    caplog.clear()
    other = tmp_path / "part_2.png"
    Image.new("RGB", (32, 32)).save(other)
    assert cli("predict", image, other, "--method", "musc", "--output-dir", used) == 2
    assert f"{used} holds the results of an earlier run (summary.json" in caplog.text


def test_overlays_of_large_photos_default_to_a_bounded_jpeg(tmp_path):
    """Issue 24: a 120 MP JPEG got a 75 MB full-size PNG overlay (3.6 GB peak)."""
    from anomalyclip.inspection.files import OverlayStyle, write_images
    from anomalyclip.inspection.records import InspectionResult
    from anomalyclip.predictor import AnomalyPrediction
    from anomalyclip.preprocess import PreProcessor

    style = OverlayStyle()
    assert style.size_for((12_000, 10_000)) == (4096, 3413)  # 120 MP
    assert style.format_for((12_000, 10_000)) == "jpeg"
    assert style.format_for((640, 640)) == "png"  # small images stay exact
    photo = Image.new("RGB", (5000, 2000), (90, 90, 90))
    anomaly_map = np.zeros((32, 32), dtype=np.float32)
    prediction = AnomalyPrediction("photo.jpg", 0.3, anomaly_map, photo.size, PreProcessor(32))
    result = InspectionResult("photo.jpg", "photo", 0.3, None, 5000, 2000, 0.0, None)
    for folder in ("overlays", "thumbnails"):
        (tmp_path / folder).mkdir()
    write_images(tmp_path, result, photo, prediction, style)
    assert result.overlay == "overlays/photo.jpg"
    with Image.open(tmp_path / result.overlay) as shown:
        assert (shown.format, shown.size) == ("JPEG", (4096, 1638))


def test_a_csv_list_is_read_once_for_images_and_columns(tmp_path, monkeypatch):
    """``inspect("list.csv")`` (the Python API) takes the images and their other cells
    from one reading of the list."""
    import anomalyclip.inputs
    from anomalyclip.inputs import expand_inputs

    listing = tmp_path / "list.csv"
    listing.write_text("image,line\na.png,L1\nb.png,L2\n")
    read: list[str] = []
    real_read = anomalyclip.inputs.read_image_csv
    monkeypatch.setattr(
        anomalyclip.inputs, "read_image_csv", lambda path: read.append(str(path)) or real_read(path)
    )
    items, columns = expand_inputs([listing, tmp_path / "c.png"])
    assert items == [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]
    assert columns == {tmp_path / "a.png": {"line": "L1"}, tmp_path / "b.png": {"line": "L2"}}
    assert read == [str(listing)]
