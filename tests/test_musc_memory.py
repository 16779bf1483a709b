"""MuSc's memory is bounded by the subset, not the set: the subsets of ``divide_num`` are
scored one at a time from features spilled to a temporary file, and a set given as
decoded images is preprocessed a batch at a time, never as one (N, 3, S, S) tensor."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from anomalyclip.methods.musc import model as musc_model
from anomalyclip.methods.musc.model import MuSc, MuScConfig
from tests.factories import tiny_clip

SIZE = 32
COUNT = 12


def noise_images(count: int, seed: int = 0) -> list[Image.Image]:
    generator = np.random.default_rng(seed)
    common = generator.integers(0, 256, (SIZE, SIZE, 3))
    return [
        Image.fromarray(
            np.clip(common + generator.integers(-60, 61, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        )
        for _ in range(count)
    ]


def small_musc(divide_num: int, batch_size: int = 2) -> MuSc:
    config = MuScConfig(
        backbone="tiny",
        image_size=SIZE,
        features=(2, 4),
        degrees=(1, 3),
        divide_num=divide_num,
        batch_size=batch_size,
    )
    return MuSc(tiny_clip(), config)


def test_the_features_held_at_once_are_one_subsets(monkeypatch):
    musc = small_musc(divide_num=3)
    held: list[int] = []
    lnamd_of_set = musc._lnamd

    def counting_lnamd(tokens: torch.Tensor, degree: int) -> torch.Tensor:
        held.append(len(tokens))
        return lnamd_of_set(tokens, degree)

    monkeypatch.setattr(musc, "_lnamd", counting_lnamd)
    predictions = musc.predict(noise_images(COUNT), batch_size=COUNT)
    assert len(predictions) == COUNT
    # 2 layers x 2 degrees x 3 subsets, each of 4 images (before: 12, the whole set)
    assert held == [4] * 12


def test_decoded_images_are_preprocessed_a_batch_at_a_time(monkeypatch):
    musc = small_musc(divide_num=3, batch_size=2)
    preprocessed: list[int] = []
    at_first_forward: list[int] = []
    preprocessor_type = type(musc.preprocessor)
    tensor_of = preprocessor_type.tensor

    def counting_tensor(self, image):
        preprocessed.append(1)
        return tensor_of(self, image)

    residual_stream = musc.clip.visual.residual_stream

    def first_forward(batch, *args, **kwargs):
        at_first_forward.append(len(preprocessed))
        return residual_stream(batch, *args, **kwargs)

    monkeypatch.setattr(preprocessor_type, "tensor", counting_tensor)
    monkeypatch.setattr(musc.clip.visual, "residual_stream", first_forward)
    musc.predict(noise_images(COUNT), batch_size=COUNT)
    # before: all 12 were stacked into one tensor before the backbone saw any
    assert at_first_forward[0] == 2
    assert len(preprocessed) == COUNT


def test_subset_by_subset_scoring_is_bit_identical_to_the_whole_set_in_memory():
    """The spilled features, read back a subset at a time, give the very bits that
    holding every feature (the keep_features debugging output does) gives."""
    musc = small_musc(divide_num=3, batch_size=5)
    images = noise_images(COUNT)
    tensors = torch.stack([musc.preprocessor.tensor(image) for image in images])
    kept = musc.run(tensors, keep_features=True)
    streamed = musc.run(musc_model.PreprocessedSet(images, musc.preprocessor))
    tokens, embeddings = musc.features(tensors)
    for layer, values in tokens.items():
        assert np.array_equal(kept.patch_tokens[layer], values.numpy())
    assert np.array_equal(streamed.class_tokens, embeddings.numpy())
    for key, scores in kept.msm.items():
        assert np.array_equal(streamed.msm[key], scores)
    assert np.array_equal(streamed.anomaly_maps, kept.anomaly_maps)
    assert np.array_equal(streamed.image_scores, kept.image_scores)


def test_the_feature_file_holds_the_rows_and_is_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(musc_model.tempfile, "tempdir", None)  # TMPDIR read again
    musc = small_musc(divide_num=2)
    length, channels, _ = musc.feature_shape()
    with musc_model.SpilledFeatures((2, 4), 6, musc) as spill:
        rows = torch.arange(3 * length * channels, dtype=torch.float32)
        spill.write(4, 3, rows.view(3, length, channels))
        read = spill.read(np.array([1, 4]), shard=False)
        assert read[4][0].abs().sum() == 0  # never written: a hole, read as zeros
        assert torch.equal(read[4][1], rows.view(3, length, channels)[1])
        assert read[2].abs().sum() == 0
        # unlinked at once: nothing to clean up even if the process dies
        assert list(tmp_path.iterdir()) == []
    assert spill.file.closed
