"""`ServerSettings`: every knob of `kiln serve`, from flags or `KILN_*` environment variables.

Rules:
- One model documents everything: each field's description is also its `kiln serve --help` text, and
  the CLI generates one flag per field (`max_waiting_sequences` -> `--max-waiting-sequences`).
- Precedence: a flag given on the command line > a `KILN_<FIELD>` environment variable > the default.
  List fields read from the environment as JSON (`KILN_API_KEYS='["k1","k2"]'`) or comma-separated.
- The engine's runtime knobs are fields here too, generated from `EngineConfig`'s fields (type, default,
  help, range), never redeclared, so one flag set configures both; `engine_config()` hands them over.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, create_model, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kiln.config import BOUNDS, EngineConfig

LogLevel = Literal["debug", "info", "warning", "error"]

# The settings of a model repository's rollout (docs/operations.md): only meaningful with `repository`,
# and refused without it.
ROLLOUT_SETTINGS = (
    "repository_model",
    "repository_poll_seconds",
    "admin_key",
    "canary_steps",
    "canary_step_seconds",
    "canary_min_requests",
    "canary_max_error_rate",
    "canary_max_latency_ratio",
    "golden_prompts",
)
# The SLO controller's settings beside its two targets, slo_ttft_ms and slo_itl_ms (kiln.serve.slo).
SLO_CONTROLLER_SETTINGS = (
    "slo_quantile",
    "slo_interval_seconds",
    "slo_window_seconds",
    "slo_min_admission_interval",
    "slo_max_admission_interval",
    "slo_min_token_budget",
    "slo_min_num_seqs",
)


class _ServerSettings(BaseSettings):
    """The server's own settings; `ServerSettings` adds the engine's."""

    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore", validate_default=True)

    # --- what to serve -------------------------------------------------------------------------------
    model: str | None = Field(
        None,
        description="Engine directory, Hugging Face checkpoint directory or hub id to serve "
        "(None: the embedded default model).",
    )

    # --- model repository and rollout (docs/operations.md) -------------------------------------------
    repository: str | None = Field(
        None,
        description="Serve from a model repository: DIR/<model>/<version>/ holds engine directories; the "
        "highest valid version serves, and a newer one is rolled out beside it (canary, then promoted or "
        "rolled back). Instead of MODEL.",
    )
    repository_model: str | None = Field(
        None, description="The model of --repository to serve (default: its only model)."
    )
    repository_poll_seconds: float = Field(
        10.0,
        ge=0,
        description="Seconds between looks for a new version in --repository (0: only the admin API loads "
        "one).",
    )
    admin_key: str | None = Field(
        None,
        description="Key of the admin API (/admin/..., `Authorization: Bearer <key>`): list, load, promote, "
        "roll back and unload versions. None: no admin API.",
    )
    canary_steps: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [0.1, 0.25, 0.5],
        description="Shares of new requests a new version gets, one rollout step each, before promotion.",
    )
    canary_step_seconds: float = Field(
        30.0, gt=0, description="Least seconds a canary step lasts before it is judged."
    )
    canary_min_requests: int = Field(
        20,
        ge=1,
        description="Least requests the canary must finish in a step before the step is judged (a step "
        "waits for them: a version is never promoted unseen).",
    )
    canary_max_error_rate: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Rolled back when its share of failed requests exceeds the stable version's by more "
        "than this (failed canary requests are retried on the stable version before their first token).",
    )
    canary_max_latency_ratio: float = Field(
        1.5,
        ge=1,
        description="Rolled back when its p99 time to first token or inter-token latency in a step exceeds "
        "the stable version's by more than this factor (and by more than 5 ms).",
    )
    golden_prompts: str | None = Field(
        None,
        description='JSONL file of {"prompt": ..., "expected": ...}: before its canary, a new version\'s '
        "greedy completion of each prompt must start with `expected` (none given: equal the stable "
        "version's).",
    )

    # --- network -------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address to bind; use 0.0.0.0 to listen on all interfaces.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0: any free port).")
    grpc_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="TCP port of the gRPC front end (kiln.v1.Generation, health checking, reflection) on "
        "--host beside REST, over the same engine (0: any free port; None: no gRPC).",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="API keys accepted as `Authorization: Bearer <key>` on /v1 routes (none: no auth).",
    )
    key_protects_all: bool = Field(
        False,
        description="Also require an API key on /metrics, /version, /docs and /openapi.json (never on "
        "/health and /ready, which probes call).",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS (e.g. http://localhost:3000, or *)."
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1, description="Largest request body accepted; larger ones get 413."
    )
    max_prompt_chars: int | None = Field(
        1_000_000,
        ge=1,
        description="Most characters of prompt text (all of a request's prompts or messages) a request may "
        "send; more gets 400 before it is tokenized (None: no limit).",
    )
    header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="Seconds a connection has to send a complete request head (request line and headers) "
        "from when it opens or its previous response ends; then it is closed (with 408 if it sent part of "
        "one). An idle keep-alive connection lasts the shorter of this and --keep-alive-timeout-seconds.",
    )
    max_header_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="Largest request head (request line and headers) accepted; a larger one gets 431 and "
        "the connection is closed, as soon as the limit is passed.",
    )
    max_connections: int = Field(
        2048,
        ge=1,
        description="Most open client connections. Past it a new connection closes the one that has waited "
        "longest for a request head (half-open or idle keep-alive); if every connection is busy with a "
        "request, the new one gets 503. Keep it + 2048 (the listen backlog) + a few hundred below the "
        "open-file limit (ulimit -n); the server warns at startup if not.",
    )

    tool_call_parser: Literal["hermes", "llama3_json"] | None = Field(
        None,
        description="How the model writes tool calls (default: detected from its chat template; Hermes, with "
        "Kiln's instructions, when the template does not render tools).",
    )
    reasoning_parser: Literal["deepseek_r1"] | None = Field(
        None,
        description="Read a reasoning model's thinking apart from its answer: deepseek_r1, reasoning up to "
        "</think> (chat: `reasoning_content`; the Responses API: a reasoning item). Default: none, the "
        "output is all content.",
    )

    # --- admission and timeouts ----------------------------------------------------------------------
    max_waiting_sequences: int | None = Field(
        512,
        ge=0,
        description="Most sequences (a request's prompts x n) waiting for their first token; more gets 429, "
        "a request holding more gets 400 (None: no limit).",
    )
    max_waiting_tokens: int | None = Field(
        None,
        ge=0,
        description="Most tokens (prompt plus max_tokens, per sequence) of requests waiting for their first "
        "token; more gets 429 (None: no limit).",
    )
    default_max_tokens: int | None = Field(
        None,
        ge=1,
        description="max_tokens of a request that sends none (None: all the room its context has left, as "
        "OpenAI does).",
    )
    max_tokens_limit: int | None = Field(
        None, ge=1, description="Most max_tokens a request may ask for; more gets 400 (None: its context)."
    )
    responses_store_size: int = Field(
        1024,
        ge=0,
        description="Responses kept in memory for GET /v1/responses/{id} and previous_response_id, the "
        "least recently used going first past it (0: none kept; `store` then defaults to false).",
    )
    generation_config: Literal["auto", "none"] = Field(
        "auto",
        description="Defaults of the sampling fields a request omits (temperature, top_p, top_k, min_p, "
        "repetition_penalty, max_tokens): auto, the model's (its generation_config.json, recorded in the "
        "engine at build) over Kiln's; none, Kiln's alone (temperature 1, top_p 1, no top_k), as vLLM's "
        "--generation-config vllm.",
    )
    retry_after_seconds: int = Field(1, ge=0, description="Retry-After header value sent with a 429.")
    request_timeout_seconds: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Deadline of a generation request that sends none (no `timeout` field, no "
        "X-Request-Timeout header), in seconds from its arrival; past it the request is stopped in the "
        "engine and answered with 504 (None: no deadline).",
    )
    max_request_timeout_seconds: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Longest deadline a generation request may have: a longer `timeout` or "
        "X-Request-Timeout, or none, is cut to this (None: no cap).",
    )
    keepalive_interval_seconds: float = Field(
        15.0, gt=0, description="Seconds between SSE keep-alive comments on a stream waiting for tokens."
    )
    drain_timeout_seconds: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM: seconds in-flight requests may take to finish before they are cut off.",
    )
    engine_check_interval_seconds: float = Field(
        1.0, gt=0, description="Seconds between checks that the engine still runs and answers."
    )
    engine_check_timeout_seconds: float = Field(
        10.0, gt=0, description="Seconds the engine has to answer a check before it is taken for stuck."
    )
    max_engine_restarts: int = Field(
        3,
        ge=0,
        description="Times an engine that died or got stuck is restarted (backoff 1, 2, 4 ... s) before the "
        "server gives up and exits with an error.",
    )
    keep_alive_timeout_seconds: int = Field(
        5, ge=1, description="Seconds an idle HTTP keep-alive connection stays open."
    )

    # --- SLO-driven batching (kiln.serve.slo) --------------------------------------------------------
    slo_ttft_ms: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Target time to first token at --slo-quantile, in ms. With it or --slo-itl-ms, a "
        "controller moves the engine's admission interval, token budget and running-sequence cap within "
        "bounds to meet the targets, and a request with a deadline that its predicted time to first "
        "token exceeds gets 429 at once (None: no target; needs the native engine).",
    )
    slo_itl_ms: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Target inter-token latency at --slo-quantile, in ms; it comes first when both targets "
        "cannot hold (None: no target).",
    )
    slo_quantile: float = Field(
        0.99, gt=0, lt=1, description="The quantile of TTFT and inter-token latency the targets are for."
    )
    slo_interval_seconds: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="Seconds between the SLO controller's decisions."
    )
    slo_window_seconds: float = Field(
        30.0,
        gt=0,
        allow_inf_nan=False,
        description="Seconds of recent latencies (at most, and only since its last change) the controller's "
        "quantiles, and the drain rate predicting a request's time to first token, are taken over.",
    )
    slo_min_admission_interval: int = Field(
        1, ge=1, description="Least admission interval the SLO controller may set."
    )
    slo_max_admission_interval: int = Field(
        8, ge=1, description="Most admission interval the SLO controller may set."
    )
    slo_min_token_budget: int = Field(
        256,
        ge=1,
        description="Least token budget per step the SLO controller may set (its most: the engine's "
        "--max-num-batched-tokens).",
    )
    slo_min_num_seqs: int = Field(
        8,
        ge=1,
        description="Least running-sequence cap the SLO controller may set (its most: the engine's "
        "--max-num-seqs).",
    )

    # --- logging -------------------------------------------------------------------------------------
    log_level: LogLevel = Field("info", description="Level of Kiln's and uvicorn's logs.")
    log_prompts: bool = Field(False, description="Include prompts and outputs in the per-request log line.")
    access_log: bool = Field(False, description="Also write uvicorn's access log line per request.")

    @field_validator("api_keys", "cors_origins", "canary_steps", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        # NoDecode leaves env strings raw so both JSON lists and "a,b" work.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("canary_steps")
    @classmethod
    def _steps_rise_below_one(cls, steps: list[float]) -> list[float]:
        if not steps:
            raise ValueError("give at least one canary step")
        if any(not 0 < share < 1 for share in steps) or steps != sorted(set(steps)):
            raise ValueError(f"shares must rise strictly, each between 0 and 1 (exclusive), got {steps}")
        return steps

    @field_validator("max_request_timeout_seconds")
    @classmethod
    def _cap_holds_the_default(cls, cap: float | None, info: ValidationInfo) -> float | None:
        default = info.data.get("request_timeout_seconds")
        if cap is not None and default is not None and default > cap:
            raise ValueError(
                f"shorter than --request-timeout-seconds ({default:g}), the default it must hold"
            )
        return cap

    @field_validator("slo_max_admission_interval")
    @classmethod
    def _interval_bounds_in_order(cls, most: int, info: ValidationInfo) -> int:
        least = info.data.get("slo_min_admission_interval")
        if least is not None and most < least:
            raise ValueError(f"below --slo-min-admission-interval ({least})")
        return most

    def engine_config(self) -> EngineConfig:
        """The engine's share of these settings."""
        return EngineConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EngineConfig)})


def _engine_fields() -> dict[str, Any]:
    """One settings field per `EngineConfig` field, with its type, default, help text and range."""
    types = typing.get_type_hints(EngineConfig)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(EngineConfig):
        bounds = {key: f.metadata[key] for key in BOUNDS if key in f.metadata}
        fields[f.name] = (types[f.name], Field(f.default, description=f.metadata["help"], **bounds))
    return fields


ServerSettings = create_model(
    "ServerSettings",
    __base__=_ServerSettings,
    __module__=__name__,
    __doc__="Every knob of `kiln serve`: the server's own and, generated, `EngineConfig`'s.",
    **_engine_fields(),
)
