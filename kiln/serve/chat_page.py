"""The pages a browser opens on `kiln serve`: the chat page at `/` and the API docs at `/docs`.

Rules:
- Every asset comes from installed packages, never from a CDN, so a server without internet serves
  both pages whole: the chat page and its vendored libraries from `kiln/serve/static/` (package data;
  `static/vendor/README.md` lists versions and licences), Swagger UI from the `fastapi-offline` wheel
  (Swagger UI 5, which reads the OpenAPI 3.1 document FastAPI writes; `swagger-ui-bundle` ships
  Swagger UI 4, which cannot). ReDoc is not served: Swagger UI shows the same document.
- The chat page is static: it holds no secret and no data, so it stays open even with
  `key_protects_all` (a browser sends no bearer token when it opens a page); what it asks of /v1
  carries the key the user types. /docs follows `key_protects_all`, as /openapi.json does.
- None of these routes is an API operation: they stay out of /openapi.json.
- The chat page is sent with a Content-Security-Policy that lets it load and fetch from this server
  only and run no inline script: a model's answer rendered as markdown (sanitized by DOMPurify first)
  cannot load or run anything from elsewhere.
- The page's URLs are relative, so it works behind a proxy that serves the server under a path prefix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_URL = "/static"  # STATIC_DIR
DOCS_ASSETS_URL = "/docs/assets"  # fastapi_offline/static: swagger-ui-bundle.js, swagger-ui.css


class Assets(StaticFiles):
    """Static files a browser revalidates on each use (a 304 while unchanged), so a browser never runs
    an upgraded server's page with a script it cached from the old one."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.setdefault("Cache-Control", "no-cache")
        return response


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def add_chat_page(app: FastAPI) -> None:
    """GET / (the chat page) and its assets under /static."""
    app.mount(STATIC_URL, Assets(directory=STATIC_DIR), name="static")
    index = STATIC_DIR / "index.html"

    async def chat_page() -> FileResponse:
        return FileResponse(
            index,
            media_type="text/html",
            headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"},
        )

    app.add_api_route("/", chat_page, methods=["GET"], include_in_schema=False)


def add_docs_page(app: FastAPI, dependencies: list[Any]) -> None:
    """GET /docs (Swagger UI over /openapi.json, behind `dependencies`) and its assets under /docs/assets."""
    app.mount(DOCS_ASSETS_URL, Assets(packages=[("fastapi_offline", "static")]), name="docs-assets")

    async def docs_page(request: Request) -> HTMLResponse:
        root = _root(request)
        return get_swagger_ui_html(
            openapi_url=f"{root}/openapi.json",
            title="Kiln - API",
            swagger_js_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC_URL}/favicon.svg",
        )

    app.add_api_route(
        "/docs",
        docs_page,
        methods=["GET"],
        include_in_schema=False,
        dependencies=dependencies,
    )
