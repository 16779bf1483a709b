"""The one inference thread: requests queue for it, so memory stays bounded under load.

Free of HTTP: a full queue raises :class:`ServiceBusy`, a request that waits too long
:class:`InferenceTimeout`, one whose client left :class:`ClientGone`, an undecodable file
becomes an :class:`~anomalyclip.serving.uploads.InvalidUpload` in its slot; the routes
decide what status each one means.

Work nobody waits for is stopped: a request that timed out or whose client left is
cancelled between images (between groups of at most ``max_group_images``), so it neither
holds the thread nor makes the requests queued behind it time out too.

Clients take turns: queued jobs are run round-robin by client address, not first come
first served, and one client may hold at most half of ``max_pending``, so sixty
connections of one client (clients that never read their answers, reconnecting as they
are dropped) neither fill the queue nor keep another client's request behind all of
theirs. (Behind a reverse proxy every request has the proxy's address: the proxy should
then bound each client itself.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

from PIL import Image

from anomalyclip.postprocess import PostProcessor
from anomalyclip.predictor import Predictor
from anomalyclip.preprocess import ImageLoadError, load_image
from anomalyclip.serving.costs import Work, WorkCosts
from anomalyclip.serving.rendering import Rendered, Scored, render
from anomalyclip.serving.settings import ServiceSettings
from anomalyclip.serving.uploads import InvalidUpload, TooFewImages, Upload, UploadError
from anomalyclip.utils.cancellation import Cancelled, cancellable

logger = logging.getLogger(__name__)


class ServiceBusy(Exception):
    """Too many requests (or bytes) are already waiting for the model."""


class InferenceTimeout(Exception):
    """A request waited for, or ran on, the model longer than the request timeout."""


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


class Abandoned(Exception):
    """Raised on the worker thread: the job's request no longer waits (stopped early)."""


Outcome = Rendered | Scored | UploadError


