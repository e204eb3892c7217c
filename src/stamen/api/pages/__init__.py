"""The web pages of `swarm-api`: the swarm monitor (`/`), a chat page (`/chat`) and the
fine-tuning jobs (`/jobs`), served from this package with no CDN, no external font and
no build step, because swarms often run where nothing outside them can be reached.

Contract:

- The HTML is the same for every visitor and holds no data and no secret: each page is a
  shell (`templates/*.html` in `templates/layout.html`) whose script reads the public
  API (`/v1/swarm`, `/v1/swarm/history`, `/v1/models`, `/v1/chat/completions`,
  `/v1/fine_tuning/jobs...`) like any other client. So the pages need no auth of their
  own: when the server has API keys, `/v1/` answers 401 and the page asks for a key, keeps
  it in `sessionStorage` (this tab only) and sends it as `Authorization: Bearer`. A key
  never reaches the HTML.
- Scripts and styles are files under `static/` (Litestar's static files router at
  `/static/`), and every page is sent with a Content-Security-Policy that allows only
  them (`'self'`, no inline script, no `eval`): model output that slipped past the chat
  page's renderer still could not run.
- The pages are out of the OpenAPI document (`include_in_schema=False`).

Plain JavaScript, not htmx (`litestar-htmx` is installed): htmx swaps HTML fragments that
the server renders, but every page here reads JSON the API already serves, the chat
streams SSE from a POST (htmx's SSE extension only does GET `EventSource`, which cannot
send an `Authorization` header either), and the plots are SVG built from numbers. htmx
would need a second, HTML-rendering copy of each endpoint plus an auth shim; a few small
scripts (`static/*.js`, about a thousand lines together) do the work with the browser's
own `fetch`, `ReadableStream` and DOM APIs, and need nothing installed.

Templates are plain `string.Template` files: the pages interpolate nothing but their
title and their script's name, so a template engine (and a jinja2 dependency) would buy
nothing.

`SwarmHistory` (`history.py`) samples the swarm for the monitor's plots; `create_app`
runs it in the lifespan and `/v1/swarm/history` serves it.
"""

from stamen.api.pages.history import SwarmHistory, SwarmSample
from stamen.api.pages.views import PAGES, STATIC_DIR, page_handlers

__all__ = ["PAGES", "STATIC_DIR", "SwarmHistory", "SwarmSample", "page_handlers"]
