"""The operator console: static assets (HTML, JavaScript modules, CSS) served by the sidecar.

    GET /                  302 to /console/
    GET /console           302 to /console/ (the assets' relative URLs need the slash)
    GET /console/          index.html
    GET /console/{asset}   one of the files shipped in consumer/api/console/, else 404

The console is plain files with no build step and nothing fetched from elsewhere: it
works offline and on an air-gapped site. It holds no data: every figure comes from /v1
in the browser, with the operator's bearer token, so these routes carry none. The files
are read once, when the routes are built, and only names found then are served: a
request can never reach another path of the file system.

The Content-Security-Policy lets the page load only its own files and talk only to its
own origin, so a device id crafted as markup, even if it slipped past the rendering
(which sets text, never HTML), could neither run a script nor send the token elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import hdrs, web

from consumer.api.errors import ApiError

ASSETS = Path(__file__).with_name("console")
CONSOLE = "/console/"
_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
}
_HEADERS = {
    hdrs.CONTENT_SECURITY_POLICY: (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    hdrs.X_CONTENT_TYPE_OPTIONS: "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files: revalidating costs little, and an upgraded sidecar is never half-cached.
    hdrs.CACHE_CONTROL: "no-cache",
}


def console_routes(assets: Path = ASSETS) -> list[web.RouteDef]:
    """The console's routes, serving the files of `assets` as they are now."""
    files = {
        path.name: (path.read_bytes(), _TYPES[path.suffix])
        for path in sorted(assets.iterdir())
        if path.suffix in _TYPES
    }

    def serve(name: str) -> web.Response:
        found = files.get(name)
        if found is None:
            raise ApiError(404, "not_found", "the console has no such file")
        body, content_type = found
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=_HEADERS)

    async def to_console(_: web.Request) -> web.Response:
        raise web.HTTPFound(CONSOLE)

    async def index(_: web.Request) -> web.Response:
        return serve("index.html")

    async def asset(request: web.Request) -> web.Response:
        return serve(request.match_info["asset"])

    return [
        web.get("/", to_console),
        web.get("/console", to_console),
        web.get(CONSOLE, index),
        web.get(CONSOLE + "{asset}", asset),
    ]
