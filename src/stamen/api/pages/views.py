"""The page routes: `/`, `/chat`, `/jobs` as HTML shells, and `/static/` for their files.

Each page is its template (`templates/NAME.html`) inside `templates/layout.html`,
rendered once per process (the HTML never changes while it runs) and sent with
`SECURITY_HEADERS`. See the package docstring for why the HTML holds no data.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from string import Template

from litestar import Response, get
from litestar.handlers import HTTPRouteHandler
from litestar.static_files import create_static_files_router
from litestar.types import ControllerRouterHandler

PACKAGE_DIR = Path(__file__).parent
STATIC_DIR = PACKAGE_DIR / "static"
TEMPLATES_DIR = PACKAGE_DIR / "templates"

# Only this server's own files may run, style or be fetched; nothing may frame the pages.
# `img-src data:` is for nothing today but keeps a future inline icon working.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class Page:
    path: str
    name: str  # templates/NAME.html and static/NAME.js
    title: str


PAGES = (
    Page("/", "monitor", "Swarm monitor"),
    Page("/chat", "chat", "Chat"),
    Page("/jobs", "jobs", "Fine-tuning jobs"),
)


def _nav(current: Page) -> str:
    links = []
    for page in PAGES:
        mark = ' aria-current="page"' if page is current else ""
        links.append(f'<a href="{page.path}"{mark}>{page.title}</a>')
    return "\n        ".join(links)


@functools.cache
def render(page: Page) -> str:
    """The page's HTML (cached: the templates are package files)."""
    layout = Template((TEMPLATES_DIR / "layout.html").read_text())
    main = (TEMPLATES_DIR / f"{page.name}.html").read_text()
    return layout.substitute(title=page.title, nav=_nav(page), main=main, script=page.name)


def _handler(page: Page) -> HTTPRouteHandler:
    @get(page.path, sync_to_thread=False, include_in_schema=False, name=f"page-{page.name}")
    def serve() -> Response[str]:
        """One of the web pages (an HTML shell; its script reads the API)."""
        return Response(render(page), media_type="text/html", headers=SECURITY_HEADERS)

    return serve


page_handlers: list[ControllerRouterHandler] = [
    *(_handler(page) for page in PAGES),
    create_static_files_router(
        path="/static", directories=[STATIC_DIR], name="static", include_in_schema=False
    ),
]
