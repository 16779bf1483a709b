"""The service's streams and operators' marks: ``/v1/streams/{name}`` on a tiny model,
the audit log's lines under concurrent marks, and ``anomalyclip bank``."""

from __future__ import annotations

import io
import json
import threading

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from anomalyclip.inspection.bank import AuditLog, bank_id, image_sha256
from anomalyclip.inspection.streams import Stream, Upload
from anomalyclip.serving import ServiceSettings, create_app
from tests.helpers import noise_png, tiny_service_model


def send(client, name: str, data: bytes, filename: str = "part.png", **query):
    response = client.post(
        f"/v1/streams/{name}/images",
        params=query,
        files=[("files", (filename, data, "image/png"))],
    )
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def client(tmp_path):
    settings = ServiceSettings(audit_log=str(tmp_path / "audit.jsonl"))
    with TestClient(create_app(tiny_service_model(), settings)) as test_client:
        yield test_client


def test_marking_a_scored_image_normal_lowers_its_score_and_undo_restores(client, tmp_path):
    part = noise_png(seed=7)
    first = send(client, "line3", part)
    (result,) = first["results"]
    assert result["phase"] == "alone" and result["bank_id"] == "empty"
    sha = result["sha256"]
    assert sha == image_sha256(part)

    marked = client.post("/v1/streams/line3/marks", json={"image_sha256": sha, "verdict": "normal"})
    assert marked.status_code == 200, marked.text
    entry = marked.json()["audit"]
    assert entry["bank_before"] == "empty" and entry["bank_after"] == bank_id([sha])
    again = send(client, "line3", part)["results"][0]
    assert again["bank_id"] == bank_id([sha]) and again["bank_size"] == 1
    assert again["score"] < result["score"] - 0.01  # the image is its own reference now

    undone = client.post("/v1/streams/line3/undo", json={"bank_id": "empty"})
    assert undone.json()["stream"]["bank"]["id"] == "empty"
    restored = send(client, "line3", part)["results"][0]
    assert restored["score"] == pytest.approx(result["score"], abs=1e-6)

    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert [json.loads(line)["verdict"] for line in lines] == ["normal", "undo"]
    assert client.get("/v1/streams/line3/audit").json()[0]["image_sha256"] == sha


def test_a_defect_mark_is_recorded_and_unknown_images_are_refused(client):
    part = noise_png(seed=8)
    sha = send(client, "line4", part)["results"][0]["sha256"]
    marked = client.post("/v1/streams/line4/marks", json={"image_sha256": sha, "verdict": "defect"})
    assert marked.json()["stream"]["marked_defect"] == [sha]
    assert marked.json()["stream"]["bank"]["id"] == "empty"
    unknown = client.post(
        "/v1/streams/line4/marks", json={"image_sha256": "0" * 64, "verdict": "normal"}
    )
    assert unknown.status_code == 404 and "has scored no image" in unknown.json()["detail"]
    assert client.get("/v1/streams/nope").status_code == 404


