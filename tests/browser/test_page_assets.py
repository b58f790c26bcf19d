"""The browser pages' files, over HTTP and in the wheel (no browser needed): the chat page at `/` and
Swagger UI at `/docs` reference only URLs of this server, each answers 200 with its content type, none
of it is an API operation, `key_protects_all` guards /docs but not the page, and a wheel built from the
source carries every file of kiln/serve/static (package data)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest
from server_harness import REPO, LiveServer, run_live_server

from kiln.clients.thread import AsyncEngine
from kiln.serve.chat_page import STATIC_DIR

CONTENT_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".json": "application/json",
}


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def referenced(html: str) -> list[str]:
    """The src and href URLs of `html`, and the URL a Swagger UI page loads its document from."""
    parser = _Links()
    parser.feed(html)
    return parser.urls + re.findall(r"url: '([^']+)'", html)


def check_local(base: str, html: str) -> list[str]:
    """Each URL `html` references is on this server (relative, or absolute-path) and answers 200 with
    the content type of its extension; the URLs, resolved."""
    resolved = []
    for url in referenced(html):
        assert not re.match(r"^([a-z][a-z0-9+.-]*:|//)", url, re.IGNORECASE), url  # no scheme, no host
        full = urljoin(base, url)
        response = httpx.get(full)
        assert response.status_code == 200, full
        expected = CONTENT_TYPES[Path(url).suffix]
        assert response.headers["content-type"].split(";")[0] == expected, (full, response.headers)
        resolved.append(full)
    return resolved


@pytest.fixture(scope="module")
def live(tiny_engine: AsyncEngine) -> Iterator[LiveServer]:
    with run_live_server(tiny_engine, served_model_name="tiny") as server:
        yield server


def test_the_chat_page_loads_only_its_own_files(live: LiveServer) -> None:
    page = httpx.get(f"{live.url}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert (
        "default-src 'self'" in policy and "script-src 'self';" in policy and "connect-src 'self'" in policy
    )
    urls = check_local(f"{live.url}/", page.text)
    for name in (
        "app.js",
        "style.css",
        "vendor/marked.umd.js",
        "vendor/purify.min.js",
        "vendor/highlight.min.js",
    ):
        assert f"{live.url}/static/{name}" in urls, name
    # Revalidated on each use (304 while unchanged): an upgraded server never runs with an old script.
    script_response = httpx.get(f"{live.url}/static/app.js")
    assert script_response.headers["cache-control"] == page.headers["cache-control"] == "no-cache"
    etag = {"If-None-Match": script_response.headers["etag"]}
    assert httpx.get(f"{live.url}/static/app.js", headers=etag).status_code == 304
    # What the page's own script fetches is relative too (the page works under a path prefix).
    script = script_response.text
    assert re.findall(r'fetch\("([^"]+)"', script) == ["v1/models", "v1/chat/completions"]


def test_the_api_docs_load_only_local_files(live: LiveServer) -> None:
    docs = httpx.get(f"{live.url}/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    urls = check_local(f"{live.url}/docs", docs.text)
    assert sorted(urls) == [
        f"{live.url}/docs/assets/swagger-ui-bundle.js",
        f"{live.url}/docs/assets/swagger-ui.css",
        f"{live.url}/openapi.json",
        f"{live.url}/static/favicon.svg",
    ]
    # Swagger UI 5: the release that reads the OpenAPI 3.1 document FastAPI writes.
    assert httpx.get(f"{live.url}/openapi.json").json()["openapi"].startswith("3.1")
    bundle = httpx.get(f"{live.url}/docs/assets/swagger-ui-bundle.js").text
    assert re.search(r'PACKAGE_VERSION:"5\.\d+\.\d+"', bundle)


def test_the_pages_are_not_api_operations(live: LiveServer) -> None:
    paths = httpx.get(f"{live.url}/openapi.json").json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith(("/docs", "/static"))]
    assert httpx.get(f"{live.url}/static/missing.js").status_code == 404


def test_key_protects_all_guards_the_docs_but_not_the_page(tiny_engine: AsyncEngine) -> None:
    settings = {"served_model_name": "tiny", "api_keys": ["k1"], "key_protects_all": True}
    with run_live_server(tiny_engine, **settings) as live:
        assert httpx.get(f"{live.url}/docs").status_code == 401
        assert httpx.get(f"{live.url}/docs", headers={"Authorization": "Bearer k1"}).status_code == 200
        # The page and the libraries hold no data: a browser opens them without a key, then asks for one.
        for path in ("/", "/static/app.js", "/docs/assets/swagger-ui-bundle.js"):
            assert httpx.get(f"{live.url}{path}").status_code == 200, path
        assert httpx.get(f"{live.url}/v1/models").status_code == 401


def test_a_wheel_carries_every_file_of_the_page(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: building in the work tree would leave build/ there
    shutil.copytree(REPO / "kiln", source / "kiln", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    wheel_command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*wheel_command, "-q", "-w", str(tmp_path / "dist")],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("kiln-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"kiln/serve/static/{p.relative_to(STATIC_DIR).as_posix()}" for p in STATIC_DIR.rglob("*")}
    expected = {name for name in expected if (REPO / name).is_file()}
    assert {"kiln/serve/static/index.html", "kiln/serve/static/vendor/highlight.LICENSE"} <= expected
    assert expected <= shipped, sorted(expected - shipped)
