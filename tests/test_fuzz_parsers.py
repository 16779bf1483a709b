"""Property-based tests: the manifest and dataset-index parsers accept or refuse clearly.

Whatever bytes a CSV manifest or a meta.json holds, reading it either gives a dataset
whose samples point at existing files, or raises DatasetError; never another exception.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from anomalyclip.data import DatasetError, read_csv_manifest, read_meta_json

FILES = ["good/a.png", "bad/b.png", "masks/b.png", "missing.png", "", "../outside.png"]
CELLS = st.one_of(
    st.sampled_from(FILES + ["0", "1", "good", "anomalous", "2", "yes", "bottle"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
)
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))


def make_tree() -> Path:
    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    for relative in ("good/a.png", "bad/b.png", "masks/b.png"):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (4, 4), 255 if "masks" in relative else 7).save(path)
    return root


def check_dataset(dataset) -> None:
    for sample in dataset.samples:
        assert sample.image.is_file()
        assert sample.label in (0, 1)
        assert sample.mask is None or sample.mask.is_file()


@FUZZ
@given(
    header=st.lists(
        st.sampled_from(["image", "label", "mask", "category", "defect", "x"]), max_size=6
    ),
    rows=st.lists(st.lists(CELLS, max_size=6), max_size=6),
)
def test_csv_manifest_never_crashes(header, rows):
    root = make_tree()
    manifest = root / "manifest.csv"
    lines = [",".join(header)] + [
        ",".join(c.replace(",", " ").replace("\n", " ") for c in r) for r in rows
    ]
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        dataset = read_csv_manifest(manifest)
    except DatasetError as error:
        assert str(error)
    else:
        check_dataset(dataset)


@FUZZ
@given(st.binary(max_size=300))
def test_csv_manifest_random_bytes(content):
    root = make_tree()
    (root / "manifest.csv").write_bytes(content)
    try:
        check_dataset(read_csv_manifest(root / "manifest.csv"))
    except DatasetError as error:
        assert str(error)


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2, 2), st.sampled_from(FILES + ["good"])),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(
            st.sampled_from(
                [
                    "img_path",
                    "mask_path",
                    "cls_name",
                    "specie_name",
                    "anomaly",
                    "test",
                    "train",
                    "bottle",
                ]
            ),
            children,
            max_size=5,
        ),
    ),
    max_leaves=20,
)


@FUZZ
@given(JSON_VALUES)
def test_meta_json_never_crashes(meta):
    root = make_tree()
    (root / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    try:
        dataset = read_meta_json(root)
    except DatasetError as error:
        assert str(error)
    else:
        check_dataset(dataset)
