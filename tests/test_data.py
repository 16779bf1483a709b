"""Dataset readers on small trees built here in each publisher's layout, and their checks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from anomalyclip.data import (
    AnomalyDataset,
    AnomalyTorchDataset,
    DatasetError,
    Sample,
    detect_layout,
    detect_layouts,
    open_dataset,
    read_br35h,
    read_brainmri,
    read_btad,
    read_covid19,
    read_csv_manifest,
    read_cvc_clinicdb,
    read_dagm,
    read_dtd_synthetic,
    read_folder,
    read_headct,
    read_isic2016,
    read_ksdd,
    read_kvasir,
    read_meta_json,
    read_mpdd,
    read_mvtec,
    read_tn3k,
    read_visa,
    write_meta_json,
)


def image(path: Path, value: int = 128, size: int = 8) -> Path:
    """A tiny grey image; the format follows the extension (PNG, JPEG, BMP)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".png": "PNG"}[path.suffix.lower()]
    Image.new("L", (size, size), value).save(path, format=fmt)
    return path


def mask(path: Path, marked: bool = True, size: int = 8) -> Path:
    """A binary mask: the left half marked (255), or nothing marked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size, size), np.uint8)
    if marked:
        array[:, : size // 2] = 255
    fmt = {".png": "PNG", ".bmp": "BMP", ".jpg": "JPEG"}[path.suffix.lower()]
    Image.fromarray(array).save(path, format=fmt)
    return path


# Trees in the published layouts -------------------------------------------------------


def build_mvtec(root: Path) -> Path:
    """Two categories; bottle has an upper-case .JPG and a hidden macOS file."""
    for category in ("bottle", "cable"):
        base = root / category
        for i in range(2):
            image(base / "train" / "good" / f"{i:03d}.png")
            image(base / "test" / "good" / f"{i:03d}.png")
        for i in range(2):
            image(base / "test" / "broken" / f"{i:03d}.png", 200)
            mask(base / "ground_truth" / "broken" / f"{i:03d}_mask.png")
    image(root / "bottle" / "test" / "broken" / "002.JPG", 200)
    mask(root / "bottle" / "ground_truth" / "broken" / "002_mask.png")
    (root / "bottle" / "test" / "good" / "._000.png").write_bytes(b"resource fork")
    (root / "bottle" / "test" / "good" / ".DS_Store").write_bytes(b"x")
    (root / "bottle" / "license.txt").write_text("CC BY-NC-SA 4.0")
    return root


def build_btad(root: Path) -> Path:
    base = root / "01"
    image(base / "train" / "ok" / "0000.bmp")
    image(base / "test" / "ok" / "0000.bmp")
    image(base / "test" / "ko" / "0000.bmp", 200)
    mask(base / "ground_truth" / "ko" / "0000.png")
    return root


def build_visa(root: Path) -> Path:
    rows = ["object,split,label,image,mask"]
    for category in ("candle", "pcb1"):
        for i, split in enumerate(["train", "train", "test"]):
            path = f"{category}/Data/Images/Normal/{i:04d}.JPG"
            image(root / path)
            rows.append(f"{category},{split},normal,{path},")
        path = f"{category}/Data/Images/Anomaly/000.JPG"
        mask_path = f"{category}/Data/Masks/Anomaly/000.png"
        image(root / path, 200)
        mask(root / mask_path)
        rows.append(f"{category},test,anomaly,{path},{mask_path}")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def build_ksdd(root: Path) -> Path:
    for part in ("kos01", "kos02"):
        image(root / part / "Part0.jpg")
        mask(root / part / "Part0_label.bmp", marked=False)
        image(root / part / "Part1.jpg")
        mask(root / part / "Part1_label.bmp", marked=part == "kos01")
    return root


def build_ksdd2(root: Path) -> Path:
    image(root / "test" / "10000.png")
    mask(root / "test" / "10000_GT.png", marked=False)
    image(root / "test" / "10001.png")
    mask(root / "test" / "10001_GT.png")
    return root


def build_dagm(root: Path) -> Path:
    for category in ("Class1", "Class2"):
        for split in ("Train", "Test"):
            base = root / category / split
            for i in range(1, 4):
                image(base / f"{i:04d}.PNG")
            mask(base / "Label" / "0002_label.PNG")
            (base / "Label" / "Labels.txt").write_text("1\n2\t1\t0002.PNG\t0\t0002_label.PNG\n")
    return root


def build_headct(root: Path) -> Path:
    lines = ["id, hemorrhage"]
    for i in range(4):
        image(root / "head_ct" / "head_ct" / f"{i:03d}.png")
        lines.append(f"{i},{int(i < 2)}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def build_brainmri(root: Path) -> Path:
    base = root / "brain_tumor_dataset"
    image(base / "no" / "1 no.jpeg")
    image(base / "no" / "N1.JPG")
    image(base / "yes" / "Y1.jpg")
    return root


def build_br35h(root: Path) -> Path:
    image(root / "no" / "no0.jpg")
    image(root / "yes" / "y0.jpg")
    image(root / "yes" / "y1.jpg")
    image(root / "pred" / "pred0.jpg")
    return root


def build_covid(root: Path) -> Path:
    for name, count in (("Normal", 2), ("COVID", 1), ("Viral Pneumonia", 1)):
        for i in range(count):
            image(root / name / "images" / f"{name}-{i}.png")
            mask(root / name / "masks" / f"{name}-{i}.png")
    return root


def build_isic(root: Path) -> Path:
    for stem in ("ISIC_0000003", "ISIC_0000012"):
        image(root / "ISBI2016_ISIC_Part1_Test_Data" / f"{stem}.jpg")
        mask(root / "ISBI2016_ISIC_Part1_Test_GroundTruth" / f"{stem}_Segmentation.png")
    return root


def build_clinicdb(root: Path) -> Path:
    for i in (1, 2):
        image(root / "PNG" / "Original" / f"{i}.png")
        mask(root / "PNG" / "Ground Truth" / f"{i}.png")
    return root


def build_kvasir(root: Path) -> Path:
    for stem in ("cju0qkwl35piu0993l0dewei2", "cju0qoxqj9q6s0835b43399p4"):
        image(root / "images" / f"{stem}.jpg")
        mask(root / "masks" / f"{stem}.jpg")
    return root


def build_tn3k(root: Path) -> Path:
    for i in range(3):
        image(root / "test-image" / f"{i:04d}.jpg")
        mask(root / "test-mask" / f"{i:04d}.jpg")
    image(root / "trainval-image" / "0000.jpg")
    mask(root / "trainval-mask" / "0000.jpg")
    return root


def build_folder(root: Path) -> Path:
    image(root / "good" / "a.png")
    image(root / "good" / "b.png")
    image(root / "scratch" / "c.png", 200)
    image(root / "dent" / "d.png", 200)
    mask(root / "masks" / "scratch" / "c_mask.png")
    mask(root / "masks" / "d_mask.png")
    return root


# Readers ------------------------------------------------------------------------------


def test_mvtec_reads_categories_defects_and_masks_by_stem(tmp_path):
    root = build_mvtec(tmp_path / "mvtec")
    dataset = read_mvtec(root)
    assert dataset.categories == ("bottle", "cable")
    assert dataset.counts() == {"bottle": (2, 3), "cable": (2, 2)}
    assert dataset.pixel_level and dataset.has_masks and dataset.warnings == ()
    upper = next(s for s in dataset if s.image.name == "002.JPG")
    assert upper == Sample(
        image=root / "bottle/test/broken/002.JPG",
        label=1,
        mask=root / "bottle/ground_truth/broken/002_mask.png",
        category="bottle",
        defect="broken",
    )
    normal = dataset.by_category()["cable"][0]
    assert (normal.label, normal.mask, normal.defect) == (0, None, "good")
    assert not any(s.image.name.startswith(".") for s in dataset)

    train = read_mvtec(root, "train")
    assert (len(train), set(train.labels), train.warnings) == (4, {0}, ())
    assert read_mvtec(root, categories=["cable"]).categories == ("cable",)
    with pytest.raises(DatasetError, match="no category 'wood'; found bottle, cable"):
        read_mvtec(root, categories=["wood"])


def test_mvtec_single_category_folder_is_a_dataset_of_one_category(tmp_path):
    root = build_mvtec(tmp_path / "mvtec")
    dataset = read_mvtec(root / "cable")
    assert (dataset.categories, len(dataset)) == (("cable",), 4)


def test_mvtec_anomalous_image_without_mask_is_an_error_unless_allowed(tmp_path, caplog):
    root = build_mvtec(tmp_path / "mvtec")
    (root / "cable/ground_truth/broken/001_mask.png").unlink()
    orphan = root / "cable/test/broken/001.png"
    with pytest.raises(DatasetError, match="anomalous image has no mask") as error:
        read_mvtec(root)
    assert str(orphan) in str(error.value) and "--allow-missing-masks" in str(error.value)

    with caplog.at_level(logging.WARNING):
        dataset = read_mvtec(root, allow_missing_masks=True)
    assert "1 anomalous images have no mask" in dataset.warnings[0]
    assert "no mask" in caplog.text
    sample = next(s for s in dataset if s.image == orphan)
    assert (sample.label, sample.mask, dataset.has_pixel_truth(sample)) == (1, None, False)
    assert dataset.has_pixel_truth(dataset.by_category()["cable"][0])


def test_empty_category_is_an_error_and_one_label_category_a_warning(tmp_path):
    root = build_mvtec(tmp_path / "mvtec")
    (root / "wood" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="category 'wood' has no images"):
        read_mvtec(root)
    image(root / "wood" / "test" / "good" / "000.png")
    dataset = read_mvtec(root)
    assert dataset.warnings == (
        "category 'wood' has only normal images: image-level AUROC and AP are undefined for it",
    )


def test_mpdd_dtd_and_btad_use_the_mvtec_layout(tmp_path):
    root = build_mvtec(tmp_path / "mvtec")
    assert read_mpdd(root).name == "mpdd"
    assert read_dtd_synthetic(root).counts() == read_mvtec(root).counts()
    btad = read_btad(build_btad(tmp_path / "btad"))
    assert btad.counts() == {"01": (1, 1)}
    anomalous = next(s for s in btad if s.label)
    assert (anomalous.image.suffix, anomalous.mask.name, anomalous.defect) == (
        ".bmp",
        "0000.png",
        "ko",
    )


def test_visa_reads_its_split_csv(tmp_path):
    root = build_visa(tmp_path / "visa")
    test = read_visa(root)
    assert test.counts() == {"candle": (1, 1), "pcb1": (1, 1)}
    anomalous = test.by_category()["pcb1"][1]
    assert anomalous.mask == root / "pcb1/Data/Masks/Anomaly/000.png"
    assert anomalous.defect == "anomaly"
    assert read_visa(root, "train").counts() == {"candle": (2, 0), "pcb1": (2, 0)}
    with pytest.raises(DatasetError, match="no rows of split 'val'; it has test, train"):
        read_visa(root, "val")


def test_visa_bad_label_names_the_line(tmp_path):
    root = build_visa(tmp_path / "visa")
    csv_path = root / "split_csv" / "1cls.csv"
    lines = csv_path.read_text().splitlines()
    lines[4] = lines[4].replace(",anomaly,", ",broken,")
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        DatasetError, match=r"1cls.csv, line 5: label 'broken' is not normal/anomaly"
    ):
        read_visa(root)


def test_ksdd_labels_come_from_mask_content(tmp_path):
    dataset = read_ksdd(build_ksdd(tmp_path / "ksdd"))
    assert dataset.counts() == {"electrical_commutators": (3, 1)}
    anomalous = next(s for s in dataset if s.label)
    assert anomalous.image == tmp_path / "ksdd/kos01/Part1.jpg"
    assert anomalous.mask == tmp_path / "ksdd/kos01/Part1_label.bmp"
    ksdd2 = read_ksdd(build_ksdd2(tmp_path / "ksdd2"))
    assert (ksdd2.name, ksdd2.labels) == ("ksdd2", [0, 1])
    with pytest.raises(DatasetError, match="KolektorSDD has no 'train' split"):
        read_ksdd(tmp_path / "ksdd", "train")


def test_dagm_defective_images_are_those_with_a_label_mask(tmp_path):
    root = build_dagm(tmp_path / "dagm")
    dataset = read_dagm(root)
    assert dataset.counts() == {"Class1": (2, 1), "Class2": (2, 1)}
    anomalous = next(s for s in dataset if s.label)
    assert anomalous.image == root / "Class1/Test/0002.PNG"
    assert anomalous.mask == root / "Class1/Test/Label/0002_label.PNG"
    assert read_dagm(root, "train").samples[1].image == root / "Class1/Train/0002.PNG"


def test_headct_kaggle_labels_csv(tmp_path):
    root = build_headct(tmp_path / "headct")
    dataset = read_headct(root)
    assert [(s.image.name, s.label) for s in dataset] == [
        ("000.png", 1),
        ("001.png", 1),
        ("002.png", 0),
        ("003.png", 0),
    ]
    assert (dataset.categories, dataset.pixel_level) == (("brain",), False)
    with (root / "labels.csv").open("a") as handle:
        handle.write("7,1\nx,1\n")
    with pytest.raises(DatasetError) as error:
        read_headct(root)
    assert "labels.csv, line 6: no image numbered 7" in str(error.value)
    assert "labels.csv, line 7: expected 'id,0|1'" in str(error.value)


def test_brain_datasets_read_no_and_yes_folders(tmp_path):
    brainmri = read_brainmri(build_brainmri(tmp_path / "brainmri"))
    assert [(s.image.name, s.label) for s in brainmri] == [
        ("1 no.jpeg", 0),
        ("N1.JPG", 0),
        ("Y1.jpg", 1),
    ]
    br35h = read_br35h(build_br35h(tmp_path / "br35h"))
    assert br35h.counts() == {"brain": (1, 2)}
    assert not any("pred" in s.image.name for s in br35h)


def test_covid_normal_against_the_other_classes(tmp_path):
    root = build_covid(tmp_path / "covid")
    dataset = read_covid19(root)
    assert dataset.counts() == {"chest": (2, 2)}
    assert {s.defect for s in dataset if s.label} == {"COVID", "Viral Pneumonia"}
    assert all(s.image.parent.name == "images" and s.mask is None for s in dataset)
    assert read_covid19(root, anomalous_classes=["COVID"]).counts() == {"chest": (2, 1)}


def test_segmentation_sets_hold_anomalous_images_with_masks(tmp_path):
    isic = read_isic2016(build_isic(tmp_path / "isic"))
    assert isic.samples[0].mask.name == "ISIC_0000003_Segmentation.png"
    assert isic.counts() == {"skin": (0, 2)}
    assert isic.warnings == (
        "category 'skin' has only anomalous images: image-level AUROC and AP are undefined for it",
    )
    clinic = read_cvc_clinicdb(build_clinicdb(tmp_path / "clinicdb"))
    assert [(s.image.name, s.mask.parent.name) for s in clinic] == [
        ("1.png", "Ground Truth"),
        ("2.png", "Ground Truth"),
    ]
    kvasir = read_kvasir(build_kvasir(tmp_path / "kvasir"))
    assert (kvasir.categories, len(kvasir), kvasir.has_masks) == (("colon",), 2, True)
    tn3k = build_tn3k(tmp_path / "tn3k")
    assert [s.mask.name for s in read_tn3k(tn3k)] == ["0000.jpg", "0001.jpg", "0002.jpg"]
    assert len(read_tn3k(tn3k, "train")) == 1


def test_folder_dataset_matches_masks_by_stem_and_suffix(tmp_path):
    root = build_folder(tmp_path / "parts")
    dataset = read_folder(root, masks="masks")
    assert dataset.categories == ("parts",)
    assert [(s.image.name, s.label, s.defect, s.mask and s.mask.name) for s in dataset] == [
        ("a.png", 0, "good", None),
        ("b.png", 0, "good", None),
        ("d.png", 1, "dent", "d_mask.png"),
        ("c.png", 1, "scratch", "c_mask.png"),
    ]
    (root / "masks" / "d_mask.png").rename(root / "masks" / "d_gt.png")
    (root / "masks" / "scratch" / "c_mask.png").rename(root / "masks" / "scratch" / "c_gt.png")
    assert read_folder(root, masks="masks", mask_suffix="_gt").samples[2].mask.name == "d_gt.png"
    image_level = read_folder(root, anomalous=["scratch"])
    assert (image_level.pixel_level, image_level.counts()) == (False, {"parts": (2, 1)})
    with pytest.raises(DatasetError, match="folder.s. not found: .*missing"):
        read_folder(root, anomalous=["missing"])


def test_folder_dataset_takes_normal_like_detection_does_or_the_named_folder(tmp_path):
    """Bug: folder= demanded good/ while auto-detection accepted normal/."""
    root = build_folder(tmp_path / "parts")
    (root / "good").rename(root / "normal")
    assert read_folder(root).counts() == {"parts": (2, 2)}
    (root / "normal").rename(root / "accepted")
    with pytest.raises(DatasetError, match="no normal folder .*--normal-folder NAME"):
        read_folder(root)
    assert read_folder(root, normal="accepted").counts() == {"parts": (2, 2)}


def test_csv_manifest_takes_numeric_labels_and_probabilities(tmp_path):
    root = build_folder(tmp_path / "parts")
    manifest = root / "list.csv"
    manifest.write_text(
        "image,label\ngood/a.png,0.0\ngood/b.png,0.333\nscratch/c.png,1.0\ndent/d.png,0.667\n"
    )
    assert [s.label for s in read_csv_manifest(manifest)] == [0, 0, 1, 1]


def test_csv_manifest_with_relative_paths_and_label_words(tmp_path):
    root = build_folder(tmp_path / "parts")
    manifest = root / "list.csv"
    manifest.write_text(
        "image,label,mask,category\n"
        "good/a.png,normal,,tile\n"
        "scratch/c.png,Anomalous,masks/scratch/c_mask.png,tile\n"
        "\n"
        "dent/d.png,1,masks/d_mask.png,\n"
    )
    dataset = read_csv_manifest(manifest)
    assert [(s.image, s.label, s.category) for s in dataset] == [
        (root / "good/a.png", 0, "tile"),
        (root / "scratch/c.png", 1, "tile"),
        (root / "dent/d.png", 1, "list"),
    ]
    assert dataset.pixel_level and dataset.samples[1].mask == root / "masks/scratch/c_mask.png"


def test_csv_manifest_reports_every_bad_row_by_line(tmp_path):
    root = build_folder(tmp_path / "parts")
    manifest = root / "list.csv"
    manifest.write_text(
        "image,label\n"
        "good/a.png,0\n"
        "good/b.png,maybe\n"
        "good/zzz.png,0\n"
        "good/a.png,0\n"
        ",1\n"
        "good/b.png,0,extra\n"
    )
    with pytest.raises(DatasetError) as error:
        read_csv_manifest(manifest)
    message = str(error.value)
    assert "5 problems" in message
    assert (
        "list.csv, line 3: label 'maybe' is not 0/1, normal/anomalous or a probability" in message
    )
    assert f"list.csv, line 4: image {root / 'good/zzz.png'} not found" in message
    assert "list.csv, line 5: image" in message and "already listed on line 2" in message
    assert "list.csv, line 6: empty image path" in message
    assert "list.csv, line 7: 3 cells, header has 2" in message

    manifest.write_text("path,label\ngood/a.png,0\n")
    with pytest.raises(DatasetError, match="missing image, got path,label"):
        read_csv_manifest(manifest)
    manifest.write_text("image,label,mask\nscratch/c.png,1,masks/nothing.png\n")
    with pytest.raises(DatasetError, match="line 2: mask .*nothing.png not found"):
        read_csv_manifest(manifest)


def test_index_paths_outside_the_dataset_folder_are_refused_unless_allowed(tmp_path):
    """Bug: a manifest, VisA split file or meta.json naming ``../x.png`` or an absolute
    path elsewhere had those files read as part of the dataset."""
    root = build_folder(tmp_path / "parts")
    outside = image(tmp_path / "private" / "x.png")
    manifest = root / "list.csv"
    for listed in ("../private/x.png", str(outside), "good/../../private/x.png"):
        manifest.write_text(f"image,label\ngood/a.png,0\n{listed},1\n")
        with pytest.raises(DatasetError) as error:
            read_csv_manifest(manifest)
        assert str(error.value) == (
            f"{manifest}, line 3: image {listed!r} is outside the dataset folder {root}; "
            "pass --allow-outside-paths to read it if you trust this index"
        )
        allowed = read_csv_manifest(manifest, allow_outside_paths=True)
        assert allowed.samples[1].image == root / listed
    manifest.write_text("image,label,mask\nscratch/c.png,1,../../m.png\n")
    with pytest.raises(DatasetError, match="line 2: mask '../../m.png' is outside"):
        read_csv_manifest(manifest)
    # Inside the folder, however written, is fine.
    manifest.write_text(f"image,label\n./good/../good/a.png,0\n{root / 'good/b.png'},0\n")
    assert len(read_csv_manifest(manifest)) == 2
    assert open_dataset(manifest, allow_outside_paths=True).samples[0].image.name == "a.png"

    meta_root = build_mvtec(tmp_path / "mvtec")
    write_meta_json(meta_root, {"test": read_mvtec(meta_root)})
    meta = json.loads((meta_root / "meta.json").read_text())
    meta["test"]["bottle"][2]["mask_path"] = str(outside)
    (meta_root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"test/bottle\[2\]: mask_path '/.*x.png' is outside"):
        read_meta_json(meta_root)
    assert read_meta_json(meta_root, allow_outside_paths=True).samples[2].mask == outside
    meta["test"]["bottle"][0]["img_path"] = "../private/x.png"
    meta["test"]["bottle"][1]["img_path"] = 7
    (meta_root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"bottle\[0\]: img_path '../private/x.png' is out"):
        open_dataset(meta_root, "meta")
    assert open_dataset(meta_root).name == "mvtec"  # recognition falls back to the tree
    with pytest.raises(DatasetError, match=r"bottle\[1\]: img_path must be a path, not 7"):
        read_meta_json(meta_root, allow_outside_paths=True)

    visa = build_visa(tmp_path / "visa")
    split = visa / "split_csv" / "1cls.csv"
    rows = split.read_text().splitlines()
    split.write_text("\n".join([*rows, "candle,test,anomaly,../../private/x.png,"]) + "\n")
    with pytest.raises(DatasetError, match=f"1cls.csv, line {len(rows) + 1}: image '../../priv"):
        read_visa(visa)


def test_cli_refuses_outside_paths_in_one_line_and_takes_the_flag(tmp_path, caplog):
    from anomalyclip.cli import main

    root = build_folder(tmp_path / "parts")
    image(tmp_path / "elsewhere.png")
    manifest = root / "list.csv"
    manifest.write_text("image,label\ngood/a.png,0\n../../elsewhere.png,1\n")
    assert main(["test", f"csv={manifest}", "--checkpoint", "none"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        f"{manifest}, line 3: image '../../elsewhere.png' is outside the dataset folder {root}; "
        "pass --allow-outside-paths to read it if you trust this index"
    ]
    assert not any(record.exc_info for record in caplog.records)
    # With the flag the path is read: the next problem is that it does not exist.
    caplog.clear()
    arguments = ["test", f"csv={manifest}", "--checkpoint", "none", "--allow-outside-paths"]
    assert main(arguments) == 2
    assert "line 3: image" in caplog.text and "elsewhere.png not found" in caplog.text
    assert "is outside" not in caplog.text


def test_meta_json_round_trip_in_the_original_format(tmp_path):
    root = build_mvtec(tmp_path / "mvtec")
    test, train = read_mvtec(root), read_mvtec(root, "train")
    path = write_meta_json(root, {"test": test, "train": train})
    meta = json.loads(path.read_text())
    assert list(meta) == ["train", "test"]
    assert meta["test"]["bottle"][2] == {
        "img_path": "bottle/test/broken/000.png",
        "mask_path": "bottle/ground_truth/broken/000_mask.png",
        "cls_name": "bottle",
        "specie_name": "broken",
        "anomaly": 1,
    }
    assert meta["test"]["bottle"][0]["mask_path"] == ""
    again = read_meta_json(root)
    assert (again.samples, again.categories, again.pixel_level) == (
        test.samples,
        test.categories,
        True,
    )
    assert read_meta_json(path, "train").samples == train.samples


def test_meta_json_as_the_original_scripts_wrote_it(tmp_path):
    """Absolute paths (medical scripts), 'Test' (DAGM script), folder mask_path (classification)."""
    root = tmp_path / "data"
    anomalous = image(root / "yes" / "y.png")
    normal = image(root / "no" / "n.png")
    meta = {
        "Train": {},
        "Test": {
            "brain": [
                {
                    "img_path": str(normal),
                    "mask_path": "",
                    "cls_name": "brain",
                    "specie_name": "no",
                    "anomaly": 0,
                },
                {
                    "img_path": str(anomalous),
                    "mask_path": "",
                    "cls_name": "brain",
                    "specie_name": "yes",
                    "anomaly": 1,
                },
            ]
        },
    }
    (root / "meta.json").write_text(json.dumps(meta))
    dataset = read_meta_json(root)
    assert [(s.image, s.label, s.mask, s.defect) for s in dataset] == [
        (normal, 0, None, "good"),
        (anomalous, 1, None, "yes"),
    ]
    assert dataset.pixel_level is False
    meta["Test"]["brain"][1]["mask_path"] = "yes"
    (root / "meta.json").write_text(json.dumps(meta))
    assert read_meta_json(root).samples[1].mask is None

    meta["Test"]["brain"][1]["anomaly"] = 2
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"Test/brain\[1\]: anomaly must be 0 or 1, not 2"):
        read_meta_json(root, "test")
    with pytest.raises(DatasetError, match="no 'val' split; it has 'Train', 'Test'"):
        read_meta_json(root, "val")
    (root / "meta.json").write_text("{not json")
    with pytest.raises(DatasetError, match="meta.json: not valid JSON"):
        read_meta_json(root)


# Recognising layouts --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "kind", "counts"),
    [
        (build_mvtec, "mvtec", {"bottle": (2, 3), "cable": (2, 2)}),
        (build_btad, "btad", {"01": (1, 1)}),
        (build_visa, "visa", {"candle": (1, 1), "pcb1": (1, 1)}),
        (build_ksdd, "ksdd", {"electrical_commutators": (3, 1)}),
        (build_ksdd2, "ksdd", {"electrical_commutators": (1, 1)}),
        (build_dagm, "dagm", {"Class1": (2, 1), "Class2": (2, 1)}),
        (build_headct, "headct", {"brain": (2, 2)}),
        (build_brainmri, "brainmri", {"brain": (2, 1)}),
        (build_br35h, "br35h", {"brain": (1, 2)}),
        (build_covid, "covid19", {"chest": (2, 2)}),
        (build_isic, "isic2016", {"skin": (0, 2)}),
        (build_clinicdb, "segmentation", {"root": (0, 2)}),
        (build_kvasir, "segmentation", {"root": (0, 2)}),
        (build_tn3k, "tn3k", {"thyroid": (0, 3)}),
        (build_folder, "folder", {"root": (2, 2)}),
    ],
)
def test_open_dataset_recognises_each_layout(tmp_path, build, kind, counts):
    root = build(tmp_path / "root")
    assert detect_layout(root)[0] == kind
    assert open_dataset(root).counts() == counts


def test_open_dataset_prefers_meta_json_and_reads_files_and_named_kinds(tmp_path):
    root = build_mvtec(tmp_path / "mvtec")
    write_meta_json(root, {"test": read_mvtec(root, categories=["cable"])})
    assert open_dataset(root).categories == ("cable",)
    assert open_dataset(root / "meta.json").categories == ("cable",)
    assert open_dataset(root, "mvtec").categories == ("bottle", "cable")
    assert open_dataset(root, "MPDD", categories=["bottle"]).name == "mpdd"
    folder = build_folder(tmp_path / "parts")
    assert open_dataset(folder).has_masks
    (folder / "list.csv").write_text("image,label\ngood/a.png,0\n")
    assert len(open_dataset(folder / "list.csv")) == 1
    with pytest.raises(DatasetError, match="unknown dataset kind 'imagenet'; known: mvtec, visa"):
        open_dataset(root, "imagenet")


def test_open_dataset_says_what_it_looked_for(tmp_path):
    image(tmp_path / "photos" / "cat.png")
    with pytest.raises(DatasetError) as error:
        open_dataset(tmp_path / "photos")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'photos'}: no known dataset layout. Looked for:")
    for expected in ("meta.json", "split_csv/1cls.csv", "test/<defect>/", "good/", ".csv manifest"):
        assert expected in message
    with pytest.raises(DatasetError, match="no such file or folder"):
        open_dataset(tmp_path / "absent")


# Checks ---------------------------------------------------------------------------------


def test_duplicates_missing_files_and_bad_labels_are_listed_together(tmp_path):
    first = image(tmp_path / "a.png")
    samples = [
        Sample(first, 0, category="x"),
        Sample(tmp_path / "." / "a.png", 1, mask=tmp_path / "a_mask.png", category="x"),
        Sample(tmp_path / "b.png", 2, category="x"),
    ]
    with pytest.raises(DatasetError) as error:
        AnomalyDataset.create("mine", tmp_path, "test", samples, pixel_level=True)
    message = str(error.value)
    assert message.startswith(f"mine dataset at {tmp_path} (test): 4 problems")
    assert f"{first}: listed twice (samples 0 and 1)" in message
    assert f"{tmp_path / 'a_mask.png'}: mask file not found (for image {first})" in message
    assert f"{tmp_path / 'b.png'}: label must be 0 or 1, not 2" in message
    assert f"{tmp_path / 'b.png'}: image file not found" in message


def test_verify_decodes_images_and_masks_and_names_corrupt_files(tmp_path):
    root = build_folder(tmp_path / "parts")
    assert len(read_folder(root, masks="masks", verify=True)) == 4
    (root / "good" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "masks" / "d_mask.png").write_bytes(b"")
    read_folder(root, masks="masks")  # without verify, files are only listed
    with pytest.raises(DatasetError) as error:
        read_folder(root, masks="masks", verify=True)
    message = str(error.value)
    assert "2 problems" in message
    assert f"cannot read image {root / 'good/b.png'}" in message
    assert f"cannot read image {root / 'masks/d_mask.png'}" in message


def test_subset_and_summary(tmp_path):
    dataset = read_mvtec(build_mvtec(tmp_path / "mvtec"))
    assert (
        dataset.summary()
        == "mvtec (test, pixel-level): 2 categories, 4 normal / 5 anomalous images"
    )
    cable = dataset.subset(["cable"])
    assert (cable.categories, len(cable)) == (("cable",), 4)
    with pytest.raises(DatasetError, match="no category 'wood'; it has bottle, cable"):
        dataset.subset(["wood"])


# Torch wrapper --------------------------------------------------------------------------


def test_torch_dataset_yields_image_mask_label_index(tmp_path):
    dataset = read_folder(build_folder(tmp_path / "parts"), masks="masks")
    wrapped = AnomalyTorchDataset(dataset, 16)
    image_tensor, mask_tensor, label, index = wrapped[3]
    assert image_tensor.shape == (3, 16, 16) and image_tensor.dtype == torch.float32
    assert (label, index) == (1, 3)
    expected = torch.zeros(16, 16)
    expected[:, :8] = 1
    assert torch.equal(mask_tensor, expected)
    images, masks, labels, indices = next(iter(DataLoader(wrapped, batch_size=4)))
    assert images.shape == (4, 3, 16, 16) and masks.shape == (4, 16, 16)
    assert labels.tolist() == [0, 0, 1, 1] and indices.tolist() == [0, 1, 2, 3]
    assert masks[:2].sum() == 0


def test_sample_defect_defaults_follow_the_label(tmp_path):
    assert Sample(tmp_path / "a.png", 0).defect == "good"
    assert Sample(tmp_path / "a.png", 1).defect == "anomaly"
    assert Sample(tmp_path / "a.png", 1, defect="crack").defect == "crack"


def test_cli_lists_dataset_problems_with_files_and_lines_and_no_traceback(tmp_path, caplog):
    """Problems are listed with file and line always; a traceback only with --debug."""
    from anomalyclip.cli import main

    (tmp_path / "m.csv").write_text("image,label\na.png,0\nb.png,2\n")
    assert main(["test", f"csv={tmp_path / 'm.csv'}", "--checkpoint", "none"]) == 2
    assert "m.csv, line 2: image" in caplog.text and "m.csv, line 3: label '2'" in caplog.text
    assert not any(record.exc_info for record in caplog.records)
    caplog.clear()
    assert main(["--debug", "test", f"csv={tmp_path / 'm.csv'}", "--checkpoint", "none"]) == 2
    assert any(record.exc_info for record in caplog.records)


# Masks that do not fit their images -------------------------------------------------------


def test_mask_size_normal_image_masks_and_masks_without_image_are_errors_naming_files(tmp_path):
    """Bug: these were accepted (or ignored) silently although the README calls them errors."""
    root = build_folder(tmp_path / "parts")
    big = mask(root / "masks" / "scratch" / "c_mask.png", size=16)
    normal_mask = mask(root / "masks" / "a_mask.png")
    orphan = mask(root / "masks" / "scratch" / "zz_mask.png")
    with pytest.raises(DatasetError) as error:
        read_folder(root, masks="masks")
    message = str(error.value)
    assert "3 problems" in message
    assert f"{big}: mask is 16x16, its image {root / 'scratch/c.png'} is 8x8" in message
    assert f"{normal_mask}: mask given for normal image {root / 'good/a.png'}" in message
    assert f"{orphan}: mask without an image" in message
    assert message.count("(pass --mask-mismatch ignore to leave it out)") == 2
    assert "(pass --mask-mismatch resize to stretch it over the image, or ignore" in message
    assert len(error.value.problems) == 3

    resized = read_folder(root, masks="masks", mask_mismatch="resize")
    by_name = {s.image.name: s for s in resized}
    assert (by_name["c.png"].mask, by_name["a.png"].mask) == (big, None)
    assert len(resized.warnings) == 3 and "1 masks of another size" in resized.warnings[1]
    stretched = AnomalyTorchDataset(resized, 8)[resized.samples.index(by_name["c.png"])][1]
    assert stretched[:, :4].all() and not stretched[:, 4:].any()

    ignored = read_folder(root, masks="masks", mask_mismatch="ignore")
    c = next(s for s in ignored if s.image.name == "c.png")
    assert (c.label, c.mask, ignored.has_pixel_truth(c)) == (1, None, False)
    assert "image-level metrics only" in ignored.warnings[1]
    with pytest.raises(ValueError, match="mask_mismatch must be one of error, resize, ignore"):
        read_folder(root, masks="masks", mask_mismatch="stretch")  # type: ignore[arg-type]


def test_mvtec_masks_without_images_and_csv_masks_of_normal_rows_are_errors(tmp_path):
    root = build_mvtec(tmp_path / "mvtec")
    stray = mask(root / "cable" / "ground_truth" / "broken" / "007_mask.png")
    no_folder = mask(root / "cable" / "ground_truth" / "crack" / "000_mask.png")
    with pytest.raises(DatasetError) as error:
        read_mvtec(root)
    assert f"{stray}: mask without an image" in str(error.value)
    assert f"{no_folder}: mask without an image" in str(error.value)
    assert read_mvtec(root, "train").counts() == {"bottle": (2, 0), "cable": (2, 0)}
    assert len(read_mvtec(root, mask_mismatch="ignore").warnings) == 1

    manifest = tmp_path / "mvtec" / "list.csv"
    manifest.write_text(
        "image,label,mask\n"
        "cable/test/good/000.png,0,cable/ground_truth/broken/000_mask.png\n"
        "cable/test/broken/000.png,1,cable/ground_truth/broken/000_mask.png\n"
    )
    with pytest.raises(DatasetError, match="1 problem\n.*000_mask.png: mask given for normal"):
        read_csv_manifest(manifest)
    assert read_csv_manifest(manifest, mask_mismatch="ignore").samples[0].mask is None


def test_mask_sizes_come_from_headers_with_the_exif_rotation(tmp_path, monkeypatch):
    """A portrait JPEG stored landscape with EXIF orientation 6 is 4x8 once decoded."""
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 4), "gray").save(photo, exif=exif.tobytes())
    Image.fromarray(np.full((8, 4), 255, np.uint8)).save(tmp_path / "upright.png")
    Image.fromarray(np.full((4, 8), 255, np.uint8)).save(tmp_path / "stored.png")
    manifest = tmp_path / "list.csv"
    manifest.write_text("image,label,mask\nphoto.jpg,1,upright.png\n")

    def no_decoding(self):
        raise AssertionError(f"decoded {self.filename}")

    with monkeypatch.context() as patch:
        patch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
        assert read_csv_manifest(manifest).samples[0].mask == tmp_path / "upright.png"
        manifest.write_text("image,label,mask\nphoto.jpg,1,stored.png\n")
        with pytest.raises(DatasetError, match="stored.png: mask is 8x4, its image .* is 4x8"):
            read_csv_manifest(manifest)


def test_cli_mask_mismatch_flag_reaches_the_reader(tmp_path):
    from anomalyclip.cli import build_parser
    from anomalyclip.cli.options import DatasetSpec, open_spec

    root = build_folder(tmp_path / "parts")
    mask(root / "masks" / "d_mask.png", size=16)
    for mode, expected in (("resize", "d_mask.png"), ("ignore", None)):
        args = build_parser().parse_args(["test", str(root), "--mask-mismatch", mode])
        dataset = open_spec(DatasetSpec.parse(args.data[0]), args)
        d = next(s for s in dataset if s.image.name == "d.png")
        assert (d.mask.name if d.mask else None) == expected
    args = build_parser().parse_args(["test", str(root)])
    with pytest.raises(DatasetError, match="d_mask.png: mask is 16x16"):
        open_spec(DatasetSpec.parse(args.data[0]), args)
    args = build_parser().parse_args(
        ["test", f"headct={build_headct(tmp_path / 'ct')}", "--mask-mismatch", "ignore"]
    )
    with pytest.raises(DatasetError, match="the headct layout does not take --mask-mismatch"):
        open_spec(DatasetSpec.parse(args.data[0]), args)


# Several layouts match --------------------------------------------------------------------


def partial_meta(root: Path, broken: int) -> Path:
    """The original's meta.json for part of an MVTec tree, ``broken`` entries pointing nowhere."""
    meta = {"train": {}, "test": {"cable": []}}
    for i in range(broken):
        meta["test"]["cable"].append(
            {"img_path": f"cable/test/good/{100 + i}.png", "mask_path": "", "anomaly": 0}
        )
    meta["test"]["cable"].append({"img_path": "cable/test/good/000.png", "anomaly": 0})
    (root / "meta.json").write_text(json.dumps(meta))
    return root / "meta.json"


