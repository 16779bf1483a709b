"""Reference banks from elsewhere: every field checked on load with one line naming the
file and the field, and a bank's identity recomputed from its content, never read from
the file, so a forged bank cannot borrow a calibrated checkpoint's thresholds."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from anomalyclip.cli import main as cli
from anomalyclip.methods.anomalyclip.few_shot import BANK_FORMAT, ReferenceBank
from anomalyclip.methods.references import ReferenceError
from tests.helpers import copy_tiles, model_arguments, write_tiny_model


def bank_record(**changes: Any) -> dict[str, Any]:
    """A well-formed bank of 2 references on a 2 x 2 grid, two layers of width 4."""
    record: dict[str, Any] = {
        "format": BANK_FORMAT,
        "version": 1,
        "patches": {"2": torch.randn(8, 4), "4": torch.randn(8, 4)},
        "grid": [2, 2],
        "count": 2,
        "reference_max": 0.5,
        "identity": {},
        "sources": ["a.png", "b.png"],
        "digest": "whatever the file says",
    }
    record.update(changes)
    return record


HOSTILE = [
    ({"patches": {"2": torch.randn(8, 4)}, "grid": [2]}, r"grid is \[2\], not two positive"),
    ({"patches": {"2": [[0.0] * 4] * 8}}, r"patches\.2 is a list, not a tensor"),
    ({"patches": {"x": torch.randn(8, 4)}}, "patches has a layer named 'x'"),
    ({"patches": {"2": torch.randn(6, 4)}}, r"patches\.2 has shape \(6, 4\); 2 references"),
    ({"patches": {"2": torch.ones(8, 4, dtype=torch.int64)}}, r"patches\.2 holds torch.int64"),
    ({"patches": {"2": torch.ones(8, 4, dtype=torch.bool)}}, r"patches\.2 holds torch.bool"),
    ({"patches": {}}, "patches is not a mapping of layers"),
    ({"identity": ["a"]}, "identity is a list, not a mapping"),
    ({"sources": "a.png"}, "sources is not a list of file names"),
    ({"count": "2"}, "count is '2', not a positive whole number"),
    ({"reference_max": -0.5}, r"reference_max is -0.5, outside the range"),
    ({"reference_max": 0.0}, r"reference_max is 0.0, outside the range"),
    ({"reference_max": 1e-30}, r"reference_max is 1e-30, outside the range"),
    ({"reference_max": 1e30}, r"reference_max is 1e\+30, outside the range"),
    ({"reference_max": [1.0]}, r"reference_max is \[1.0\], not a number"),
]


@pytest.mark.parametrize(("changes", "message"), HOSTILE)
def test_a_malformed_bank_is_refused_naming_the_file_and_the_field(tmp_path, changes, message):
    path = tmp_path / "bank.pt"
    torch.save(bank_record(**changes), path)
    with pytest.raises(ReferenceError, match=f"bank.pt: {message}"):
        ReferenceBank.load(path)


def test_a_malformed_bank_through_the_cli_is_one_line(tmp_path, caplog, capsys):
    files = write_tiny_model(tmp_path / "model")
    path = tmp_path / "bank.pt"
    torch.save(bank_record(reference_max=-3.0), path)
    image = tmp_path / "part.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        code = cli(
            [
                "predict",
                str(image),
                *map(str, model_arguments(files)),
                "--reference",
                str(path),
                "--output",
                str(tmp_path / "o.jsonl"),
            ]
        )
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1
    assert "bank.pt: reference_max is -3.0, outside the range" in errors[0]
    assert "Traceback" not in capsys.readouterr().err


def test_the_digest_is_the_content_not_what_the_file_says(tmp_path):
    path = tmp_path / "bank.pt"
    record = bank_record()
    torch.save(record, path)
    bank = ReferenceBank.load(path)
    assert bank.digest != "whatever the file says"
    record["reference_max"] = 0.25  # another scale is another bank
    torch.save(record, path)
    assert ReferenceBank.load(path).digest != bank.digest
    assert bank.to(torch.float16).digest != bank.digest  # stored otherwise: other content


def test_a_forged_bank_with_the_calibrated_digest_string_is_refused(tmp_path, shared_dir, caplog):
    """The attack: other embeddings and scale, the old digest string copied in; the
    calibrated thresholds then applied (6 defects went from 2 flagged to 0)."""
    files = write_tiny_model(tmp_path / "model")
    copy_tiles(shared_dir, tmp_path / "refs", {"good": 4})
    calibrated = tmp_path / "line3.pt"
    arguments = [*model_arguments(files), "--reference", tmp_path / "refs", "--no-progress"]
    assert cli([str(a) for a in ("calibrate", *arguments, "-o", calibrated)]) == 0
    bank_file = tmp_path / "line3.bank.pt"
    record = torch.load(bank_file, weights_only=True)
    record["patches"] = {
        k: torch.flip(v, dims=[0]) * 0 + v.mean(0) for k, v in record["patches"].items()
    }
    record["reference_max"] = float(record["reference_max"]) * 100
    torch.save(record, bank_file)  # "digest" left as it was
    image = next(Path(tmp_path / "refs").rglob("*.jpg"))
    common = ["--clip-weights", str(files[0]), "--image-size", "64", "--no-progress"]
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        code = cli(
            [
                "predict",
                str(image),
                "--checkpoint",
                str(calibrated),
                *common,
                "--output",
                str(tmp_path / "p.jsonl"),
            ]
        )
    assert code == 2
    assert "holds other references than the checkpoint was calibrated with" in caplog.text
