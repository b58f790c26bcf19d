"""Structured outputs through the OpenAI API: the official client's `parse` with a pydantic model,
json_schema (strict or not), json_object, vLLM's structured_outputs / guided_* (regex, choice, grammar),
streaming and n > 1 — every response matches; what cannot be enforced is a 400 naming the field."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pydantic
import pytest
from server_harness import LiveServer, run_live_server

from kiln.clients.thread import AsyncEngine

USER = [{"role": "user", "content": "Describe a person."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


class Person(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=12)
    age: int = pydantic.Field(ge=0, le=120)


@pytest.fixture(scope="module")
def live(tiny_engine: AsyncEngine):
    with run_live_server(tiny_engine, served_model_name="tiny") as server:
        yield server


@pytest.fixture(scope="module")
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused")


def test_the_sdk_parses_a_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.beta.chat.completions.parse(
        model="tiny", messages=USER, response_format=Person, max_tokens=200, temperature=1.0, seed=3
    )
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person) and completion.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("strict", [True, False, None])
def test_json_schema_streamed_and_n2(client: openai.OpenAI, strict: bool | None) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": strict}}
    whole = client.chat.completions.create(
        model="tiny", messages=USER, response_format=fmt, max_tokens=200, n=2, seed=1
    )
    for choice in whole.choices:
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    texts: dict[int, str] = {}
    for chunk in client.chat.completions.create(
        model="tiny", messages=USER, response_format=fmt, max_tokens=200, n=2, seed=1, stream=True
    ):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]  # seeded: the same text


def test_json_object_is_an_object(client: openai.OpenAI) -> None:
    # A random model fills an unbounded object without end: what it wrote before max_tokens is JSON's start.
    text = (
        client.chat.completions.create(
            model="tiny", messages=USER, response_format={"type": "json_object"}, max_tokens=40, seed=2
        )
        .choices[0]
        .message.content
    )
    assert text.startswith("{")


@pytest.mark.parametrize(
    ("field", "value", "check"),
    [
        ("structured_outputs", {"regex": "[0-9]{3}-[a-z]{2}"}, lambda t: len(t) == 6 and t[3] == "-"),
        ("structured_outputs", {"choice": ["red", "green", "blue"]}, lambda t: t in {"red", "green", "blue"}),
        ("structured_outputs", {"grammar": 'start: "ab" ("c" | "d")'}, lambda t: t in {"abc", "abd"}),
        (
            "structured_outputs",
            {"json": PERSON},
            lambda t: jsonschema.validate(json.loads(t), PERSON) is None,
        ),
        ("guided_choice", ["yes", "no"], lambda t: t in {"yes", "no"}),
        ("guided_regex", "(x|y){4}", lambda t: len(t) == 4 and set(t) <= {"x", "y"}),
        ("guided_json", PERSON, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
    ],
)
def test_vllm_fields_on_both_endpoints(live: LiveServer, field: str, value, check) -> None:
    for path, body in (
        ("chat/completions", {"messages": USER}),
        ("completions", {"prompt": "Answer:"}),
    ):
        r = httpx.post(
            f"{live.url}/v1/{path}",
            json={"model": "tiny", "max_tokens": 200, "seed": 5, field: value, **body},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        text = choice["message"]["content"] if path.startswith("chat") else choice["text"]
        assert check(text), (field, text)
        assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format",
        ),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs"),
        ({"guided_choice": []}, "guided_choice"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    ],
)
def test_what_cannot_be_enforced_is_a_400_naming_the_field(live: LiveServer, body: dict, param: str) -> None:
    r = httpx.post(f"{live.url}/v1/chat/completions", json={"model": "tiny", "messages": USER, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
