"""The responses a server keeps, for `GET /v1/responses/{id}` and `previous_response_id`.

Rules:
- In memory, at most `capacity` responses (`--responses-store-size`; 0 keeps none); past it the one
  least recently stored or read goes first. A server restart forgets them all.
- A response is stored once it is finished (completed, or incomplete at max_output_tokens); one that
  failed, timed out or lost its client is not.
- Each keeps its whole conversation (its chain's input and output, as chat messages, without any
  `instructions`, which OpenAI does not carry on), so a chain never breaks when an older link goes.
  The conversations of one chain share their messages: each adds a list of references.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from kiln.serve.responses_protocol import ResponseObject


@dataclass(frozen=True, slots=True)
class StoredResponse:
    response: ResponseObject  # as GET answers it
    conversation: tuple[dict[str, Any], ...]  # chat messages through this response's output
    input_items: tuple[dict[str, Any], ...] = ()  # the request's own input, as input_items lists it
    events: tuple[tuple[str, str], ...] | None = None  # a background response's stream (name, JSON)


class ResponseStore:
    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._kept: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def put(self, stored: StoredResponse) -> None:
        if self.capacity == 0:
            raise RuntimeError("this store keeps no responses")
        self._kept[stored.response.id] = stored
        self._kept.move_to_end(stored.response.id)
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._kept.get(response_id)
        if stored is not None:
            self._kept.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        return self._kept.pop(response_id, None) is not None

    def ids(self) -> list[str]:
        """The ids kept, the next to go first."""
        return list(self._kept)
