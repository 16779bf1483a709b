"""Load and soak test of ``anomalyclip serve``: concurrent clients, a share of malformed
requests, the server's memory watched through /proc.

Every request has the status it must get (200 for good images; 405, 413, 415 or 422 for
the malformed ones; 503 and 504, the documented "busy" answers, are counted apart); any
other answer, or a connection error, counts as an error. ``--hostile`` adds clients that
misbehave at the socket level (``hostile_clients.py``: idle sockets, slow headers, stalled
and never-ending bodies, slow uploads) and ``--flood-every`` bursts of idle sockets over
the service's connection cap; each must get its 408 or 503 within the service's timeouts.

Against a running service (give its process id to watch its memory):

    python benchmarks/load_test.py --url http://127.0.0.1:8000 --server-pid 1234

Soak: start a server for the run and keep 8 clients busy for five minutes. ``--serve``
takes the command line of a server; without it the script starts one itself with a
small random model (enough to exercise the service, not the model):

    bash -c 'ulimit -n 1024; python benchmarks/load_test.py --duration 300 --json soak.json'
    python benchmarks/load_test.py --duration 300 \\
        --serve "anomalyclip serve --checkpoint c.pt --clip-weights w.pt --port 8765"

A soak (``--duration``) runs 4 hostile clients and a burst of 700 idle sockets every 30 s
beside the 8 HTTP clients unless told otherwise (``--hostile 0``, ``--flood-every``).
``--slow-bodies N`` and ``--non-readers M`` hold that many attackers open throughout, from
127.0.0.2 (``hostile_clients.Siege``): 100 kB uploads sent a byte every 3 s, and batch
requests of ``--non-reader-images`` noise images whose answers are never read. The issue's
acceptance soak (README):

    bash -c 'ulimit -n 1024; python benchmarks/load_test.py --duration 300 \
        --concurrency 4 --slow-bodies 70 --non-readers 60 --serve "anomalyclip serve ..."'
"""

from __future__ import annotations

import argparse
import io
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageDraw

try:
    from benchmarks.hostile_clients import HOSTILE, Answer, Siege, flood, noise_jpeg
except ImportError:  # run as a script: benchmarks/ is on the path, not the repository
    from hostile_clients import HOSTILE, Answer, Siege, flood, noise_jpeg  # type: ignore[no-redef]

GARBAGE = bytes(range(7, 250)) * 4  # no image format starts like this
BUSY = (503, 504)  # documented: too much waiting, or inference too slow
SHORT_TIMEOUTS = {"header_timeout_s": 1.0, "body_timeout_s": 1.0, "body_deadline_s": 3.0}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


# the server under test -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process from /proc (Linux); None where that is unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def random_server_command(port: int, *extra: str) -> list[str]:
    """This script, run as a server of a small random model on 127.0.0.1:port."""
    return [sys.executable, str(Path(__file__).resolve()), "--run-random-server", str(port), *extra]


