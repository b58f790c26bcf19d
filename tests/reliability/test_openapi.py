"""/openapi.json tells the truth: schemathesis finds nothing the server sends that it does not document.

Also checked directly: a 405 carries `Allow`; chat `logprobs` is a boolean; each route documents the
statuses the server sends, as OpenAI error JSON and never 422; the completion routes document their
event streams; the API key shows as 401 and a bearer scheme only where it is checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from server_harness import LiveServer, run_live_server

from kiln.clients.thread import AsyncEngine
from kiln.serve.app import create_app
from kiln.serve.settings import ServerSettings

# Bounded for 2 loaded cores (~10 s here): few fuzzed examples per operation, a fixed seed; a request
# that sends no max_tokens gets 4 and one asking more than 16 is a 400, so none fills the context.
SERVER = {"served_model_name": "tiny", "default_max_tokens": 4, "max_tokens_limit": 16}
CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 1,
        "request-timeout": 30,
        "suppress-health-check": ["too_slow"],  # generation speed on a loaded machine is no finding
        # "all": schema-valid requests, and schema-violating ones, which must be rejected (400)
        "generation": {"max-examples": 15, "mode": "all"},
        "phases": {
            "examples": {"enabled": True},  # the request models' examples (a plain and a streamed one)
            "coverage": {"enabled": True},  # boundary values, and undeclared methods (405 + Allow)
            "fuzzing": {"enabled": True},
            "stateful": {"enabled": False},  # no links between operations
        },
        "checks": {
            "enabled": False,
            # 504 is documented: a fuzzed `timeout` field or X-Request-Timeout header of microseconds is a
            # deadline no request meets (kiln.serve.generation), not a server fault.
            "not_a_server_error": {"enabled": True, "expected-statuses": ["2xx", "3xx", "4xx", "504"]},
            "status_code_conformance": {"enabled": True},
            "content_type_conformance": {"enabled": True},
            "response_schema_conformance": {"enabled": True},  # SSE events too
            "response_headers_conformance": {"enabled": True},
            "negative_data_rejection": {"enabled": True},
            "unsupported_method": {"enabled": True},
            "allow_header_conformance": {"enabled": True},
        },
    }
)
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")


@pytest.fixture(scope="module")
def live(tiny_engine: AsyncEngine) -> Iterator[LiveServer]:
    with run_live_server(tiny_engine, **SERVER) as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(live: LiveServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{live.url}/openapi.json", config=CONFIG)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_server_conforms_to_its_openapi_document(case: schemathesis.Case) -> None:
    # One subtest per operation; any finding (a 5xx, an undocumented status, content type, header or
    # body, a schema-violating request accepted, a 405 without Allow) fails it.
    case.call_and_validate()


@pytest.fixture(scope="module")
def doc(live: LiveServer) -> dict[str, Any]:
    return httpx.get(f"{live.url}/openapi.json").json()


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            yield path, method, op


def test_every_route_documents_its_errors_as_openai_json_and_never_422(doc: dict[str, Any]) -> None:
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, method, op in operations(doc):
        responses = op["responses"]
        assert "422" not in responses, (method, path)
        assert "500" in responses, (method, path)
        for status, response in responses.items():
            if status.startswith(("4", "5")) and path not in ("/health", "/ready"):
                where = (method, path, status)
                assert response["content"] == {"application/json": {"schema": error_ref}}, where
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    error_body = doc["components"]["schemas"]["ErrorBody"]
    assert set(error_body["required"]) == {"message", "type", "param", "code"}


def test_completion_routes_document_their_statuses_and_streams(doc: dict[str, Any]) -> None:
    for path in COMPLETION_PATHS:
        op = doc["paths"][path]["post"]
        assert {"200", "400", "404", "413", "429", "500", "503"} <= set(op["responses"]), path
        assert "Retry-After" in op["responses"]["429"]["headers"]
        ok = op["responses"]["200"]["content"]
        assert set(ok) == {"application/json", "text/event-stream"}, path
        data = ok["text/event-stream"]["schema"]["properties"]["data"]["anyOf"]
        assert {"const": "[DONE]"} in data
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("Request")
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert chat["logprobs"]["anyOf"] == [{"type": "boolean"}, {"type": "null"}]  # null: the default
    completions = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"type": "integer"} in completions["logprobs"]["anyOf"]


def test_probes_document_their_503_bodies(doc: dict[str, Any]) -> None:
    for path, model in (("/health", "HealthStatus"), ("/ready", "ReadyStatus")):
        responses = doc["paths"][path]["get"]["responses"]
        for status in ("200", "503"):
            schema_ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert schema_ref == f"#/components/schemas/{model}", (path, status)


def test_undeclared_method_is_405_with_allow(live: LiveServer, doc: dict[str, Any]) -> None:
    for path, item in doc["paths"].items():
        url = live.url + path.replace("{model_id}", "tiny")
        for method in (m for m in ("TRACE", "PUT", "DELETE") if m.lower() not in item):
            r = httpx.request(method, url)
            assert r.status_code == 405, (method, path, r.text)
            assert r.headers["allow"] == ", ".join(m.upper() for m in item), (method, path)
            error = r.json()["error"]
            assert error["code"] == "method_not_allowed"
            assert method in error["message"] and r.headers["allow"] in error["message"]


def test_chat_logprobs_must_be_a_boolean(live: LiveServer) -> None:
    for value in (0, 1, "true"):
        r = httpx.post(f"{live.url}/v1/chat/completions", json={**CHAT, "logprobs": value})
        assert r.status_code == 400, (value, r.text)
        assert r.json()["error"]["param"] == "logprobs"
    r = httpx.post(f"{live.url}/v1/chat/completions", json={**CHAT, "logprobs": False})
    assert r.status_code == 200, r.text
    # null is "unset", as OpenAI's API takes it from clients that send every option they leave unset
    nulls = {"logprobs": None, "stream": None, "n": None, "top_logprobs": None, "stream_options": None}
    r = httpx.post(f"{live.url}/v1/chat/completions", json={**CHAT, **nulls})
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None, r.text
    # completions' logprobs stays a count, 0 included
    completion = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "logprobs": 0}
    r = httpx.post(f"{live.url}/v1/completions", json=completion)
    assert r.status_code == 200, r.text


def test_request_types_are_strict(live: LiveServer) -> None:
    # What the schema says a field is, and nothing pydantic would coerce into it.
    for patch, param in (
        ({"temperature": "0.5"}, "temperature"),
        ({"max_tokens": 2.0}, "max_tokens"),
        ({"stream": 1}, "stream"),
        ({"stream_options": {"include_usage": 0}}, "stream_options.include_usage"),
    ):
        r = httpx.post(f"{live.url}/v1/chat/completions", json={**CHAT, **patch})
        assert r.status_code == 400, (patch, r.text)
        assert r.json()["error"]["param"] == param
    r = httpx.post(f"{live.url}/v1/chat/completions", json={**CHAT, "temperature": 1})  # an int is a number
    assert r.status_code == 200, r.text


def test_api_keys_show_as_401_and_a_bearer_scheme_where_checked(tiny_engine: AsyncEngine) -> None:
    def document(**settings: Any) -> dict[str, Any]:
        return create_app(tiny_engine, ServerSettings(**settings), shutdown_engine=False).openapi()

    def guarded(doc: dict[str, Any]) -> set[str]:
        with_401 = {path for path, _, op in operations(doc) if "401" in op["responses"]}
        with_security = {path for path, _, op in operations(doc) if op.get("security")}
        assert with_401 == with_security
        return with_401

    keyed_v1 = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model_id}"}
    keyed_v1 |= {"/v1/responses", "/v1/responses/{response_id}", "/v1/responses/{response_id}/input_items"}
    keyed_v1 |= {"/v1/responses/{response_id}/cancel"}
    keyed_v1 |= {"/tokenize", "/detokenize"}  # behind the key as /v1 is (kiln.serve.tokenize_routes)
    assert guarded(document()) == set()
    keyed = document(api_keys=["k"])
    assert guarded(keyed) == keyed_v1
    assert keyed["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "One of the server's API keys (`--api-keys`).",
    }
    assert guarded(document(api_keys=["k"], key_protects_all=True)) == keyed_v1 | {"/version"}
