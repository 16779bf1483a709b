"""The browser page and its scripts, served from a fixed table and never from a path.

The files are read from package data once, at start-up (:func:`load_static`), so no
request can name a file on the server; the headers keep the page to its own origin.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from anomalyclip.serving.dependencies import StaticDep

STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "stream.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter()


def load_static() -> dict[str, bytes]:
    folder = resources.files("anomalyclip.serving") / "static"
    return {name: (folder / name).read_bytes() for name in STATIC_FILES}


def static_route(name: str) -> Callable[[dict[str, bytes]], Awaitable[Response]]:
    async def serve_static(static: StaticDep) -> Response:
        return Response(static[name], media_type=STATIC_FILES[name], headers=PAGE_HEADERS)

    return serve_static


router.get("/", include_in_schema=False)(static_route("index.html"))
for _name in ("app.js", "stream.js", "style.css"):
    router.get(f"/static/{_name}", include_in_schema=False)(static_route(_name))