def test_layout_that_reads_is_preferred_and_the_failed_one_is_named(tmp_path, caplog):
    """Bug: an MVTec tree with a partial meta.json failed with '201 problems', no hint."""
    root = build_mvtec(tmp_path / "lens")
    partial_meta(root, 5)
    assert [kind for kind, _ in detect_layouts(root)] == ["meta", "mvtec", "dagm"]
    with caplog.at_level(logging.WARNING):
        dataset = open_dataset(root)
    assert (dataset.name, dataset.counts()) == ("mvtec", {"bottle": (2, 3), "cable": (2, 2)})
    assert "matched the layouts meta, mvtec, dagm; meta failed (meta dataset at" in caplog.text
    assert "5 problems; first: " in caplog.text and "100.png: image file not found" in caplog.text
    assert f"read as mvtec (force a layout with KIND={root})" in caplog.text


def test_no_matching_layout_reads_one_error_quotes_each_and_how_to_force_it(tmp_path):
    root = build_mvtec(tmp_path / "lens")
    partial_meta(root, 201)
    (root / "cable/ground_truth/broken/001_mask.png").unlink()
    with pytest.raises(DatasetError) as error:
        open_dataset(root)
    message = str(error.value)
    assert message.startswith(
        f"{root}: 3 layouts match (meta, mvtec, dagm) and none reads without problems:\n"
        f"  - meta: meta.json (the original's index); force it with meta={root}; "
        "201 problems, first:\n      - "
    )
    assert "      ... and 198 more\n" in message
    assert (
        f"  - mvtec: [<category>/]test/<defect>/ or train/good/ (MVTec AD, MPDD, ...); "
        f"force it with mvtec={root}; 1 problem, first:\n      - " in message
    )
    assert "anomalous image has no mask" in message and "--allow-missing-masks" in message
    assert open_dataset(root, allow_missing_masks=True).name == "mvtec"
    assert open_dataset(root, "mvtec", allow_missing_masks=True).counts()["cable"] == (2, 2)


