"""What a request may take, in-process: parts and bytes counted as the body streams, the
shared upload budget, cancelled work, refused thresholds, methods, paths and the log."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from anomalyclip.serving import ServiceSettings, create_app
from anomalyclip.serving.connections import RepeatedErrorFilter
from anomalyclip.serving.schemas import sanitised, without_path
from tests.helpers import SlowCalls, noise_png, post_image, tiny_service_model

BOUNDARY = b"limitsboundary"


def multipart(parts: int, size: int = 1000) -> bytes:
    piece = b"".join(
        b"--" + BOUNDARY + b"\r\n"
        b'Content-Disposition: form-data; name="files"; filename="%d.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" % index + b"\x89" * size + b"\r\n"
        for index in range(parts)
    )
    return piece + b"--" + BOUNDARY + b"--\r\n"


async def call_app(
    app: Any,
    path: str,
    body: bytes,
    *,
    content_length: int | None = None,
    chunk: int = 4096,
    hold: asyncio.Event | None = None,
) -> tuple[int, dict[str, Any], int]:
    """One request straight into the ASGI app: (status, JSON body, body bytes it read)."""
    headers = [(b"content-type", b"multipart/form-data; boundary=" + BOUNDARY)]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    read = {"bytes": 0, "index": 0}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if hold is not None:
            await hold.wait()
        if read["index"] >= len(pieces):
            await asyncio.sleep(3600)  # a client that waits for the answer
        piece = pieces[read["index"]]
        read["index"] += 1
        read["bytes"] += len(piece)
        return {"type": "http.request", "body": piece, "more_body": read["index"] < len(pieces)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(payload), read["bytes"]


# parts and bytes, as the body streams -------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return tiny_service_model()


def test_a_thousand_part_body_is_refused_at_part_seventeen_unread(model):
    app = create_app(model, ServiceSettings(max_batch_size=16))
    body = multipart(1000)
    status, payload, read = asyncio.run(call_app(app, "/v1/predict/batch", body))
    assert status == 413
    assert payload["detail"] == (
        "17 or more files in one request; the limit is 16 (refused at part 17 without "
        "reading the rest)"
    )
    part = len(body) // 1000
    assert read <= 17 * part + 4096, (read, len(body))  # about 2 % of the body


def test_a_part_over_the_file_limit_is_refused_as_it_streams(model):
    app = create_app(model, ServiceSettings(max_upload_bytes=50_000))
    body = multipart(2, size=400_000)
    status, payload, read = asyncio.run(call_app(app, "/v1/predict/batch", body))
    assert status == 413
    assert payload["detail"] == "0.png is larger than the upload limit of 50,000 bytes"
    assert read < 60_000


def test_a_declared_length_over_the_limit_is_refused_before_reading(model):
    settings = ServiceSettings(max_upload_bytes=100_000)
    app = create_app(model, settings)
    status, payload, read = asyncio.run(
        call_app(app, "/v1/predict", b"x" * 10, content_length=10_000_000)
    )
    assert (status, read) == (413, 0)
    assert "request body of 10,000,000 bytes exceeds the limit of" in payload["detail"]


def test_uploads_share_one_byte_budget_across_requests(model):
    settings = ServiceSettings(max_upload_bytes=1_000_000, max_inflight_bytes=1_500_000)
    app = create_app(model, settings)

    async def scenario() -> tuple[int, dict, int]:
        body = multipart(1, size=900_000)
        first = asyncio.ensure_future(
            call_app(app, "/v1/predict", body, content_length=len(body), hold=asyncio.Event())
        )
        await asyncio.sleep(0.05)  # the first request holds 900 kB of the 1.5 MB
        second = await call_app(app, "/v1/predict", body, content_length=len(body))
        first.cancel()
        return second

    status, payload, read = asyncio.run(scenario())
    assert (status, read) == (503, 0)
    assert payload["detail"].startswith("the service holds 900,")
    assert payload["detail"].endswith("near its limit of 1,500,000; retry shortly")


# work nobody waits for -----------------------------------------------------------------


def test_a_timed_out_batch_stops_after_at_most_one_more_image(monkeypatch):
    slow_model = tiny_service_model()
    slow = SlowCalls(slow_model, 0.25)
    monkeypatch.setattr(slow_model, "predict_images", slow)
    settings = ServiceSettings(request_timeout_s=0.6, max_group_images=1)
    files = [("files", (f"{i}.png", noise_png(32, 32, seed=i), "image/png")) for i in range(12)]
    with TestClient(create_app(slow_model, settings)) as client:
        timed_out = client.post("/v1/predict/batch", files=files)
        calls_at_timeout = len(slow.calls)
        started = time.monotonic()
        following = post_image(client, noise_png(32, 32))
        waited = time.monotonic() - started
        time.sleep(0.3)
    assert timed_out.status_code == 504
    assert following.status_code == 200, following.text
    # the batch ran at most one more image after its client's timeout, then gave way
    assert set(slow.calls) == {1}
    assert len(slow.calls) - 1 <= calls_at_timeout + 1, (calls_at_timeout, slow.calls)
    assert waited < 1.5  # the rest of the batch alone would take 2 s more


def test_a_timed_out_request_still_queued_never_runs(monkeypatch):
    slow_model = tiny_service_model()
    slow = SlowCalls(slow_model, 0.5)
    monkeypatch.setattr(slow_model, "predict_images", slow)
    settings = ServiceSettings(request_timeout_s=0.3)
    with TestClient(create_app(slow_model, settings)) as client:
        results: list[int] = []

        def post() -> None:
            results.append(post_image(client, noise_png(32, 32)).status_code)

        threads = [threading.Thread(target=post) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        time.sleep(0.6)
    assert sorted(results) == [504, 504, 504]
    assert len(slow.calls) == 1  # the two queued behind the first were dropped unstarted


# small ones ------------------------------------------------------------------------------


def test_multipart_without_a_boundary_is_a_clear_400(model):
    with TestClient(create_app(model)) as client:
        response = client.post(
            "/v1/predict", content=b"abc", headers={"content-type": "multipart/form-data"}
        )
    assert response.status_code == 400
    assert response.json() == {"detail": "multipart/form-data without a boundary parameter"}


def test_wrong_methods_on_upload_routes_answer_405(model):
    with TestClient(create_app(model)) as client:
        for method in ("PUT", "DELETE", "PATCH"):
            response = client.request(method, "/v1/predict", content=b"abc")
            assert response.status_code == 405, method
            assert response.json() == {"detail": "Method Not Allowed"}
        assert client.put("/v1/predict/batch").status_code == 405


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity"])
def test_non_finite_thresholds_are_refused(model, value):
    with TestClient(create_app(model)) as client:
        for name in ("pixel_threshold", "threshold"):
            response = post_image(client, noise_png(), **{name: value})
            assert response.status_code == 422, (name, value)
            detail = response.json()["detail"]
            assert detail.startswith(f"invalid request: query.{name}: "), detail
            assert "finite" in detail


def test_model_information_names_files_without_their_paths(model, monkeypatch):
    original = model.settings

    def with_paths() -> dict[str, Any]:
        settings = original()
        settings["backbone"] = "/home/alice/models/ViT-L-14-336px.pt"
        settings["backbone_identity"] = {
            **settings["backbone_identity"],
            "name": "C:\\Users\\alice\\clip.pt",
            "sha256": "ab" * 32,
        }
        settings["references"] = {"sources": ["/srv/data/good/001.png", "refs/002.png"]}
        return settings

    monkeypatch.setattr(model, "settings", with_paths)
    with TestClient(create_app(model)) as client:
        info = client.get("/v1/model").json()
        page = client.get("/static/app.js").text
    text = json.dumps(info)
    for secret in ("/home/alice", "alice\\\\", "/srv/data", "refs/"):
        assert secret not in text, secret
    assert info["backbone"] == "ViT-L-14-336px.pt"
    assert info["backbone_sha256"] == "ab" * 32
    assert info["settings"]["backbone_identity"]["name"] == "clip.pt"
    assert info["settings"]["references"]["sources"] == ["001.png", "002.png"]
    assert "backbone_sha256" in page


def test_paths_are_reduced_but_names_with_slashes_kept():
    assert without_path("ViT-L/14@336px") == "ViT-L/14@336px"
    assert without_path("~/weights/clip.pt") == "clip.pt"
    assert without_path("D:/data/") == "data"
    assert without_path("checkpoints/mvtec.pt") == "mvtec.pt"
    assert without_path("mvtec") == "mvtec"
    assert sanitised({"a": [float("nan"), "/x/y.png", 3]}) == {"a": [None, "y.png", 3]}


def test_non_finite_scores_are_a_json_500_never_a_verdict(monkeypatch):
    from anomalyclip.predictor import NonFiniteScoreError

    broken = tiny_service_model()

    def fail(images):
        raise NonFiniteScoreError("anomalyclip produced a non-finite score for image 1")

    monkeypatch.setattr(broken, "predict_images", fail)
    with TestClient(create_app(broken), raise_server_exceptions=False) as client:
        response = post_image(client, noise_png())
    assert response.status_code == 500
    assert response.json() == {
        "detail": "anomalyclip produced a non-finite score for image 1; no verdict given"
    }


def test_repeated_descriptor_errors_are_logged_once_per_interval():
    shared = RepeatedErrorFilter(interval_s=60)
    logger = logging.getLogger("test.accept")
    records = []
    for _ in range(1000):
        error = OSError(24, "Too many open files")
        record = logger.makeRecord(
            "asyncio", logging.ERROR, __file__, 1, "socket.accept() out of system resource",
            None, (OSError, error, None),
        )  # fmt: skip
        if shared.filter(record):
            records.append(record)
    other = logger.makeRecord("asyncio", logging.ERROR, __file__, 1, "other", None, None)
    assert shared.filter(other)
    assert len(records) == 1
    assert records[0].exc_info is None
    assert "Too many open files" in records[0].getMessage()
    shared.last -= 61
    assert shared.filter(record)
    assert "999 more like it in the last 60 s were not logged" in record.getMessage()


def test_a_set_for_a_per_image_method_is_scored_in_groups(monkeypatch):
    """64 large images sent to /v1/predict/set were one batch of 64 (RSS 1.3 -> 2.8 GB):
    a method that scores each image alone keeps the groups of /batch."""
    model = tiny_service_model()
    counted = SlowCalls(model, 0.0)
    monkeypatch.setattr(model, "predict_images", counted)
    settings = ServiceSettings(max_group_images=3)
    files = [("files", (f"{i}.png", noise_png(seed=i), "image/png")) for i in range(8)]
    with TestClient(create_app(model, settings)) as client:
        answer = client.post("/v1/predict/set", files=files)
    assert answer.status_code == 200 and len(answer.json()["results"]) == 8
    assert counted.calls == [3, 3, 2]


def test_work_that_would_outlast_the_timeout_is_refused_up_front():
    """64 tiny PNGs passed every byte and pixel limit and took 390 s: the cost of a
    request is estimated from the same work before, and refused with 413 if it would
    run past the timeout."""
    model = tiny_service_model()
    files = [("files", (f"{i}.png", noise_png(32, 32, seed=i), "image/png")) for i in range(6)]
    with TestClient(create_app(model, ServiceSettings(request_timeout_s=5.0))) as client:
        first = client.post("/v1/predict/batch", files=files[:2])
        assert first.status_code == 200  # nothing measured yet: only the count limits
        costs = client.app.state.worker.costs
        costs.observe("anomalyclip", "images", 1, 2.0)  # as if an image took 2 s
        refused = client.post("/v1/predict/batch", files=files)
        assert refused.status_code == 413
        assert "6 images would take about 12 s" in refused.json()["detail"]
        assert "send at most 2" in refused.json()["detail"]
        costs.observe("anomalyclip", "references", 1, 2.0)
        references = client.post("/v1/references", files=files)
        assert references.status_code == 413


def test_a_set_costs_the_square_of_its_size():
    from anomalyclip.serving.costs import WorkCosts
    from anomalyclip.serving.uploads import UploadTooLarge

    costs = WorkCosts()
    costs.observe("musc", "set", 10, 1.0)  # 100 pairs in a second
    assert costs.estimate("musc", "set", 20) == pytest.approx(4.0)
    assert costs.estimate("musc", "images", 20) is None
    with pytest.raises(UploadTooLarge, match="send at most 30 in a set"):
        costs.check("musc", "set", 64, timeout_s=9.5)
