"""What ``predict`` writes for people: the input CSV's own columns beside the scores,
captions that say which folder an image came from, and compact overlays of big images."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalyclip.inspection.report import captions
from tests.helpers import cli, copy_tiles, model_arguments, write_tiny_model


@pytest.fixture(scope="module")
def tiny_model_files(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def test_the_input_csvs_other_columns_travel_into_the_results(
    tmp_path, shared_dir, tiny_model_files, monkeypatch
):
    import anomalyclip.inputs

    read: list[str] = []
    real_read = anomalyclip.inputs.read_image_csv

    def counted(path):
        read.append(Path(path).name)
        return real_read(path)

    monkeypatch.setattr(anomalyclip.inputs, "read_image_csv", counted)
    images = copy_tiles(shared_dir, tmp_path / "in", {"good": 2, "crack": 1})
    listing = tmp_path / "in" / "list.csv"
    rows = [(p.relative_to(tmp_path / "in").as_posix(), p.parent.name) for p in images]
    listing.write_text(
        "image,label,line,score\n"
        + "".join(f"{name},{label},L{i},manual\n" for i, (name, label) in enumerate(rows))
    )
    out = tmp_path / "out"
    assert (
        cli(
            "predict",
            listing,
            *model_arguments(tiny_model_files),
            "--output-dir",
            out,
            "--no-progress",
        )
        == 0
    )
    assert read == ["list.csv"]  # the list read once, for its images and columns alike
    with (out / "predictions.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [row["label"] for row in table] == [label for _, label in rows]
    assert [row["line"] for row in table] == ["L0", "L1", "L2"]
    assert all(row["score"] != "manual" for row in table)  # our score wins a clash
    header = (out / "predictions.csv").read_text().splitlines()[0].split(",")
    assert header[-2:] == ["label", "line"]
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["line"] for r in records] == ["L0", "L1", "L2"]
    # the report names each image by its folder too
    report = (out / "report.html").read_text()
    assert "crack/" + images[2].name in report and "good/" + images[0].name in report


def test_captions_are_relative_to_the_shared_folder():
    assert captions(["data/good/1.png", "data/crack/2.png"]) == {
        "data/good/1.png": "good/1.png",
        "data/crack/2.png": "crack/2.png",
    }
    assert captions(["line/a.png", "line/b.png"]) == {"line/a.png": "a.png", "line/b.png": "b.png"}
    assert captions(["<memory>", "x/a.png"]) == {"<memory>": "<memory>", "x/a.png": "x/a.png"}


def test_overlays_as_jpeg_scaled_down_masks_at_full_size(tmp_path, tiny_model_files):
    rng = np.random.default_rng(0)
    big = tmp_path / "in" / "wide.png"
    big.parent.mkdir()
    Image.fromarray(rng.integers(0, 255, (300, 900, 3), dtype=np.uint8)).save(big)
    out = tmp_path / "out"
    arguments = [*model_arguments(tiny_model_files), "--pixel-threshold", "0.5", "--no-progress"]
    code = cli(
        "predict",
        big,
        *arguments,
        "--output-dir",
        out,
        "--overlay-format",
        "jpeg",
        "--overlay-max-side",
        "450",
    )
    assert code == 0
    (record,) = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert record["overlay"] == "overlays/wide.jpg"
    with Image.open(out / record["overlay"]) as overlay:
        assert (overlay.format, overlay.size) == ("JPEG", (450, 150))
    with Image.open(out / record["mask"]) as mask:
        assert mask.size == (900, 300)
    # --overwrite removes the earlier run's JPEG overlays too
    assert cli("predict", big, *arguments, "--output-dir", out, "--overwrite") == 0
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["wide.png"]


def test_record_fields_name_every_field_of_a_record():
    from anomalyclip.inspection.records import RECORD_FIELDS, InspectionResult

    result = InspectionResult("a.png", "a", 0.5, None, 4, 3, 1.0, None, columns={"line": "L1"})
    assert set(result.to_record()) == RECORD_FIELDS | {"line"}


FORMULAS = ["=HYPERLINK(1)", "+cmd", "-2+3", "@SUM(1)"]


def test_cells_a_spreadsheet_would_run_are_written_as_text(tmp_path, tiny_model_files, monkeypatch):
    """CSV injection: file names and manifest columns beginning with = + - @ (or a tab or a
    carriage return) are written with a leading ' (OWASP); numbers stay numbers."""
    folder = tmp_path / "in"
    folder.mkdir()
    labels = ["=1+1", "@x", "-cmd", "+y"]
    numbers = ["-0.5", "1e-3", "-3", "ok"]
    for i, name in enumerate(FORMULAS):
        Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(folder / f"{name}.png")
    listing = folder / "list.csv"
    with listing.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "number"])
        writer.writerows(zip([f"{n}.png" for n in FORMULAS], labels, numbers, strict=True))
    monkeypatch.chdir(folder)
    out = tmp_path / "out"
    arguments = [*model_arguments(tiny_model_files), "--output-dir", out, "--no-progress"]
    assert cli("predict", "list.csv", *arguments) == 0
    with (out / "predictions.csv").open(newline="") as handle:
        table = list(csv.reader(handle))
    cells = [cell for row in table[1:] for cell in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "@", "\t", "\r")], cells
    assert not [c for c in cells if c.startswith("-") and c not in ("-0.5", "-3")], cells
    header = table[0]
    rows = [dict(zip(header, row, strict=True)) for row in table[1:]]
    assert sorted(r["image"] for r in rows) == sorted(f"'{n}.png" for n in FORMULAS)
    assert sorted(r["label"] for r in rows) == sorted("'" + label for label in labels)
    assert sorted(r["number"] for r in rows) == sorted(numbers)  # numbers untouched
    assert all(float(r["score"]) >= 0 for r in rows)


