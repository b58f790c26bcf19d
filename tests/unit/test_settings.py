"""ServerSettings: defaults, KILN_* environment, validation, and the engine's share of it."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from kiln.config import EngineConfig
from kiln.serve.settings import ServerSettings


def test_defaults_bind_loopback_without_auth() -> None:
    s = ServerSettings()
    assert s.host == "127.0.0.1" and s.port == 8000
    assert s.api_keys == [] and s.cors_origins == []
    assert s.log_prompts is False


def test_every_field_is_documented() -> None:
    for name, field in ServerSettings.model_fields.items():
        assert field.description and len(field.description) > 10, name


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_PORT", "9001")
    monkeypatch.setenv("KILN_API_KEYS", "k1, k2")
    monkeypatch.setenv("KILN_CORS_ORIGINS", '["http://a", "http://b"]')
    monkeypatch.setenv("KILN_MAX_WAITING_TOKENS", "5000")
    monkeypatch.setenv("KILN_LOG_PROMPTS", "true")
    s = ServerSettings()
    assert s.port == 9001
    assert s.api_keys == ["k1", "k2"]
    assert s.cors_origins == ["http://a", "http://b"]
    assert s.max_waiting_tokens == 5000
    assert s.log_prompts is True
    # explicit values (the CLI's flags) win over the environment
    assert ServerSettings(port=9100).port == 9100


@pytest.mark.parametrize(
    "bad",
    [{"port": 70000}, {"max_waiting_requests": -1}, {"log_level": "loud"}, {"gpu_memory_utilization": 1.5}],
)
def test_invalid_values_are_rejected(bad: dict) -> None:
    with pytest.raises(ValidationError):
        ServerSettings(**bad)


def test_engine_options_carry_every_engine_field() -> None:
    engine_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    assert engine_fields <= set(ServerSettings.model_fields), "an EngineConfig field has no kiln serve flag"
    s = ServerSettings(
        max_num_seqs=3, num_kv_blocks=99, enable_prefix_caching=False, served_model_name="m", seed=5
    )
    options = s.engine_options()
    assert options == EngineConfig(
        max_num_seqs=3,
        num_kv_blocks=99,
        enable_prefix_caching=False,
        served_model_name="m",
        seed=5,
        load_progress=True,  # the server shows it; the Python API does not by default
        engine_process=True,  # the server runs the engine in its own process; the Python API in-process
    )
