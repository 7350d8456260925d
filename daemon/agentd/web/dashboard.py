"""The dashboard: a page at `/` and its static files under `/dashboard/<version>/`, shipped
in the package (agentd/web/dashboard/) and served as they are: no build step, nothing
fetched from elsewhere. The page talks to the API like any other client (the token pasted
into it, stream tokens for its EventSources).

`<version>` is a digest of the files, so a browser may keep them for a year: a daemon with
other files serves them under another path. The page and the files carry a strict
Content-Security-Policy (only this origin's scripts, styles and connections; no inline
code), so a string an event or a task carries can never run as script in it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import PurePath

from aiohttp import web

from agentd.web.openapi import doc

routes = web.RouteTableDef()

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer"}
_FOREVER = "public, max-age=31536000, immutable"
_INDEX = "index.html"
_VERSION_MARK = "{{version}}"


@dataclass(frozen=True, slots=True)
class Assets:
    """The dashboard's files read once: name → bytes, the page with its asset paths filled
    in, and the version those paths carry."""

    files: dict[str, bytes]
    index: bytes
    version: str


@cache
def assets() -> Assets:
    """The files of agentd/web/dashboard/, read on first use (they do not change while the
    daemon runs)."""
    folder = resources.files("agentd.web") / "dashboard"
    files = {entry.name: entry.read_bytes() for entry in folder.iterdir()
             if entry.is_file() and not entry.name.startswith(".")}
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name] + b"\0")
    version = digest.hexdigest()[:12]
    index = files.pop(_INDEX).replace(_VERSION_MARK.encode(), version.encode())
    return Assets(files=files, index=index, version=version)


_HTML = {200: {"type": "string"}}
# The types of the files besides the page, by suffix (the folder holds no other kind: a
# test checks it). Spelt here rather than guessed: some systems map .js to text/plain.
_TYPES = {".js": "text/javascript", ".css": "text/css"}


@routes.get("/")
@doc("The dashboard: a page to watch and steer the daemon from a browser (it asks for the "
     "token when one is configured)", tag="dashboard", public=True,
     responses={200: "The dashboard page"}, media_type="text/html", schemas=_HTML)
async def page(request: web.Request) -> web.Response:
    # Not cached: it names the current version of the files.
    return web.Response(body=assets().index, content_type="text/html", charset="utf-8",
                        headers={**_HEADERS, "Cache-Control": "no-cache"})


@routes.get("/dashboard/{version}/{name}")
@doc("A static file of the dashboard (scripts, styles), under the version the page names",
     tag="dashboard", public=True, media_type=tuple(_TYPES.values()),
     responses={200: "The file (a JavaScript module or the stylesheet), cacheable for a year",
                404: "No such file, or another version than this daemon's"},
     schemas={200: {"type": "string", "description": "the file's bytes"}})
async def asset(request: web.Request) -> web.Response:
    files = assets()
    name = request.match_info["name"]
    body = files.files.get(name)
    if request.match_info["version"] != files.version or body is None:
        raise web.HTTPNotFound()
    return web.Response(body=body, content_type=_TYPES[PurePath(name).suffix], charset="utf-8",
                        headers={**_HEADERS, "Cache-Control": _FOREVER})
