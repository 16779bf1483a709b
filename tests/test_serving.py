"""The HTTP service in-process: every endpoint, the limits, and clear JSON errors."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from anomalyclip.cli import build_parser
from anomalyclip.serving import ServiceSettings, create_app
from anomalyclip.serving.uploads import display_name
from anomalyclip.serving.worker import InferenceWorker, ServiceBusy
from tests.helpers import (
    MAX_PIXELS,
    MAX_UPLOAD,
    decode_png,
    encode,
    noise_png,
    post_image,
    tiny_service_model,
)


def decode_map(payload: dict) -> np.ndarray:
    values = np.frombuffer(base64.b64decode(payload["data"]), dtype="<u2").astype(np.float64)
    span = payload["max"] - payload["min"]
    return (payload["min"] + values / 65535.0 * span).reshape(payload["height"], payload["width"])


@pytest.fixture(scope="module")
def model():
    """Calibrated, so that responses carry verdicts and masks."""
    return tiny_service_model(image_threshold=0.5, pixel_threshold=1.0)


@pytest.fixture(scope="module")
def client(model):
    settings = ServiceSettings(
        max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS, max_batch_size=4, map_max_side=64
    )
    with TestClient(create_app(model, settings)) as test_client:
        yield test_client


# predictions -----------------------------------------------------------------------------


def test_predict_returns_score_verdict_overlay_mask_and_map(client, model):
    data = noise_png(96, 72)
    response = post_image(client, data)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = model.predict([Image.open(io.BytesIO(data))])[0]
    assert body["score"] == pytest.approx(expected.score, abs=1e-6)
    assert body["filename"] == "part.png"
    assert body["threshold"] == 0.5
    assert body["anomalous"] is (expected.score >= 0.5)
    assert body["verdict"] == ("anomalous" if body["anomalous"] else "normal")
    assert body["image_size"] == {"width": 96, "height": 72}
    assert body["overlay_size"] == {"width": 96, "height": 72}
    overlay = decode_png(body["overlay_png"])
    assert (overlay.size, overlay.mode) == ((96, 72), "RGB")
    mask = decode_png(body["mask_png"])
    assert (mask.size, mask.mode) == ((96, 72), "L")
    assert set(np.unique(np.asarray(mask))) <= {0, 255}
    # the reduced map keeps the aspect ratio (map_max_side=64) and the model's values
    assert (body["map"]["width"], body["map"]["height"]) == (64, 48)
    values = decode_map(body["map"])
    assert values.min() == pytest.approx(body["map"]["min"])
    assert body["map"]["min"] >= expected.anomaly_map.min() - 1e-3
    assert body["map"]["max"] <= expected.anomaly_map.max() + 1e-3
    fraction = (values >= body["pixel_threshold"] - 1e-4).mean()
    assert body["anomalous_fraction"] == pytest.approx(fraction, abs=0.01)


def test_thresholds_from_the_query_change_verdict_and_mask(client):
    data = noise_png(seed=1)
    low = post_image(client, data, threshold=0.0, pixel_threshold=0.0).json()
    high = post_image(client, data, threshold=1.0, pixel_threshold=10.0).json()
    assert (low["verdict"], high["verdict"]) == ("anomalous", "normal")
    assert (low["threshold"], high["threshold"]) == (0.0, 1.0)
    assert low["anomalous_fraction"] == 1.0 and high["anomalous_fraction"] == 0.0
    assert np.asarray(decode_png(low["mask_png"])).min() == 255
    assert np.asarray(decode_png(high["mask_png"])).max() == 0
    assert low["score"] == high["score"]


@pytest.mark.parametrize("part", ["overlay", "mask"])
def test_predict_png_returns_the_image_itself(client, part):
    data = noise_png(seed=2)
    response = post_image(client, data, format="png", part=part)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    image = decode_png(response.content)
    assert image.size == (96, 72)
    assert image.mode == ("RGB" if part == "overlay" else "L")
    score = post_image(client, data).json()["score"]
    assert float(response.headers["x-anomaly-score"]) == pytest.approx(score, abs=1e-5)
    assert response.headers["x-anomaly-verdict"] in ("normal", "anomalous")


def test_large_images_get_a_reduced_overlay_with_their_aspect(model):
    settings = ServiceSettings(overlay_max_side=100, map_max_side=50)
    with TestClient(create_app(model, settings)) as small_client:
        body = post_image(small_client, noise_png(400, 200)).json()
    assert body["image_size"] == {"width": 400, "height": 200}
    assert body["overlay_size"] == {"width": 100, "height": 50}
    assert decode_png(body["overlay_png"]).size == (100, 50)
    assert (body["map"]["width"], body["map"]["height"]) == (50, 25)


@pytest.mark.parametrize(
    ("mode", "fmt", "content_type"),
    [("L", "JPEG", "image/jpeg"), ("RGBA", "PNG", "application/octet-stream"), ("P", "BMP", "")],
)
def test_other_image_kinds_are_accepted(client, mode, fmt, content_type):
    image = Image.new(mode, (50, 40), 80 if mode in ("L", "P") else (20, 40, 60, 200))
    response = post_image(
        client, encode(image, fmt), name=f"x.{fmt.lower()}", content_type=content_type
    )
    assert response.status_code == 200, response.text
    assert response.json()["image_size"] == {"width": 50, "height": 40}


def test_batch_keeps_order_and_fails_bad_files_alone(client):
    good = [noise_png(seed=3), noise_png(80, 80, seed=4)]
    files = [
        ("files", ("a.png", good[0], "image/png")),
        ("files", ("notes.txt", b"hello", "text/plain")),
        ("files", ("b.png", good[1], "image/png")),
        ("files", ("cut.png", good[1][:100], "image/png")),
    ]
    response = client.post("/v1/predict/batch", files=files)
    assert response.status_code == 200
    body = response.json()
    assert (body["succeeded"], body["failed"]) == (2, 2)
    names = [item["filename"] for item in body["results"]]
    assert names == ["a.png", "notes.txt", "b.png", "cut.png"]
    assert body["results"][1]["status"] == 415
    assert "text/plain" in body["results"][1]["detail"]
    assert body["results"][3]["status"] == 422
    assert "cut.png" in body["results"][3]["detail"]
    assert "truncated" in body["results"][3]["detail"]
    for item, data in zip((body["results"][0], body["results"][2]), good, strict=True):
        assert item["score"] == pytest.approx(post_image(client, data).json()["score"], abs=1e-6)


def test_batch_over_the_file_limit_is_refused(client):
    files = [("files", (f"{i}.png", noise_png(16, 16), "image/png")) for i in range(5)]
    response = client.post("/v1/predict/batch", files=files)
    assert response.status_code == 413
    assert response.json()["detail"] == (
        "5 or more files in one request; the limit is 4 (refused at part 5 without reading "
        "the rest)"
    )


def test_concurrent_requests_each_get_their_own_result(client):
    images = [noise_png(64 + 8 * i, 64, seed=10 + i) for i in range(4)]
    expected = [post_image(client, data).json()["score"] for data in images]
    results: dict[int, list[float]] = {i: [] for i in range(8)}

    def worker(index: int) -> None:
        for _ in range(2):
            results[index].append(post_image(client, images[index % 4]).json()["score"])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, scores in results.items():
        assert scores == [pytest.approx(expected[index % 4], abs=1e-6)] * 2


# information endpoints -------------------------------------------------------------------


def test_health_and_model_information(client):
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["pending"] == 0
    info = client.get("/v1/model").json()
    assert (info["method"], info["methods"], info["scores_sets"]) == (
        "anomalyclip",
        ["anomalyclip"],
        False,
    )
    assert info["backbone"] == "ViT-L/14@336px"
    assert info["image_size"] == 64
    assert info["features"] == [2, 4]
    assert (info["image_threshold"], info["image_threshold_source"]) == (0.5, "calibrated")
    assert (info["pixel_threshold"], info["pixel_threshold_source"]) == (1.0, "calibrated")
    assert info["map_range"] == [0.0, 2.0]
    assert info["limits"] == {
        "max_upload_bytes": MAX_UPLOAD,
        "max_pixels": MAX_PIXELS,
        "max_batch_size": 4,
        "max_set_size": 64,
        "max_set_pixels": 200_000_000,
        "request_timeout_s": 60.0,
        "header_timeout_s": 10.0,
        "body_timeout_s": 15.0,
        "body_deadline_s": 120.0,
        "min_body_rate": 500.0,
        "body_rate_grace_s": 10.0,
    }
    assert info["settings"]["n_ctx"] == 4
    assert client.get("/v1/model", params={"method": "musc"}).status_code == 422


def test_calibrated_thresholds_are_used_and_service_settings_override_them():
    calibrated = tiny_service_model(image_threshold=0.3, pixel_threshold=1.2)
    with TestClient(create_app(calibrated)) as test_client:
        info = test_client.get("/v1/model").json()
        assert (info["image_threshold"], info["image_threshold_source"]) == (0.3, "calibrated")
        assert (info["pixel_threshold"], info["pixel_threshold_source"]) == (1.2, "calibrated")
        assert post_image(test_client, noise_png()).json()["threshold"] == 0.3
    settings = ServiceSettings(image_threshold=0.7)
    with TestClient(create_app(calibrated, settings)) as test_client:
        info = test_client.get("/v1/model").json()
        assert (info["image_threshold"], info["image_threshold_source"]) == (0.7, "given")
        assert info["pixel_threshold_source"] == "calibrated"


def test_openapi_and_docs(client):
    schema = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/predict/batch", "/healthz", "/v1/model"} <= set(schema["paths"])
    predict = schema["paths"]["/v1/predict"]["post"]
    assert {"200", "413", "415", "422", "503", "504"} <= set(predict["responses"])
    assert "multipart/form-data" in predict["requestBody"]["content"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_page_and_its_assets_are_served_from_package_data(client):
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'id="file-input"' in page.text and 'id="image-threshold"' in page.text
    for asset, media in (("app.js", "text/javascript"), ("style.css", "text/css")):
        response = client.get(f"/static/{asset}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(media)
        assert "http://" not in response.text and "https://" not in response.text
    assert "http://" not in page.text and "https://" not in page.text


# limits and errors ---------------------------------------------------------------------


def test_oversized_upload_is_refused_before_reading(client):
    response = post_image(client, b"\0" * (MAX_UPLOAD + 100_000))
    assert response.status_code == 413
    assert "exceeds the limit" in response.json()["detail"]


def test_file_over_the_limit_within_the_body_slack_is_refused(client):
    response = post_image(client, b"\0" * (MAX_UPLOAD + 10), name="huge.png")
    assert response.status_code == 413
    assert response.json()["detail"] == (
        f"huge.png is larger than the upload limit of {MAX_UPLOAD:,} bytes"
    )


def test_chunked_body_is_cut_off_at_the_limit(client):
    def chunks():
        for _ in range(40):
            yield b"x" * 10_000

    response = client.post(
        "/v1/predict",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert response.status_code == 413
    assert "exceeds the limit" in response.json()["detail"]


def test_too_many_pixels_is_refused_from_the_header(client):
    bomb = encode(Image.new("L", (1100, 1000)))
    assert len(bomb) < 20_000
    response = post_image(client, bomb, name="bomb.png")
    assert response.status_code == 413
    assert response.json()["detail"] == (
        "bomb.png is 1100x1000 = 1,100,000 pixels, over the limit of 1,000,000"
    )


@pytest.mark.parametrize(
    ("name", "data", "content_type", "status", "message"),
    [
        ("notes.txt", b"plain text", "text/plain", 415, "notes.txt was sent as text/plain"),
        ("doc.png", b"%PDF-1.4 not an image", "image/png", 415, "doc.png is not an image"),
        ("empty.png", b"", "image/png", 422, "empty.png is empty (0 bytes)"),
        ("cut.png", None, "image/png", 422, "cut.png: corrupt or truncated image"),
    ],
)
def test_bad_uploads_get_clear_json_errors(client, name, data, content_type, status, message):
    if data is None:
        data = noise_png()[:120]
    response = post_image(client, data, name=name, content_type=content_type)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json()["detail"].startswith(message)


def test_request_shape_errors(client):
    as_json = client.post("/v1/predict", json={"file": "a.png"})
    assert as_json.status_code == 415
    assert as_json.json()["detail"] == "send images as multipart/form-data (got application/json)"
    wrong_field = client.post("/v1/predict", files={"image": ("a.png", noise_png(), "image/png")})
    assert wrong_field.status_code == 422
    assert wrong_field.json()["detail"] == "invalid request: body.file: Field required"
    bad_query = post_image(client, noise_png(), threshold="high")
    assert bad_query.status_code == 422
    assert "query.threshold" in bad_query.json()["detail"]
    bad_part = post_image(client, noise_png(), format="png", part="secret")
    assert bad_part.status_code == 422
    assert client.get("/v1/nothing").json() == {"detail": "Not Found"}
    assert client.get("/v1/predict").status_code == 405


def test_no_request_reaches_the_filesystem(client, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    response = post_image(client, noise_png(), name="../../etc/evil.png")
    assert response.status_code == 200
    assert response.json()["filename"] == "evil.png"
    for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/index.html/../app.py"):
        assert client.get(path).status_code == 404
    assert client.get("/static/app.py").status_code == 404
    assert list(tmp_path.iterdir()) == []


def test_display_name_keeps_only_a_printable_base_name():
    assert display_name("C:\\photos\\part 1.png") == "part 1.png"
    assert display_name("a/b\n\x00c.png") == "bc.png"
    assert display_name(None) == "upload"
    assert display_name("dir/") == "upload"


# timeouts and back-pressure ------------------------------------------------------------


def test_slow_inference_times_out_with_504(monkeypatch):
    slow = tiny_service_model()
    original = slow.predict_images

    def predict_slowly(images):
        time.sleep(0.6)
        return original(images)

    monkeypatch.setattr(slow, "predict_images", predict_slowly)
    with TestClient(create_app(slow, ServiceSettings(request_timeout_s=0.1))) as test_client:
        response = post_image(test_client, noise_png())
    assert response.status_code == 504
    assert response.json()["detail"] == "inference did not finish within 0.1 s"


@pytest.mark.parametrize(
    ("settings", "first_size", "second_size"),
    [
        (ServiceSettings(max_pending=1), 0, 0),
        (ServiceSettings(max_pending_bytes=100), 80, 50),
    ],
)
def test_full_queue_answers_503_with_retry_after(model, settings, first_size, second_size):
    worker = InferenceWorker(settings)
    release = threading.Event()

    async def scenario() -> ServiceBusy:
        first = asyncio.ensure_future(worker.run(release.wait, 5, size=first_size))
        await asyncio.sleep(0.05)
        try:
            await worker.run(time.sleep, 0, size=second_size)
        except ServiceBusy as error:
            return error
        finally:
            release.set()
            await first
        raise AssertionError("the second request was accepted")

    error = asyncio.run(scenario())
    assert str(error) == "the service is busy (1 requests waiting); retry shortly"
    assert worker.pending == 0
    # an empty queue lets in even a request larger than the byte budget
    assert asyncio.run(worker.run(len, b"abc", size=10_000)) == 3
    worker.shutdown()


def test_batch_of_large_images_is_scored_in_groups_within_the_pixel_budget(monkeypatch):
    grouped = tiny_service_model()
    original = grouped.predict_images
    group_sizes: list[int] = []

    def counting_predict(images):
        group_sizes.append(len(images))
        return original(images)

    monkeypatch.setattr(grouped, "predict_images", counting_predict)
    images = [noise_png(80, 80, seed=20 + i) for i in range(3)] + [noise_png(20, 20, seed=30)]
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    with TestClient(create_app(grouped, ServiceSettings(max_pixels=10_000))) as test_client:
        body = test_client.post("/v1/predict/batch", files=files).json()
        group_sizes_batch = list(group_sizes)
        singles = [post_image(test_client, data).json()["score"] for data in images]
    assert group_sizes_batch == [1, 1, 2]
    assert [item["score"] for item in body["results"]] == pytest.approx(singles, abs=1e-6)


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="max_upload_bytes must be positive"):
        ServiceSettings(max_upload_bytes=0)
    with pytest.raises(ValueError, match="request_timeout_s must be positive"):
        ServiceSettings(request_timeout_s=0)


# the command ---------------------------------------------------------------------------


def capture_server(monkeypatch, calls: dict) -> None:
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.update(app=app, **kwargs))


def test_serve_command_builds_the_app_and_runs_uvicorn(monkeypatch, model):
    import anomalyclip.cli.serve as serve

    calls: dict = {}
    monkeypatch.setattr(serve.options, "build_predictor", lambda args: model)
    capture_server(monkeypatch, calls)
    args = build_parser().parse_args(
        ["serve", "--checkpoint", "prompts.pt", "--clip-weights", "clip.pt", "--port", "8123"]
        + ["--max-upload-mb", "2", "--max-megapixels", "1.5", "--image-threshold", "0.4"]
        + ["--max-connections", "100", "--header-timeout", "3", "--body-timeout", "4"]
        + ["--max-inflight-mb", "64", "--max-group-images", "2", "--max-concurrent", "8"]
    )
    assert args.host == "127.0.0.1"
    assert args.func(args) == 0
    assert (calls["host"], calls["port"]) == ("127.0.0.1", 8123)
    settings = calls["app"].state.settings
    assert calls["timeout_keep_alive"] == 5
    assert calls["http"].header_timeout_s == 3.0 and calls["http"].max_connections == 100
    assert settings.max_upload_bytes == 2 * 1024 * 1024
    assert settings.max_pixels == 1_500_000
    assert settings.image_threshold == 0.4
    assert (settings.max_connections, settings.header_timeout_s, settings.body_timeout_s) == (
        100,
        3.0,
        4.0,
    )
    assert settings.max_inflight_bytes == 64 * 1024 * 1024
    assert (settings.max_group_images, settings.max_concurrent_requests) == (2, 8)
    with TestClient(calls["app"]) as test_client:
        assert test_client.get("/v1/model").json()["image_threshold"] == 0.4


def test_serve_warns_when_listening_beyond_this_machine(monkeypatch, model, caplog):
    import anomalyclip.cli.serve as serve

    monkeypatch.setattr(serve.options, "build_predictor", lambda args: model)
    capture_server(monkeypatch, {})
    for host, warned in (("0.0.0.0", True), ("::1", False), ("localhost", False)):
        caplog.clear()
        args = build_parser().parse_args(["serve", "--host", host])
        assert args.func(args) == 0
        assert ("no authentication" in caplog.text) is warned, host
