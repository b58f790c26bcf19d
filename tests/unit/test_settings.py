"""ServerSettings: defaults, KILN_* environment, validation, and the engine's share of it."""

from __future__ import annotations

import dataclasses
import typing

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
    [{"port": 70000}, {"max_waiting_sequences": -1}, {"log_level": "loud"}, {"gpu_memory_utilization": 1.5}],
)
def test_invalid_values_are_rejected(bad: dict) -> None:
    with pytest.raises(ValidationError):
        ServerSettings(**bad)


def test_engine_config_carries_every_engine_field() -> None:
    s = ServerSettings(
        max_num_seqs=3, num_kv_blocks=99, enable_prefix_caching=False, served_model_name="m", seed=5
    )
    assert s.engine_config() == EngineConfig(
        max_num_seqs=3, num_kv_blocks=99, enable_prefix_caching=False, served_model_name="m", seed=5
    )
    assert ServerSettings().engine_config() == EngineConfig()  # one default per knob


ENGINE_FIELDS = dataclasses.fields(EngineConfig)
HINTS = typing.get_type_hints(EngineConfig)


@pytest.mark.parametrize("knob", ENGINE_FIELDS, ids=[f.name for f in ENGINE_FIELDS])
def test_every_engine_knob_is_a_setting_with_its_one_default_help_and_range(
    knob: dataclasses.Field, monkeypatch: pytest.MonkeyPatch
) -> None:
    setting = ServerSettings.model_fields[knob.name]
    assert setting.default == knob.default
    assert setting.description == knob.metadata["help"]
    bounds = {key: getattr(m, key) for m in setting.metadata for key in ("ge", "gt", "le") if hasattr(m, key)}
    assert bounds == {key: knob.metadata[key] for key in ("ge", "gt", "le") if key in knob.metadata}
    # The KILN_* variable: a value other than the default reaches the engine's config.
    value = _other_value(knob)
    monkeypatch.setenv(
        f"KILN_{knob.name.upper()}", str(value).lower() if isinstance(value, bool) else str(value)
    )
    assert getattr(ServerSettings().engine_config(), knob.name) == value


def _other_value(knob: dataclasses.Field) -> object:
    """A valid value of the knob's type other than its default."""
    kind = next(a for a in typing.get_args(HINTS[knob.name]) or (HINTS[knob.name],) if a is not type(None))
    if kind is bool:
        return knob.default is not True
    if kind is float:
        return knob.default / 2
    if kind is int:
        return (knob.default or 6) + 1
    return {"device": "cpu", "dtype": "float16"}.get(knob.name, "other")


def test_engine_config_is_frozen_and_checks_its_ranges() -> None:
    config = EngineConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1  # type: ignore[misc]
    assert dataclasses.replace(config, seed=1).seed == 1
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="gpu_memory_utilization must be <= 1"):
        EngineConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="gpu_memory_utilization must be > 0"):
        EngineConfig(gpu_memory_utilization=0.0)
