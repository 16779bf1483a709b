"""Dataset readers on the real files in ../shared/datasets (counts from its README)."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter

import pytest
import torch
from PIL import Image

from anomalyclip.data import (
    AnomalyDataset,
    AnomalyTorchDataset,
    DatasetError,
    open_dataset,
    read_brainmri,
    read_headct,
    read_meta_json,
    read_mvtec,
    write_meta_json,
)
from anomalyclip.preprocess import load_mask_array

EMPTY_UNEVEN_MASKS = {
    "exp3_num_45042_mask.png",
    "exp4_num_124690_mask.png",
    "exp4_num_352527_mask.png",
    "exp4_num_45057_mask.png",
}


@pytest.mark.parametrize(
    ("folder", "kind", "normal", "anomalous", "pixel_level"),
    [
        ("magnetic_tile", "mvtec", 952, 392, True),
        ("metal_plate", "mvtec", 80, 81, True),
        ("glass", "mvtec", 18, 80, True),
        ("headct", "folder", 100, 100, False),
        ("brainmri", "folder", 98, 155, False),
    ],
)
def test_shared_datasets_open_with_their_published_counts(
    shared_dir, folder, kind, normal, anomalous, pixel_level
):
    root = shared_dir / "datasets" / folder
    dataset = open_dataset(root)
    assert (dataset.name, dataset.categories) == (kind, (folder,))
    assert dataset.counts() == {folder: (normal, anomalous)}
    assert (dataset.pixel_level, dataset.has_masks, dataset.warnings) == (
        pixel_level,
        pixel_level,
        (),
    )
    if pixel_level:
        assert all(s.mask is not None and s.mask.is_file() for s in dataset if s.label)


def test_magnetic_tile_defects_and_empty_uneven_masks(shared_dir):
    """Four "uneven" masks mark no pixel: those images stay anomalous (label from folder)."""
    dataset = read_mvtec(shared_dir / "datasets" / "magnetic_tile")
    defects = Counter(sample.defect for sample in dataset)
    assert defects == {
        "good": 952,
        "blowhole": 115,
        "break": 85,
        "crack": 57,
        "fray": 32,
        "uneven": 103,
    }
    empty = [s for s in dataset if s.mask is not None and s.mask.name in EMPTY_UNEVEN_MASKS]
    assert len(empty) == 4
    for sample in empty:
        assert (sample.label, sample.defect) == (1, "uneven")
        assert not load_mask_array(sample.mask).any()
        assert dataset.has_pixel_truth(sample)
    image, mask, label, _ = AnomalyTorchDataset(dataset, 32)[dataset.samples.index(empty[0])]
    assert (image.shape, label, mask.sum().item()) == ((3, 32, 32), 1, 0.0)


def test_glass_train_split_holds_its_normal_images(shared_dir):
    train = read_mvtec(shared_dir / "datasets" / "glass", "train")
    assert (train.counts(), train.warnings) == ({"glass": (18, 0)}, ())


def test_medical_readers_accept_good_and_anomaly_folders(shared_dir):
    headct = read_headct(shared_dir / "datasets" / "headct")
    assert (headct.categories, headct.counts()) == (("brain",), {"brain": (100, 100)})
    brainmri = read_brainmri(shared_dir / "datasets" / "brainmri")
    assert brainmri.counts() == {"brain": (98, 155)}
    suffixes = Counter(s.image.suffix for s in brainmri)
    assert suffixes == {".jpg": 171, ".JPG": 74, ".jpeg": 6, ".png": 2}


def test_verify_on_a_real_subset_and_meta_json_round_trip(shared_dir, tmp_path):
    """Mixed real files (grayscale JPG, RGB PNG, .JPG) decode; meta.json paths stay valid."""
    datasets = shared_dir / "datasets"
    upper_case = [s for s in read_brainmri(datasets / "brainmri") if s.image.suffix == ".JPG"]
    picks = [
        *read_mvtec(datasets / "magnetic_tile").samples[950:954],
        *read_mvtec(datasets / "metal_plate").samples[79:81],
        *upper_case[:2],
    ]
    subset = AnomalyDataset.create("mixed", datasets, "test", picks, pixel_level=True, verify=True)
    assert subset.counts() == {"magnetic_tile": (2, 2), "metal_plate": (1, 1), "brain": (2, 0)}
    index = write_meta_json(datasets, {"test": subset}, path=tmp_path / "meta.json")
    again = read_meta_json(datasets, meta_file=index)
    assert again.samples == subset.samples
    batch = torch.stack([AnomalyTorchDataset(again, 16)[i][0] for i in range(len(again))])
    assert batch.shape == (8, 3, 16, 16) and torch.isfinite(batch).all()


def test_real_masks_of_another_size_are_named_and_resized_on_request(shared_dir, tmp_path):
    """Real metal_plate images in a folder dataset; one real mask saved at half size."""
    real = read_mvtec(shared_dir / "datasets" / "metal_plate")
    normal = next(s for s in real if s.label == 0)
    first, second = [s for s in real if s.label == 1][:2]
    root = tmp_path / "plates"
    for folder, sample in (("good", normal), ("defect", first), ("defect", second)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / sample.image.name).symlink_to(sample.image)
    (root / "masks").mkdir()
    (root / "masks" / first.mask.name).symlink_to(first.mask)
    with Image.open(second.mask) as full:
        half = full.resize((full.width // 2, full.height // 2), Image.Resampling.NEAREST)
        half.save(root / "masks" / second.mask.name)
        full_size = full.size
    with pytest.raises(DatasetError) as error:
        open_dataset(root)
    assert str(error.value).startswith(f"folder dataset at {root} (test): 1 problem\n")
    assert (
        f"{root / 'masks' / second.mask.name}: mask is {half.width}x{half.height}, its image "
        f"{root / 'defect' / second.image.name} is {full_size[0]}x{full_size[1]}"
    ) in str(error.value)
    dataset = open_dataset(root, mask_mismatch="resize")
    assert dataset.counts() == {"plates": (1, 2)} and dataset.has_masks


def test_real_mvtec_tree_with_a_partial_meta_json_is_read_as_mvtec(shared_dir, tmp_path, caplog):
    """Bug: the partial meta.json won detection and failed; the MVTec layout reads."""
    root = tmp_path / "lens"
    root.mkdir()
    for name in ("test", "ground_truth"):  # copies: an index may not follow links out
        shutil.copytree(shared_dir / "datasets" / "metal_plate" / name, root / name)
    good = sorted((root / "test" / "good").iterdir())[:3]
    entries = [{"img_path": f"test/good/{p.name}", "anomaly": 0} for p in good]
    entries += [{"img_path": f"test/good/gone_{i}.png", "anomaly": 0} for i in range(4)]
    (root / "meta.json").write_text(json.dumps({"train": {}, "test": {"lens": entries}}))
    with caplog.at_level(logging.WARNING):
        dataset = open_dataset(root)
    assert (dataset.name, dataset.counts()) == ("mvtec", {"lens": (80, 81)})
    assert "meta failed (meta dataset at" in caplog.text and "gone_0.png" in caplog.text
    with pytest.raises(DatasetError, match="4 problems"):
        open_dataset(root, "meta")
