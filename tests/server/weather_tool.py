"""The tool the tool-calling tests offer the model (the server's own tests and LiteLLM's): a weather
forecast whose arguments have bounds, so a call that ignored the schema shows, and the question asking
for it."""

from __future__ import annotations

from typing import Any

WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "days": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER},
}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]
