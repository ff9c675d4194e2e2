"""The page at `/`: the registry, a playground, compare and schedules, served with the API from the same
origin (static files shipped in the package; no build step, no third-party script).

The page only talks to the server's own endpoints and renders everything it gets as text (never as
HTML); the Content-Security-Policy below makes that a rule the browser enforces too: scripts only from
this server's files (no inline script, no `eval`), no plugins, no framing, requests only to this origin.
"""

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

from cartridges.serving.api import ApiError

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
# the only files served: a name the page asks for maps to its type; nothing else in the folder is reachable
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


def static_file(name: str) -> Response:
    if name not in STATIC_FILES:
        raise ApiError(404, f"no page file {name!r}")
    body = resources.files("cartridges.serving").joinpath("static", name).read_bytes()
    return Response(body, media_type=STATIC_FILES[name], headers=PAGE_HEADERS)


def add_page(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return static_file("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        return static_file(name)
