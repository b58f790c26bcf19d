"""The Responses API's store: bounded, least recently used first out, reads count as use."""

from __future__ import annotations

import pytest

from kiln.serve.response_store import ResponseStore, StoredResponse
from kiln.serve.responses_protocol import ResponseObject


def _stored(response_id: str) -> StoredResponse:
    response = ResponseObject(
        id=response_id,
        created_at=0,
        status="completed",
        instructions=None,
        max_output_tokens=None,
        model="tiny",
        output=[],
        parallel_tool_calls=True,
        previous_response_id=None,
        store=True,
        temperature=1.0,
        top_p=1.0,
        top_logprobs=0,
        text={"format": {"type": "text"}},
        tool_choice="auto",
        tools=[],
        truncation="disabled",
        background=False,
    )
    return StoredResponse(response, ({"role": "user", "content": response_id},))


def test_the_least_recently_used_goes_first() -> None:
    store = ResponseStore(3)
    for rid in ("a", "b", "c"):
        store.put(_stored(rid))
    assert store.ids() == ["a", "b", "c"]
    assert store.get("a") is not None  # read: now the most recent
    assert store.ids() == ["b", "c", "a"]
    store.put(_stored("d"))
    assert store.ids() == ["c", "a", "d"]
    assert store.get("b") is None
    store.put(_stored("c"))  # stored again: replaced, and the most recent
    assert store.ids() == ["a", "d", "c"]
    assert len(store) == 3


def test_delete_and_a_store_that_keeps_none() -> None:
    store = ResponseStore(2)
    store.put(_stored("a"))
    assert store.delete("a") is True and store.delete("a") is False and len(store) == 0
    with pytest.raises(RuntimeError):
        ResponseStore(0).put(_stored("a"))
    with pytest.raises(ValueError):
        ResponseStore(-1)