def test_concurrent_marks_lose_nothing(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    stream = Stream("line", tiny_service_model(), window=2, image_threshold=None, audit=audit)
    images = [noise_png(seed=seed) for seed in range(40)]
    stream.score([Upload(f"p{i}.png", data, Image.new("RGB", (8, 8))) for i, data in
                  enumerate(images)])  # fmt: skip
    digests = [image_sha256(data) for data in images]
    barrier = threading.Barrier(8)

    def mark(part: list[str]) -> None:
        barrier.wait()
        for sha in part:
            stream.mark(sha, "normal")

    threads = [threading.Thread(target=mark, args=(digests[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert sorted(e["image_sha256"] for e in entries) == sorted(digests)
    # applied one after another: each change starts from the bank the previous one left
    for previous, following in zip(entries, entries[1:], strict=False):
        assert following["bank_before"] == previous["bank_after"]
    assert len(stream.scorer.bank.versions) == 41  # the empty bank, then one per mark


def test_bank_cli_adds_removes_keeps_versions_and_audits(tmp_path, capsys):
    from tests.helpers import cli

    parts = tmp_path / "good"
    parts.mkdir()
    for seed in range(3):
        (parts / f"g{seed}.png").write_bytes(noise_png(seed=seed))
    bank_file = tmp_path / "line3.bank.json"
    assert cli("bank", "add", str(bank_file), str(parts)) == 0
    digests = sorted(image_sha256(p) for p in parts.iterdir())
    full = bank_id(digests)
    assert cli("bank", "remove", str(bank_file), str(parts / "g1.png")) == 0
    capsys.readouterr()
    assert cli("bank", "info", str(bank_file)) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["size"] == 2 and full in shown["versions"]
    assert shown["id"] == bank_id([image_sha256(parts / "g0.png"), image_sha256(parts / "g2.png")])
    assert cli("bank", "info", str(bank_file), "--restore", full) == 0
    assert json.loads(capsys.readouterr().out)["id"] == full
    audit = [json.loads(x) for x in (tmp_path / "line3.bank.audit.jsonl").read_text().splitlines()]
    assert [e["verdict"] for e in audit] == ["normal"] * 3 + ["removed", "undo"]
    assert audit[2]["bank_after"] == full and audit[4]["bank_after"] == full


def test_a_set_method_stream_waits_for_its_cold_start_then_scores_against_the_bank():
    from anomalyclip.methods.musc.model import MuSc, MuScConfig
    from tests.factories import tiny_clip

    musc = MuSc(tiny_clip(), MuScConfig(backbone="tiny", image_size=32, features=(2, 4)))
    with TestClient(create_app(musc)) as client:
        first = send(client, "set", noise_png(seed=1), window=2)
        assert first["results"] == [] and first["stream"]["cold_start_waiting"] == 1
        second = send(client, "set", noise_png(seed=2), window=2)
        assert [r["phase"] for r in second["results"]] == ["cold-start", "cold-start"]
        assert second["stream"]["bank"]["size"] == 2
        third = send(client, "set", noise_png(seed=3), window=2)["results"][0]
        assert third["phase"] == "bank" and third["bank_size"] == 2
        assert third["bank_id"] == second["stream"]["bank"]["id"]


def test_marks_recompute_a_threshold_set_for_a_false_alarm_rate(tmp_path, caplog):
    """A threshold calibrated for a stated false-alarm rate follows the good set: each
    mark recomputes it (the conformal cut of the good scores), the log says how it
    moved and the audit line holds it before and after."""
    import logging

    import numpy as np

    from anomalyclip.calibration import conformal_threshold

    model = tiny_service_model(image_threshold=0.5)
    model.config.extra["false_alarm"] = {"target": 0.25, "applies_to": ["image"]}
    audit = AuditLog(tmp_path / "audit.jsonl")
    stream = Stream("line", model, window=8, image_threshold=None, audit=audit)
    images = [noise_png(48, 48, seed=seed) for seed in range(6)]
    uploads = [Upload(f"p{i}.png", data, Image.open(io.BytesIO(data)).convert("RGB"))
               for i, data in enumerate(images)]  # fmt: skip
    results = stream.score(uploads)
    scores = {r.item.sha256: float(r.prediction.score) for r in results}
    digests = [image_sha256(data) for data in images]
    with caplog.at_level(logging.INFO):
        for sha in digests[:2]:  # two good images: too few for 0.25 (3 are needed)
            stream.mark(sha, "normal")
        assert stream.thresholds()["image"] == 0.5
        stream.mark(digests[2], "normal")
        stream.mark(digests[3], "defect")
    expected, _ = conformal_threshold(np.array([scores[s] for s in digests[:3]]), 0.25)
    assert stream.thresholds()["image"] == pytest.approx(expected)
    assert "stream line: image threshold 0.5 ->" in caplog.text
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert entries[2]["thresholds_before"]["image"] == 0.5
    assert entries[2]["thresholds_after"]["image"] == pytest.approx(expected)


def test_a_rolling_bank_encodes_only_the_images_it_has_not_encoded(monkeypatch):
    """An admission changes MuSc's bank by one image: only that image is encoded (and
    each image scored), not the whole bank again; scores, maps and the seed's edge are
    those of the bank built whole."""
    import dataclasses

    import numpy as np

    from anomalyclip.inspection.stream import StreamItem, StreamScorer
    from anomalyclip.methods import METHODS
    from anomalyclip.methods.musc import few_shot
    from anomalyclip.methods.musc.model import MuSc, MuScConfig
    from tests.factories import tiny_clip

    musc = MuSc(tiny_clip(), MuScConfig(backbone="tiny", image_size=32, features=(2, 4)))
    items = []
    for seed in range(8):
        data = noise_png(48, 48, seed=seed)
        items.append(
            StreamItem(data, image_sha256(data), f"{seed}.png", Image.open(io.BytesIO(data)))
        )
    encoded: list[int] = []  # images per call of MuSc's encoder in its reference mode
    real_vectors = few_shot._vectors

    def counted(model, images):
        encoded.append(len(images))
        return real_vectors(model, images)

    monkeypatch.setattr(few_shot, "_vectors", counted)

    def run(threshold: float | None) -> tuple[list, float | None, int]:
        encoded.clear()
        scorer = StreamScorer(musc, window=3, image_threshold=threshold)
        results = scorer.submit(items)
        assert [r.phase for r in results] == ["cold-start"] * 3 + ["bank"] * 5
        return results, scorer.admission_threshold, sum(encoded)

    cached = {threshold: run(threshold) for threshold in (1e9, None)}
    entry = dataclasses.replace(METHODS["musc"], encodes_references=False)
    monkeypatch.setitem(METHODS, "musc", entry)
    whole = {threshold: run(threshold) for threshold in (1e9, None)}
    # every image admitted: the first scored against the bank encodes its 3 members, each
    # later one the image admitted before it, and each of the 5 is encoded to be scored:
    # 3 + 4 + 5 = 12, where rebuilding the bank at each admission took 3 x 5 + 5 = 20
    assert cached[1e9][2] == 12 and whole[1e9][2] == 20
    # the seed's leave-one-out edge: each seed image encoded once (3 + 3 scored), not
    # once per other seed image (6 + 3)
    assert whole[None][2] - cached[None][2] >= 3
    for threshold in (1e9, None):
        (results, edge, _), (expected, expected_edge, _) = cached[threshold], whole[threshold]
        assert edge == expected_edge
        for got, want in zip(results, expected, strict=True):
            assert got.prediction.score == want.prediction.score
            np.testing.assert_array_equal(got.prediction.anomaly_map, want.prediction.anomaly_map)
            assert (got.admitted, got.bank_id) == (want.admitted, want.bank_id)


def test_a_bank_put_together_from_encoded_images_is_the_bank_built_whole():
    """Wide parts (fitted whole, MuSc's auto coverage) and a bank whose shapes change the
    fitting: the bank of encoded references is the reference mode's, vector for vector."""
    from anomalyclip.methods.musc import few_shot
    from anomalyclip.methods.musc.model import MuSc, MuScConfig
    from tests.factories import tiny_clip

    musc = MuSc(tiny_clip(), MuScConfig(backbone="tiny", image_size=32, features=(2, 4)))
    wide = [Image.open(io.BytesIO(noise_png(96, 32, seed=seed))) for seed in range(3)]
    square = Image.open(io.BytesIO(noise_png(40, 40, seed=9)))
    for references in (wide, [square, square.copy()], [square, *wide]):
        encoded = [few_shot.encode_references(musc, [image])[0] for image in references]
        built = few_shot.references_from_encoded(musc, encoded, references)
        whole = few_shot.MuScWithReferences.from_images(musc, references)
        assert built.resize == whole.resize and built.sources == whole.sources
        assert all(torch.equal(built.bank[key], whole.bank[key]) for key in whole.bank)
