"""The service behind the Predictor seam: any method, sets, and no invented thresholds."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from anomalyclip.cli import build_parser
from anomalyclip.methods.anomalyclip.onnx import OnnxAnomalyModel, export_onnx
from anomalyclip.postprocess import PostProcessor
from anomalyclip.predictor import Predictor
from anomalyclip.preprocess import PreProcessor
from anomalyclip.serving import ServiceSettings, create_app
from tests.helpers import decode_png, noise_png, post_image, tiny_service_model


class MeanDistanceSet(Predictor):
    """A set-scoring method small enough to re-derive by hand: an image's score is the
    distance of its mean colour from the mean of the others' (a pixel's map value likewise).
    """

    method = "meanset"
    scores_sets = True

    def __init__(self) -> None:
        self.calls: list[int] = []

    @property
    def preprocessor(self) -> PreProcessor:
        return PreProcessor(16, "center-crop", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    @property
    def postprocessor(self) -> PostProcessor:
        return PostProcessor(map_range=(0.0, 1.0))

    def settings(self) -> dict[str, Any]:
        return {"kind": "test"}

    def score_tensors(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(len(images))
        grey = images.mean(dim=1)  # (B, S, S)
        means = grey.mean(dim=(1, 2))
        others = (means.sum() - means) / (len(images) - 1)
        maps = (grey - others[:, None, None]).abs()
        return (means - others).abs().numpy(), maps.numpy()


def expected_scores(images: list[bytes]) -> list[float]:
    from anomalyclip.preprocess import load_image

    tensors = MeanDistanceSet().preprocessor([load_image(data) for data in images])
    means = tensors.mean(dim=(1, 2, 3))
    others = (means.sum() - means) / (len(images) - 1)
    return (means - others).abs().tolist()


def set_files(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


def test_without_thresholds_there_is_no_verdict_and_no_mask():
    with TestClient(create_app(tiny_service_model())) as client:
        info = client.get("/v1/model").json()
        assert (info["image_threshold"], info["image_threshold_source"]) == (None, None)
        assert (info["pixel_threshold"], info["pixel_threshold_source"]) == (None, None)
        body = post_image(client, noise_png()).json()
        assert (body["threshold"], body["anomalous"], body["verdict"]) == (None, None, None)
        assert (body["pixel_threshold"], body["anomalous_fraction"], body["mask_png"]) == (
            None,
            None,
            None,
        )
        assert decode_png(body["overlay_png"]).size == (96, 72)
        mask = post_image(client, noise_png(), format="png", part="mask")
        assert mask.status_code == 422
        assert "no calibrated pixel threshold" in mask.json()["detail"]
        overlay = post_image(client, noise_png(), format="png")
        assert overlay.status_code == 200 and "x-anomaly-verdict" not in overlay.headers
        given = post_image(client, noise_png(), threshold=0.0, pixel_threshold=0.0).json()
        assert (given["verdict"], given["anomalous_fraction"]) == ("anomalous", 1.0)


def test_a_set_is_scored_together_with_the_chosen_method():
    images = [noise_png(40, 30, seed=s) for s in range(3)] + [noise_png(40, 30, seed=9)[:90]]
    meanset = MeanDistanceSet()
    predictors = {"anomalyclip": tiny_service_model(image_threshold=0.5), "meanset": meanset}
    with TestClient(create_app(predictors)) as client:
        assert client.get("/v1/model").json()["methods"] == ["anomalyclip", "meanset"]
        info = client.get("/v1/model", params={"method": "meanset"}).json()
        assert (info["scores_sets"], info["image_size"], info["backbone"]) == (True, 16, None)
        response = client.post(
            "/v1/predict/set", params={"method": "meanset"}, files=set_files(images)
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["succeeded"], body["failed"]) == (3, 1)
        assert meanset.calls == [3]  # one call for the whole set, the corrupt file left out
        scores = [item["score"] for item in body["results"][:3]]
        assert scores == pytest.approx(expected_scores(images[:3]), abs=1e-6)
        assert body["results"][3]["status"] == 422 and "3.png" in body["results"][3]["detail"]
        # the batch endpoint scores a set method's images together too
        batch = client.post(
            "/v1/predict/batch", params={"method": "meanset"}, files=set_files(images[:3])
        )
        assert [item["score"] for item in batch.json()["results"]] == pytest.approx(scores)
        # a per-image method answers a set image by image
        per_image = client.post("/v1/predict/set", files=set_files(images[:2])).json()
        singles = [post_image(client, data).json()["score"] for data in images[:2]]
        assert [item["score"] for item in per_image["results"]] == pytest.approx(singles, abs=1e-6)


def test_set_methods_refuse_single_images_and_too_small_sets():
    with TestClient(create_app(MeanDistanceSet())) as client:
        single = post_image(client, noise_png())
        assert single.status_code == 422
        assert "send at least two images to /v1/predict/set" in single.json()["detail"]
        one = client.post("/v1/predict/set", files=set_files([noise_png()])).json()
        assert one["failed"] == 1
        assert one["results"][0]["detail"] == (
            "meanset scores the images of a set against each other and needs at least 2 "
            "readable images; 1 given"
        )
        unknown = client.post(
            "/v1/predict/set", params={"method": "x"}, files=set_files([noise_png()] * 2)
        )
        assert unknown.status_code == 422
        assert unknown.json()["detail"] == "unknown method 'x'; this service offers meanset"


def test_set_limits_on_count_and_total_pixels():
    settings = ServiceSettings(max_set_size=3, max_set_pixels=5_000)
    with TestClient(create_app(MeanDistanceSet(), settings)) as client:
        many = client.post("/v1/predict/set", files=set_files([noise_png(8, 8)] * 4))
        assert many.status_code == 413
        assert many.json()["detail"] == (
            "4 or more files in one request; the limit is 3 (refused at part 4 without "
            "reading the rest)"
        )
        large = client.post("/v1/predict/set", files=set_files([noise_png(50, 40)] * 3))
        assert large.status_code == 413
        assert large.json()["detail"] == (
            "the set's images hold 6,000 pixels together, over the limit of 5,000"
        )


def test_an_onnx_export_is_served_like_the_torch_model(tmp_path, monkeypatch):
    import uvicorn

    model = tiny_service_model(image_threshold=0.4, pixel_threshold=1.1).eval()
    path = export_onnx(model, tmp_path / "model.onnx")
    calls: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.update(app=app))
    args = build_parser().parse_args(["serve", "--onnx", str(path)])
    assert args.func(args) == 0
    data = noise_png(seed=5)
    with TestClient(calls["app"]) as onnx_client, TestClient(create_app(model)) as torch_client:
        info = onnx_client.get("/v1/model").json()
        assert isinstance(calls["app"].state.methods["anomalyclip"], OnnxAnomalyModel)
        assert (info["image_threshold"], info["pixel_threshold"]) == (0.4, 1.1)
        assert info["settings"]["engine"] == "onnx"
        from_onnx = post_image(onnx_client, data).json()
        from_torch = post_image(torch_client, data).json()
    assert from_onnx["score"] == pytest.approx(from_torch["score"], abs=1e-4)
    assert from_onnx["verdict"] == from_torch["verdict"]
    assert from_onnx["map"]["max"] == pytest.approx(from_torch["map"]["max"], abs=1e-3)


def test_reference_sets_are_kept_and_used_by_later_requests():
    from anomalyclip.methods.anomalyclip.few_shot import FewShotAnomalyCLIP

    model = tiny_service_model()
    references = [noise_png(64, 64, seed=40 + i) for i in range(3)]
    settings = ServiceSettings(max_reference_sets=1)
    with TestClient(create_app(model, settings)) as client:
        files = set_files(references) + [("files", ("bad.png", b"\x89PNG broken", "image/png"))]
        response = client.post("/v1/references", files=files)
        assert response.status_code == 200, response.text
        kept = response.json()
        assert (kept["method"], kept["count"]) == ("anomalyclip", 3)
        assert [item["filename"] for item in kept["failed"]] == ["bad.png"]
        assert kept["bytes"] > 0 and len(kept["id"]) == 16
        # the same images give the same id: identified by content
        again = client.post("/v1/references", files=set_files(references)).json()
        assert again["id"] == kept["id"]

        from anomalyclip.preprocess import load_image

        few_shot = FewShotAnomalyCLIP.from_images(model, [load_image(r) for r in references])
        data = noise_png(seed=50)
        expected = few_shot.predict_images([load_image(data)])[0].score
        answer = post_image(client, data, references=kept["id"]).json()
        assert answer["score"] == pytest.approx(expected, abs=1e-5)
        assert answer["score"] != pytest.approx(post_image(client, data).json()["score"], abs=1e-4)
        info = client.get("/v1/model", params={"references": kept["id"]}).json()
        assert info["settings"]["references"]["count"] == 3
        # only the last reference set is kept (max_reference_sets=1)
        other = client.post("/v1/references", files=set_files(references[:2])).json()
        assert other["id"] != kept["id"]
        gone = post_image(client, data, references=kept["id"])
        assert gone.status_code == 404
        assert "upload the references again" in gone.json()["detail"]


def test_musc_reference_sets_report_their_bank_bytes(tmp_path):
    """MuSc's reference set answers with the bytes of its bank (every degree and layer's
    vectors), not a 500 for a bank that is a dict of tensors."""
    from anomalyclip.methods.musc.factory import create_musc
    from anomalyclip.methods.musc.few_shot import MuScWithReferences
    from anomalyclip.preprocess import load_image
    from tests.factories import tiny_clip

    clip_path = tmp_path / "clip.pt"
    torch.save(tiny_clip().state_dict(), clip_path)
    musc = create_musc(clip_path, overrides={"image_size": 64, "features": (2, 4)})
    references = [noise_png(64, 64, seed=60 + i) for i in range(2)]
    bank = MuScWithReferences.from_images(musc, [load_image(r) for r in references]).bank
    expected = sum(vectors.numel() * 4 for vectors in bank.values())
    with TestClient(create_app({"musc": musc})) as client:
        response = client.post(
            "/v1/references", params={"method": "musc"}, files=set_files(references)
        )
        assert response.status_code == 200, response.text
        assert (response.json()["count"], response.json()["bytes"]) == (2, expected)
        assert expected > 0


def test_a_method_without_a_reference_mode_says_so():
    with TestClient(create_app(MeanDistanceSet())) as client:
        response = client.post("/v1/references", files=set_files([noise_png()] * 2))
        assert response.status_code == 422
        assert response.json()["detail"] == "meanset has no reference mode yet"
