"""Malformed input gets a 4xx in OpenAI's error shape, never a 5xx, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest
from server_harness import run_live_server

from kiln.clients.thread import AsyncEngine

COMPLETION = '{"model": "tiny", "prompt": "hi", "max_tokens": 2%s}'
CASES = [
    # (what, body bytes, status)
    ("invalid UTF-8", b'{"model": "tiny", "prompt": "\xff\xfe", "max_tokens": 2}', 400),
    ("a lone surrogate", b'{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 2}', 400),
    ("deeply nested JSON", b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
    ("NaN temperature", (COMPLETION % ', "temperature": NaN').encode(), 400),
    ("infinite presence penalty", (COMPLETION % ', "presence_penalty": -Infinity').encode(), 400),
    ("negative temperature", (COMPLETION % ', "temperature": -1.0').encode(), 400),
    ("negative top_p", (COMPLETION % ', "top_p": -0.5').encode(), 400),
    ("negative max_tokens", b'{"model": "tiny", "prompt": "hi", "max_tokens": -1}', 400),
    ("negative n", (COMPLETION % ', "n": -3').encode(), 400),
    ("a huge integer", (COMPLETION % ', "seed": ' + "9" * 5000).encode(), 400),
    ("not an object", b"[1, 2, 3]", 400),
    ("truncated JSON", b'{"model": "tiny", "prompt": "hi"', 400),
    ("a body over the limit", b'{"model": "tiny", "prompt": "' + b"x" * (9 * 2**20) + b'"}', 413),
]


@pytest.fixture(scope="module")
def url(tiny_engine: AsyncEngine):
    with run_live_server(tiny_engine, served_model_name="tiny") as live:
        yield live.url


@pytest.mark.parametrize(("what", "body", "status"), CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_a_4xx(url: str, what: str, body: bytes, status: int) -> None:
    r = httpx.post(
        f"{url}/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=60
    )
    assert r.status_code == status, (what, r.text[:300])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    ok = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200  # and the server keeps serving