class InferenceWorker:
    """One thread runs the models; requests queue for it.

    At most ``max_pending`` requests and ``max_pending_bytes`` of uploads wait at once (a
    single request is always let in), so memory stays bounded under any load; one client
    (by address) at most half as many requests, and clients' jobs run in turn (see the
    module's docstring). The lock also guards the models against anyone else sharing the
    same instances.
    """

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anomalyclip")
        self._model_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._pending = 0
        self._pending_bytes = 0
        self._by_client: Counter[str] = Counter()
        # each client's queued jobs; the client first in line runs next, then goes last
        self._turns: OrderedDict[str, deque[tuple[Future[Any], Callable[[], Any]]]] = OrderedDict()
        self._cancel: threading.Event | None = None  # the running job's; one thread only
        self.costs = WorkCosts()

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def client_share(self) -> int:
        """The most requests one client may have waiting or running at once."""
        return max(1, self.settings.max_pending // 2)

    def _admit(self, size: int, client: str) -> None:
        with self._count_lock:
            full = self._pending >= self.settings.max_pending or (
                self._pending > 0 and self._pending_bytes + size > self.settings.max_pending_bytes
            )
            if full:
                raise ServiceBusy(
                    f"the service is busy ({self._pending} requests waiting); retry shortly"
                )
            if self._by_client[client] >= self.client_share:
                raise ServiceBusy(
                    f"this client already has {self._by_client[client]} requests waiting, its "
                    f"share of the service's {self.settings.max_pending}; retry shortly"
                )
            self._pending += 1
            self._pending_bytes += size
            self._by_client[client] += 1

    def _release(self, size: int, client: str) -> None:
        with self._count_lock:
            self._pending -= 1
            self._pending_bytes -= size
            self._by_client[client] -= 1
            if not self._by_client[client]:
                del self._by_client[client]

    def _queue(self, client: str, call: Callable[[], Any]) -> Future[Any]:
        """Queue ``call`` behind the client's own jobs; one turn is taken per job queued."""
        task: Future[Any] = Future()
        with self._count_lock:
            self._turns.setdefault(client, deque()).append((task, call))
        self._executor.submit(self._next_turn)
        return task

    def _next_turn(self) -> None:
        """Run the job of the client first in line (it then goes to the back of the line);
        a job cancelled while queued is skipped."""
        with self._count_lock:
            if not self._turns:  # cleared by shutdown
                return
            client, jobs = self._turns.popitem(last=False)
            task, call = jobs.popleft()
            if jobs:
                self._turns[client] = jobs
        if not task.set_running_or_notify_cancel():
            return
        try:
            task.set_result(call())
        except BaseException as error:  # handed to the request that waits for it
            task.set_exception(error)

    async def run(
        self,
        job: Callable[..., Any],
        *args: Any,
        size: int = 0,
        gone: Callable[[], Awaitable[object]] | None = None,
        work: Work | None = None,
        client: str = "",
    ) -> Any:
        """``job(*args)`` on the worker thread; ``size`` is the bytes it holds while waiting.

        ``gone``, if given, returns once the client has left. The job is then, as on a
        timeout, marked cancelled: not started if still queued, stopped at its next
        :meth:`check_cancelled` if running. ``work`` says what the job is: work estimated
        (from earlier jobs of its kind) to run past the timeout is refused with 413 before
        it is queued, and the job's own run time is recorded for the next estimates.
        ``client`` (its address) is whose turn and share the job takes.
        """
        if work is not None:
            self.costs.check(work.method, work.kind, work.count, self.settings.request_timeout_s)
        self._admit(size, client)
        cancel = threading.Event()
        future = self._queue(client, partial(self._guarded, cancel, work, job, *args))
        future.add_done_callback(lambda _: self._release(size, client))
        result = asyncio.wrap_future(future)
        watcher = asyncio.ensure_future(gone()) if gone is not None else None
        waiting: set[asyncio.Future[Any]] = {result} if watcher is None else {result, watcher}
        try:
            done, _ = await asyncio.wait(
                waiting, timeout=self.settings.request_timeout_s, return_when="FIRST_COMPLETED"
            )
            if result in done:
                return result.result()
            if watcher is not None and watcher in done:
                raise ClientGone("the client closed the connection; its work was cancelled")
            raise InferenceTimeout(
                f"inference did not finish within {self.settings.request_timeout_s:g} s"
            )
        finally:
            if not result.done():
                cancel.set()
                result.cancel()  # drops a queued job; a running one stops at its next check
            if watcher is not None:
                watcher.cancel()

    def _guarded(
        self, cancel: threading.Event, work: Work | None, job: Callable[..., Any], *args: Any
    ) -> Any:
        if cancel.is_set():
            raise Abandoned("cancelled before it started")
        self._cancel = cancel
        started = time.perf_counter()
        try:
            with cancellable(cancel):  # reaches inside set scoring and bank building
                result = job(*args)
            if work is not None:
                seconds = time.perf_counter() - started
                self.costs.observe(work.method, work.kind, work.count, seconds)
            return result
        except Cancelled:
            logger.info("request abandoned: stopped inside its work")
            raise Abandoned("stopped inside its work") from None
        finally:
            self._cancel = None

    def check_cancelled(self, done: int, total: int) -> None:
        """Called by jobs between images: stop if their request no longer waits."""
        if self._cancel is not None and self._cancel.is_set():
            logger.info("request abandoned: stopped after %d of %d images", done, total)
            raise Abandoned(f"stopped after {done} of {total} images")

    def analyse(
        self,
        predictor: Predictor,
        uploads: list[Upload],
        postprocessor: PostProcessor,
        deferred: bool = False,
    ) -> list[Outcome]:
        """Decode, score and render, in upload order; a file that fails to decode fails alone.

        ``deferred``: leave the rendering to whoever sends the answer (each image a
        :class:`~anomalyclip.serving.rendering.Scored`), as a streamed batch does.

        Images are scored in groups of at most ``max_group_images`` and ``max_pixels``
        decoded pixels, so a batch of large images holds about one of them in memory at a
        time, and a cancelled request stops within one group. A method whose images score
        each other is given the set in one call: its decoded size is bounded by
        ``max_set_pixels`` instead, checked before decoding. A set sent to a method that
        scores each image alone is grouped all the same (each image's result is its own).
        """
        outcomes: list[Outcome | None] = [None] * len(uploads)
        group: list[tuple[int, Image.Image]] = []
        whole_set = predictor.scores_sets

        def score_group() -> None:
            self.check_cancelled(sum(outcome is not None for outcome in outcomes), len(uploads))
            with self._model_lock:
                predictions = predictor.predict_images([image for _, image in group])
            for (index, image), prediction in zip(group, predictions, strict=True):
                decided = dataclasses.replace(prediction, postprocessor=postprocessor)
                upload = uploads[index]
                outcomes[index] = (
                    Scored(upload.filename, upload.data, decided)
                    if deferred
                    else render(upload.filename, image, decided, self.settings)
                )
            group.clear()

        for index, upload in enumerate(uploads):
            self.check_cancelled(index, len(uploads))
            try:
                image = load_image(upload.data, self.settings.max_pixels)
            except ImageLoadError as error:
                outcomes[index] = InvalidUpload(f"{upload.filename}: {error.reason}")
                continue
            pixels = sum(item.width * item.height for _, item in group)
            full = len(group) >= self.settings.max_group_images or (
                pixels + image.width * image.height > self.settings.max_pixels
            )
            if not whole_set and group and full:
                score_group()
            group.append((index, image))
        if whole_set and len(group) < 2:
            for index, _ in group:
                outcomes[index] = TooFewImages(
                    f"{predictor.method} scores the images of a set against each other and "
                    f"needs at least 2 readable images; {len(group)} given"
                )
            group.clear()
        if group:
            score_group()
        return [outcome for outcome in outcomes if outcome is not None]

    def build_references(
        self, predictor: Predictor, uploads: list[Upload]
    ) -> tuple[Predictor, list[tuple[int, UploadError]]]:
        """The predictor's few-shot form for the readable uploads, and the failures."""
        from anomalyclip.methods.assemble import with_references

        images: list[Image.Image] = []
        failures: list[tuple[int, UploadError]] = []
        for index, upload in enumerate(uploads):
            self.check_cancelled(index, len(uploads))
            try:
                images.append(load_image(upload.data, self.settings.max_pixels))
            except ImageLoadError as error:
                failures.append((index, InvalidUpload(f"{upload.filename}: {error.reason}")))
        if not images:
            raise TooFewImages("no readable reference image")
        with self._model_lock:
            return with_references(predictor, images), failures

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._count_lock:
            queued = [task for jobs in self._turns.values() for task, _ in jobs]
            self._turns.clear()
        for task in queued:
            task.cancel()