def test_a_link_inside_the_dataset_that_points_outside_is_refused(tmp_path):
    """The check was lexical: ``good/link.png -> /elsewhere/x.png`` (or a linked folder)
    named by an index passed as inside the dataset. Paths are resolved first now."""
    root = build_folder(tmp_path / "parts")
    outside = image(tmp_path / "private" / "x.png")
    (root / "good" / "link.png").symlink_to(outside)
    (root / "linked").symlink_to(outside.parent, target_is_directory=True)
    (root / "good" / "inner.png").symlink_to(root / "good" / "a.png")  # inside: fine
    manifest = root / "list.csv"
    for listed in ("good/link.png", "linked/x.png"):
        manifest.write_text(f"image,label\ngood/inner.png,0\n{listed},1\n")
        with pytest.raises(DatasetError, match=f"line 3: image '{listed}' is outside"):
            read_csv_manifest(manifest)
        with pytest.raises(DatasetError, match="is outside the dataset folder"):
            open_dataset(manifest)
        assert len(read_csv_manifest(manifest, allow_outside_paths=True)) == 2

    meta_root = build_mvtec(tmp_path / "mvtec")
    write_meta_json(meta_root, {"test": read_mvtec(meta_root)})
    meta = json.loads((meta_root / "meta.json").read_text())
    (meta_root / "bottle" / "link.png").symlink_to(outside)
    meta["test"]["bottle"][0]["img_path"] = "bottle/link.png"
    (meta_root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"bottle\[0\]: img_path 'bottle/link.png' is out"):
        read_meta_json(meta_root)
    # a dataset folder that is itself a link is still its own inside
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    (alias / "list.csv").write_text("image,label\ngood/a.png,0\ngood/inner.png,0\n")
    assert len(read_csv_manifest(alias / "list.csv")) == 2