class ServerProcess:
    """A service started as a subprocess; ready once /healthz answers, stopped on exit."""

    def __init__(self, command: list[str], url: str, startup_timeout_s: float = 120.0) -> None:
        self.command = command
        self.url = url.rstrip("/")
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__

    @property
    def pid(self) -> int:
        assert self.process is not None, "server not started"
        return self.process.pid

    def log_tail(self, size: int = 4000) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-size:]

    def log_summary(self) -> dict[str, Any]:
        """How much the server logged: lines, tracebacks, and its last lines."""
        self._log.seek(0)
        lines = self._log.read().decode("utf-8", "replace").splitlines()
        return {
            "lines": len(lines),
            "tracebacks": sum(line.startswith("Traceback") for line in lines),
            "last_lines": lines[-5:],
        }

    def __enter__(self) -> ServerProcess:
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with status {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise RuntimeError(
            f"server not ready after {self.startup_timeout_s:g} s:\n{self.log_tail()}"
        )

    def __exit__(self, *_: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def run_random_server(
    port: int, max_pending: int, short_timeouts: bool = False, write_timeout_s: float = 30.0
) -> None:
    """Serve a randomly initialised small CLIP: exercises decoding, queueing and rendering
    (AnomalyCLIP, the default method, and MuSc on the same backbone)."""
    import torch

    from anomalyclip.backbone.clip import CLIP, CLIPArchitecture
    from anomalyclip.methods.anomalyclip.config import AnomalyCLIPConfig
    from anomalyclip.methods.anomalyclip.model import AnomalyCLIP
    from anomalyclip.methods.musc.model import MuSc, MuScConfig
    from anomalyclip.serving import ServiceSettings, create_app
    from anomalyclip.serving.connections import run_server

    torch.manual_seed(0)
    torch.set_num_threads(1)  # a model this small only loses from more threads
    architecture = CLIPArchitecture(
        embed_dim=32,
        vision_width=64,
        vision_layers=4,
        vision_patch_size=8,
        vision_grid=4,
        vision_heads=2,
        context_length=77,
        vocab_size=49408,
        text_width=64,
        text_layers=4,
        text_heads=2,
    )
    config = AnomalyCLIPConfig(
        backbone="random-tiny",
        image_size=64,
        features=(2, 4),
        dpam_layers=3,
        n_ctx=4,
        prompt_depth=2,
        deep_prompt_length=2,
    )
    clip = CLIP(architecture).eval()
    model = AnomalyCLIP(clip, config)
    # MuSc beside it on the same backbone, so the page's method choice and sets are served
    musc = MuSc(clip, MuScConfig(backbone="random-tiny", image_size=64, features=(2, 4)))
    methods = {"anomalyclip": model, "musc": musc}
    settings = ServiceSettings(
        max_pending=max_pending,
        write_timeout_s=write_timeout_s,
        **(SHORT_TIMEOUTS if short_timeouts else {}),
    )
    run_server(create_app(methods, settings), settings, "127.0.0.1", port, "warning")


# what is sent --------------------------------------------------------------------------


def synthetic_images(
    count: int = 6, seed: int = 0, max_side: int | None = None
) -> list[tuple[str, bytes, str]]:
    """Varied images as files are: sizes, grey and colour, PNG and JPEG, with a 'defect'.

    ``max_side`` scales them down (aspect kept), for quick runs.
    """
    rng = np.random.default_rng(seed)
    shapes = [(320, 240, "RGB", "PNG"), (512, 512, "L", "JPEG"), (640, 480, "RGB", "JPEG")]
    shapes += [(200, 300, "RGBA", "PNG"), (1024, 768, "RGB", "JPEG"), (96, 96, "L", "PNG")]
    images = []
    for index in range(count):
        width, height, mode, fmt = shapes[index % len(shapes)]
        if max_side is not None and max(width, height) > max_side:
            scale = max_side / max(width, height)
            width, height = max(1, round(width * scale)), max(1, round(height * scale))
        base = rng.normal(128, 20, size=(height, width, 3)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(base).convert(mode)
        draw = ImageDraw.Draw(image)
        x, y = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        draw.ellipse((x, y, x + width // 6, y + height // 6), fill="white" if mode == "L" else None)
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        suffix = "png" if fmt == "PNG" else "jpg"
        images.append((f"synthetic_{index}.{suffix}", buffer.getvalue(), f"image/{suffix}"))
    return images


def folder_images(folder: Path, count: int, seed: int = 0) -> list[tuple[str, bytes, str]]:
    """Up to ``count`` image files found under ``folder``, picked at random."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images under {folder}")
    picked = random.Random(seed).sample(files, min(count, len(files)))
    return [(p.name, p.read_bytes(), "application/octet-stream") for p in picked]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def corrupt_png(side: int = 64) -> bytes:
    """A PNG whose header reads but whose pixel data is damaged: refused at decoding."""
    rng = np.random.default_rng(1)
    data = png_bytes(Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)))
    start = data.index(b"IDAT") + 24
    return data[:start] + b"\xab" * 200 + data[start + 200 :]


@dataclass
class Request:
    kind: str
    expected: int
    method: str
    path: str
    options: dict[str, Any]


def request_kinds(
    images: list[tuple[str, bytes, str]], limits: dict[str, Any]
) -> dict[str, Callable[[random.Random], Request]]:
    """Builders of each kind of request, good ones first; malformed ones fail with a 4xx."""
    side = int(limits["max_pixels"] ** 0.5) + 1
    bomb = png_bytes(Image.new("L", (side, side)))  # a few kB on the wire, too many pixels
    oversized = b"\0" * (limits["max_upload_bytes"] + 256 * 1024)  # refused on its header
    truncated = png_bytes(Image.new("RGB", (64, 64), (200, 10, 10)))[:80]
    corrupt = corrupt_png()
    tiny = png_bytes(Image.new("L", (4, 4)))
    many_parts = [("files", (f"{i}.png", tiny, "image/png")) for i in range(1000)]
    heavy = [("files", (f"heavy{i}.png", GARBAGE * 6000, "image/png")) for i in range(16)]

    def upload(name: str, data: bytes, content_type: str) -> dict[str, Any]:
        return {"files": {"file": (name, data, content_type)}}

    def batch(rng: random.Random) -> Request:
        chosen = rng.sample(images, min(3, len(images)))
        files = [("files", item) for item in chosen]
        return Request("batch", 200, "POST", "/v1/predict/batch", {"files": files})

    return {
        "predict": lambda rng: Request(
            "predict", 200, "POST", "/v1/predict", upload(*rng.choice(images))
        ),
        "predict_png": lambda rng: Request(
            "predict_png",
            200,
            "POST",
            "/v1/predict?format=png&part=mask&pixel_threshold=0.5",
            upload(*images[0]),
        ),
        "batch": batch,
        "oversized": lambda rng: Request(
            "oversized", 413, "POST", "/v1/predict", upload("big.png", oversized, "image/png")
        ),
        "too_many_pixels": lambda rng: Request(
            "too_many_pixels", 413, "POST", "/v1/predict", upload("bomb.png", bomb, "image/png")
        ),
        "not_an_image": lambda rng: Request(
            "not_an_image", 415, "POST", "/v1/predict", upload("notes.txt", b"hello", "text/plain")
        ),
        "garbage_bytes": lambda rng: Request(
            "garbage_bytes", 415, "POST", "/v1/predict", upload("x.png", GARBAGE, "image/png")
        ),
        "truncated": lambda rng: Request(
            "truncated", 422, "POST", "/v1/predict", upload("cut.png", truncated, "image/png")
        ),
        "not_multipart": lambda rng: Request(
            "not_multipart", 415, "POST", "/v1/predict", {"json": {"image": "a.png"}}
        ),
        "wrong_method": lambda rng: Request(
            "wrong_method", 405, rng.choice(["PUT", "DELETE"]), "/v1/predict", {}
        ),
        "inf_threshold": lambda rng: Request(
            "inf_threshold",
            422,
            "POST",
            f"/v1/predict?{rng.choice(['pixel_threshold', 'threshold'])}=inf",
            upload(*images[0]),
        ),
        "corrupt_image": lambda rng: Request(
            "corrupt_image", 422, "POST", "/v1/predict", upload("bad.png", corrupt, "image/png")
        ),
        "thousand_parts": lambda rng: Request(
            "thousand_parts", 413, "POST", "/v1/predict/batch", {"files": many_parts}
        ),
        "heavy_batch": lambda rng: Request(  # 16 x 5.8 MB, none an image: each fails alone
            "heavy_batch", 200, "POST", "/v1/predict/batch", {"files": heavy}
        ),
    }


GOOD_WEIGHTS = {"predict": 0.75, "predict_png": 0.1, "batch": 0.15}


def choose_kind(rng: random.Random, kinds: list[str], malformed_share: float) -> str:
    if rng.random() < malformed_share:
        return rng.choice([k for k in kinds if k not in GOOD_WEIGHTS])
    return rng.choices(list(GOOD_WEIGHTS), weights=list(GOOD_WEIGHTS.values()))[0]


# the run -------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str
    expected: int
    status: int | None
    seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        """The expected answer, or a documented busy one (counted apart)."""
        return self.error is None


@dataclass
class MemoryWatch:
    """Samples a process's RSS in the background."""

    pid: int | None
    interval_s: float = 0.5
    samples: list[tuple[float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> int | None:
        value = rss_bytes(self.pid) if self.pid is not None else None
        if value is not None:
            self.samples.append((time.monotonic() - self._start, value))
        return value

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def send(client: httpx.Client, request: Request) -> Outcome:
    started = time.perf_counter()
    try:
        response = client.request(request.method, request.path, **request.options)
        status = response.status_code
        error = None
        if status != request.expected and status not in BUSY:
            error = f"HTTP {status} (expected {request.expected}): {response.text[:300]}"
        elif status >= 400 and not response.json().get("detail"):
            error = f"HTTP {status} without a JSON detail message"
    except (httpx.HTTPError, ValueError) as exc:
        status, error = None, f"{type(exc).__name__}: {exc}"
    return Outcome(request.kind, request.expected, status, time.perf_counter() - started, error)


def run_load(
    url: str,
    requests: int | None = 50,
    duration_s: float | None = None,
    concurrency: int = 8,
    malformed_share: float = 0.2,
    images: list[tuple[str, bytes, str]] | None = None,
    server_pid: int | None = None,
    warmup: int = 8,
    seed: int = 0,
    timeout_s: float = 120.0,
    hostile: int = 0,
    flood_every_s: float | None = None,
    flood_size: int = 0,
    siege: Siege | None = None,
    healthz_every_s: float = 0.5,
) -> dict[str, Any]:
    """Send requests from ``concurrency`` threads until ``requests`` are done or
    ``duration_s`` has passed; returns the report (see :func:`summarise`).

    ``hostile`` more threads run the socket-level misbehaviours of ``hostile_clients``
    meanwhile, and every ``flood_every_s`` a burst of ``flood_size`` idle sockets opens.
    ``siege`` keeps its slow bodies and non-reading clients open throughout (their counts
    in the report's ``siege``); ``/healthz`` is timed every ``healthz_every_s``.
    """
    if requests is None and duration_s is None:
        raise ValueError("give a number of requests, a duration, or both")
    url = url.rstrip("/")
    limits = httpx.get(f"{url}/v1/model", timeout=timeout_s).json()["limits"]
    builders = request_kinds(images or synthetic_images(), limits)
    kinds = list(builders)
    lock = threading.Lock()
    counter = {"issued": 0}
    outcomes: list[Outcome] = []

    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        rng = random.Random(seed)
        for index in range(warmup):  # first requests allocate buffers: not counted
            send(client, builders[kinds[index % len(kinds)]](rng))

    watch = MemoryWatch(server_pid)
    rss_start = watch.sample()
    started = run_started = time.monotonic()
    deadline = started + duration_s if duration_s is not None else None

    def client_loop(worker: int) -> None:
        rng = random.Random(seed * 1000 + worker + 1)
        with httpx.Client(base_url=url, timeout=timeout_s) as client:
            while True:
                with lock:
                    if requests is not None and counter["issued"] >= requests:
                        return
                    if deadline is not None and time.monotonic() >= deadline:
                        return
                    counter["issued"] += 1
                request = builders[choose_kind(rng, kinds, malformed_share)](rng)
                outcome = send(client, request)
                with lock:
                    outcomes.append(outcome)

    clients_done = threading.Event()

    def record(kind: str, expected: int, answer: Answer) -> None:
        with lock:
            outcomes.append(Outcome(kind, expected, answer.status, answer.seconds, answer.error))

    def hostile_loop(worker: int) -> None:
        rng = random.Random(seed * 1000 + 500 + worker)
        while not clients_done.is_set():
            kind = rng.choice(sorted(HOSTILE))
            try:
                answer = HOSTILE[kind](url, limits)
            except OSError as error:  # could not even connect: the service is down
                answer = Answer(None, 0.0, f"{type(error).__name__}: {error}")
            record(kind, 200 if kind == "slow_upload" else 408, answer)

    def flood_loop() -> None:
        assert flood_every_s is not None
        while not clients_done.wait(flood_every_s):
            for answer in flood(url, limits, flood_size):
                record("idle_flood", 408, answer)

    probes: list[tuple[int | None, float, float]] = []

    def healthz_loop() -> None:
        with httpx.Client(base_url=url, timeout=10) as probe:
            while not clients_done.wait(healthz_every_s):
                started = time.perf_counter()
                try:
                    status: int | None = probe.get("/healthz").status_code
                except httpx.HTTPError:
                    status = None
                took = time.perf_counter() - started
                probes.append((status, took, time.monotonic() - run_started))

    attackers_done = threading.Event()
    with watch:
        if siege is not None:  # the attackers first, so the clients meet them throughout
            besieging = threading.Thread(target=siege.run, args=(attackers_done,), daemon=True)
            besieging.start()
            time.sleep(siege.trickle_s)
        threads = [
            threading.Thread(target=client_loop, args=(index,), daemon=True)
            for index in range(concurrency)
        ]
        others = [
            threading.Thread(target=hostile_loop, args=(i,), daemon=True) for i in range(hostile)
        ]
        if flood_every_s is not None and flood_size > 0:
            others.append(threading.Thread(target=flood_loop, daemon=True))
        others.append(threading.Thread(target=healthz_loop, daemon=True))
        for thread in threads + others:
            thread.start()
        for thread in threads:
            thread.join()
        clients_done.set()
        for thread in others:
            thread.join()
        attackers_done.set()
        if siege is not None:
            besieging.join()
        elapsed = time.monotonic() - started
        settled(url, watch)
    rss_end = watch.sample()
    report = summarise(url, concurrency, elapsed, outcomes, watch, rss_start, rss_end)
    report["healthz"] = probe_summary(probes)
    if siege is not None:
        report["siege"] = siege.summary()
    report["healthy_after"] = health(url)
    return report


def settled(url: str, watch: MemoryWatch, limit_s: float = 120.0) -> None:
    """Wait until the service has nothing queued and its memory stops falling (the
    attackers' connections it still held are dropped by its timeouts)."""
    deadline = time.monotonic() + limit_s
    last = watch.sample()
    while time.monotonic() < deadline:
        time.sleep(5.0)
        try:
            pending = httpx.get(f"{url}/healthz", timeout=10).json()["pending"]
        except (httpx.HTTPError, ValueError, KeyError):
            pending = None
        now = watch.sample()
        if pending == 0 and last is not None and now is not None and now >= last - 2**20:
            return
        last = now


def probe_summary(probes: list[tuple[int | None, float, float]]) -> dict[str, Any]:
    """/healthz during the run: answers by status, latency percentiles, and the slowest
    five (their time into the run: beside a burst of idle sockets, or not)."""
    latencies = sorted(seconds * 1e3 for _, seconds, _ in probes)
    slowest = sorted(probes, key=lambda probe: -probe[1])[:5]
    return {
        "slowest_ms_at_s": [(round(took * 1e3, 1), round(at, 1)) for _, took, at in slowest],
        "probes": len(probes),
        "statuses": dict(Counter(str(status) for status, _, _ in probes)),
        "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": round(latencies[-1], 1) if latencies else None,
    }


def health(url: str) -> dict[str, Any]:
    """/healthz and one good request after the run: the service still serves."""
    try:
        state = httpx.get(f"{url}/healthz", timeout=10).json()
        image = synthetic_images(1, seed=99, max_side=64)[0]
        scored = httpx.post(f"{url}/v1/predict", files={"file": image}, timeout=60)
        return {"healthz": state, "predict_status": scored.status_code}
    except (httpx.HTTPError, ValueError) as error:
        return {"error": f"{type(error).__name__}: {error}"}


def summarise(
    url: str,
    concurrency: int,
    elapsed_s: float,
    outcomes: list[Outcome],
    watch: MemoryWatch,
    rss_start: int | None,
    rss_end: int | None,
) -> dict[str, Any]:
    def mb(value: int | None) -> float | None:
        return None if value is None else round(value / 2**20, 1)

    by_kind: dict[str, Any] = {}
    for kind in sorted({o.kind for o in outcomes}):
        chosen = [o for o in outcomes if o.kind == kind]
        latencies = sorted(o.seconds * 1e3 for o in chosen)
        by_kind[kind] = {
            "expected": chosen[0].expected,
            "count": len(chosen),
            "errors": sum(not o.ok for o in chosen),
            "statuses": dict(Counter(str(o.status) for o in chosen)),
            "p50_ms": round(statistics.median(latencies), 1),
            "p95_ms": percentile(latencies, 0.95),
            "p99_ms": percentile(latencies, 0.99),
        }
    good = sorted(o.seconds * 1e3 for o in outcomes if o.kind in GOOD_WEIGHTS and o.status == 200)
    peak = max((value for _, value in watch.samples), default=None)
    return {
        "url": url,
        "concurrency": concurrency,
        "duration_s": round(elapsed_s, 1),
        "requests": len(outcomes),
        "errors": sum(not o.ok for o in outcomes),
        "malformed": sum(o.expected != 200 for o in outcomes),
        "busy": sum(o.status in BUSY for o in outcomes),
        "good_busy": sum(o.kind in GOOD_WEIGHTS and o.status in BUSY for o in outcomes),
        "good_answered": sum(o.kind in GOOD_WEIGHTS and o.status == 200 for o in outcomes),
        "good_sent": sum(o.kind in GOOD_WEIGHTS for o in outcomes),
        "server_errors": sum(
            o.status is not None and o.status >= 500 and o.status not in BUSY for o in outcomes
        ),
        "good_p50_ms": percentile(good, 0.5),
        "good_p99_ms": percentile(good, 0.99),
        "throughput_rps": round(len(outcomes) / elapsed_s, 2) if elapsed_s > 0 else None,
        "by_kind": by_kind,
        "memory": {
            "server_pid": watch.pid,
            "rss_start_mb": mb(rss_start),
            "rss_end_mb": mb(rss_end),
            "rss_peak_mb": mb(peak),
            "growth_mb": None if rss_start is None or rss_end is None else mb(rss_end - rss_start),
            "samples_mb": [
                (round(t, 1), mb(v)) for t, v in watch.samples[:: max(1, len(watch.samples) // 200)]
            ],
        },
        "error_examples": [f"{o.kind}: {o.error}" for o in outcomes if not o.ok][:10],
    }


def percentile(sorted_values: list[float], share: float) -> float | None:
    if not sorted_values:
        return None
    return round(sorted_values[min(len(sorted_values) - 1, int(share * len(sorted_values)))], 1)


def report_lines(report: dict[str, Any]) -> list[str]:
    memory = report["memory"]
    lines = [
        f"{report['requests']} requests ({report['malformed']} malformed) from "
        f"{report['concurrency']} clients in {report['duration_s']} s "
        f"({report['throughput_rps']} req/s): {report['errors']} errors, {report['busy']} busy "
        f"(503/504), {report['server_errors']} other 5xx",
        f"good requests answered 200: p50 {report['good_p50_ms']} ms, "
        f"p99 {report['good_p99_ms']} ms",
        f"server memory (RSS): start {memory['rss_start_mb']} MB, end {memory['rss_end_mb']} MB, "
        f"peak {memory['rss_peak_mb']} MB, growth {memory['growth_mb']} MB",
    ]
    for kind, stats in report["by_kind"].items():
        lines.append(
            f"  {kind:<16} {stats['count']:>6}  expected {stats['expected']}"
            f"  got {stats['statuses']}"
            f"  p50 {stats['p50_ms']} ms  p99 {stats['p99_ms']} ms  errors {stats['errors']}"
        )
    lines.append(
        f"good requests: {report['good_answered']} of {report['good_sent']} answered 200, "
        f"{report['good_busy']} busy (503/504)"
    )
    if "healthz" in report:
        probes = report["healthz"]
        lines.append(
            f"/healthz: {probes['probes']} probes {probes['statuses']}, p50 {probes['p50_ms']} ms, "
            f"p99 {probes['p99_ms']} ms, max {probes['max_ms']} ms"
        )
    if "siege" in report:
        lines.append(f"siege: {report['siege']}")
    if "healthy_after" in report:
        lines.append(f"after the run: {report['healthy_after']}")
    lines += [f"  error: {example}" for example in report["error_examples"]]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", help="a running service, e.g. http://127.0.0.1:8000")
    target.add_argument("--serve", metavar="COMMAND", help="start this server command for the run")
    target.add_argument("--run-random-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, help="process id of --url's server (memory)")
    parser.add_argument("--port", type=int, help="port of the --serve command (default: parsed)")
    parser.add_argument("--requests", type=int, help="stop after this many (default 50)")
    parser.add_argument("--duration", type=float, metavar="SECONDS", help="soak: run this long")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--malformed", type=float, default=0.2, help="share of bad requests")
    parser.add_argument(
        "--warmup", type=int, default=8, help="requests sent first, not counted (default 8)"
    )
    parser.add_argument("--images", type=Path, help="folder of images to send (default: synthetic)")
    parser.add_argument("--max-pending", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument(
        "--hostile",
        type=int,
        help="socket-level misbehaving clients (default: 4 with --duration, else none)",
    )
    parser.add_argument(
        "--flood-every",
        type=float,
        metavar="SECONDS",
        help="open a burst of idle sockets this often (default: 30 with --duration, else never)",
    )
    parser.add_argument(
        "--flood-size",
        type=int,
        default=700,
        help="idle sockets per burst (default 700: over the cap of 256, within ulimit -n 1024)",
    )
    parser.add_argument(
        "--slow-bodies",
        type=int,
        default=0,
        help="sockets kept open throughout, each a 100 kB upload sent a byte every 3 s",
    )
    parser.add_argument(
        "--non-readers",
        type=int,
        default=0,
        help="sockets kept open throughout, each a batch request whose answer is never read",
    )
    parser.add_argument(
        "--non-reader-images",
        type=int,
        default=2,
        help="images in each non-reader's batch (noise JPEGs, 1024 px: large overlays)",
    )
    parser.add_argument(
        "--short-timeouts",
        action="store_true",
        help="the random server times out headers and bodies in 1 s, bodies in all in 3 s",
    )
    parser.add_argument("--write-timeout", type=float, default=30.0, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)

    if args.run_random_server is not None:
        run_random_server(
            args.run_random_server, args.max_pending, args.short_timeouts, args.write_timeout
        )
        return 0
    requests = args.requests if args.requests or args.duration else 50
    soak = args.duration is not None
    hostile = args.hostile if args.hostile is not None else (4 if soak else 0)
    flood_every = args.flood_every if args.flood_every is not None else (30.0 if soak else None)
    images = folder_images(args.images, 24) if args.images else None
    attack_images = [noise_jpeg(1024, seed) for seed in range(args.non_reader_images)]

    def execute(url: str, pid: int | None) -> dict[str, Any]:
        return run_load(
            url,
            requests=requests,
            duration_s=args.duration,
            concurrency=args.concurrency,
            malformed_share=args.malformed,
            images=images,
            server_pid=pid,
            warmup=args.warmup,
            hostile=hostile,
            flood_every_s=flood_every,
            flood_size=args.flood_size,
            siege=Siege(url, args.slow_bodies, args.non_readers, attack_images)
            if args.slow_bodies or args.non_readers
            else None,
        )

    if args.url:
        report = execute(args.url, args.server_pid)
    else:
        if args.serve:
            command = shlex.split(args.serve)
            port = args.port or int(command[command.index("--port") + 1])
        else:
            port = free_port()
            command = random_server_command(port, *(["--short-timeouts"] * args.short_timeouts))
        url = f"http://127.0.0.1:{port}"
        with ServerProcess(command, url) as server:
            report = execute(url, server.pid)
            report["server_log"] = server.log_summary()
    for line in report_lines(report):
        print(line)
    if args.json:
        from anomalyclip.utils.atomic import atomic_write_json

        atomic_write_json(args.json, report)
        print(f"report written to {args.json}")
    healthy = report.get("healthy_after", {}).get("predict_status") == 200
    return 0 if report["errors"] == 0 and report["server_errors"] == 0 and healthy else 1


if __name__ == "__main__":
    sys.exit(main())
