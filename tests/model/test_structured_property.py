"""Over generated JSON schemas (nested objects, arrays, enums, required fields, numbers, patterns), every
constrained response of a random-weight model parses and validates: the grammar, not the model, makes it so."""

from __future__ import annotations

import json

import jsonschema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.config import EngineConfig
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.sampling_params import SamplingParams, StructuredOutput

NAMES = st.sampled_from(["a", "b", "id", "name", "x_1", "tags", "n"])
LEAVES = st.one_of(
    st.just({"type": "boolean"}),
    st.builds(
        lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
        st.integers(-50, 50),
        st.integers(0, 100),
    ),
    st.builds(lambda lo: {"type": "number", "minimum": lo, "maximum": lo + 10}, st.integers(-5, 5)),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
    st.builds(lambda n: {"type": "string", "pattern": f"^[a-z]{{1,{n}}}$"}, st.integers(1, 4)),
    st.builds(
        lambda opts: {"enum": opts},
        st.lists(st.sampled_from(["on", "off", 1, None, True]), min_size=1, max_size=3, unique=True),
    ),
)


def _objects(children: st.SearchStrategy) -> st.SearchStrategy:
    def build(props: dict, required_bits: list[bool]) -> dict:
        required = [k for k, bit in zip(props, required_bits, strict=False) if bit]
        return {"type": "object", "properties": props, "required": required, "additionalProperties": False}

    return st.builds(
        build,
        st.dictionaries(NAMES, children, min_size=1, max_size=3),
        st.lists(st.booleans(), min_size=3, max_size=3),
    )


SCHEMAS = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        _objects(children),
        st.builds(
            lambda items, n: {"type": "array", "items": items, "maxItems": n}, children, st.integers(0, 3)
        ),
    ),
    max_leaves=6,
)


@settings(max_examples=1, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(schemas=st.lists(_objects(SCHEMAS), min_size=60, max_size=60))
def test_every_constrained_response_validates(tiny_gqa_dir, schemas: list[dict]) -> None:
    engine = LLMEngine.from_path(tiny_gqa_dir, EngineConfig(device="cpu", max_num_seqs=64, num_kv_blocks=512))
    for i, schema in enumerate(schemas):
        params = SamplingParams(
            temperature=1.0, seed=i, max_tokens=250, structured=StructuredOutput.json_schema(schema)
        )
        engine.add_request(f"s{i}", params=params, prompt_token_ids=[5, 6, 7])
    texts: dict[str, str] = {}
    reasons: dict[str, str | None] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts[out.request_id] = texts.get(out.request_id, "") + out.outputs[0].text
            reasons[out.request_id] = out.outputs[0].finish_reason
    assert engine.take_failed() == []
    for i, schema in enumerate(schemas):
        text = texts[f"s{i}"]
        assert reasons[f"s{i}"] == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)