def test_test_tables_write_formula_cells_as_text():
    from anomalyclip.evaluation.tables import records_to_csv

    table = records_to_csv(
        [
            {"image": "=HYPERLINK(1).png", "class": "@x", "score": -0.5, "defect": "-2+3"},
            {"image": "a.png", "class": "+cmd", "score": 0.25, "defect": "-1.5e-3"},
            {"image": "\tb.png", "class": "\tc", "score": 1, "defect": "ok"},
        ]
    )
    rows = list(csv.DictReader(io.StringIO(table, newline="")))
    assert [r["image"] for r in rows] == ["'=HYPERLINK(1).png", "a.png", "'\tb.png"]
    assert [r["class"] for r in rows] == ["'@x", "'+cmd", "'\tc"]
    assert [r["score"] for r in rows] == ["-0.5", "0.25", "1"]
    assert [r["defect"] for r in rows] == ["'-2+3", "-1.5e-3", "ok"]
    from anomalyclip.utils.csv_cells import csv_cell

    assert [csv_cell(v) for v in ("\rx", "-inf", "+1.5", -2, None)] == [
        "'\rx",
        "-inf",
        "+1.5",
        -2,
        None,
    ]


def test_a_large_image_costs_about_its_pixels_once(tmp_path, tiny_model_files):
    """An 8,000 x 8,000 PNG (192 MB decoded): before, 2.15 GB peak and 12 s (a copy from
    EXIF handling without a turn to make, the overlay's colour arrays at full size, int64
    temporaries for the mask); now overlays are drawn at most 4,096 px on a side, the mask
    is still full size, and the peak about 1.3 GB (torch and the model included)."""
    from tests.test_hostile_checkpoints import peak_of_cli

    big = tmp_path / "big.png"
    Image.new("RGB", (8000, 8000), (90, 120, 60)).save(big, compress_level=1)
    out = tmp_path / "out"
    arguments = [*model_arguments(tiny_model_files), "--output-dir", out, "--no-progress"]
    code, errors, peak_mb = peak_of_cli("predict", big, *arguments, "--pixel-threshold", "0.5")
    assert code == 0, errors
    assert peak_mb < 1700, peak_mb
    (overlay_file,) = (out / "overlays").glob("big.*")  # JPEG: a photo over 4 MP
    with Image.open(overlay_file) as overlay:
        assert overlay.size == (4096, 4096)  # the default --overlay-max-side
    with Image.open(out / "masks" / "big.png") as mask:
        assert mask.size == (8000, 8000)
