"""`ServerSettings`: every knob of `kiln serve`, from flags or `KILN_*` environment variables.

Rules:
- One model documents everything: each field's description is also its `kiln serve --help` text, and
  the CLI generates one flag per field (`max_waiting_requests` -> `--max-waiting-requests`).
- Precedence: a flag given on the command line > a `KILN_<FIELD>` environment variable > the default.
  List fields read from the environment as JSON (`KILN_API_KEYS='["k1","k2"]'`) or comma-separated.
- The engine's runtime knobs (`EngineConfig`) are fields here too, so one flag set configures both;
  `engine_options()` hands them to the engine.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kiln.config import EngineConfig

LogLevel = Literal["debug", "info", "warning", "error"]


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore", validate_default=True)

    # --- what to serve -------------------------------------------------------------------------------
    model: str | None = Field(
        None,
        description="Engine directory, Hugging Face checkpoint directory or hub id to serve "
        "(None: the embedded default model).",
    )
    served_model_name: str | None = Field(
        None, description="Name clients send as `model` (default: the engine's own name)."
    )

    # --- network -------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address to bind; use 0.0.0.0 to listen on all interfaces.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0: any free port).")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="API keys accepted as `Authorization: Bearer <key>` on /v1 routes (none: no auth).",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS (e.g. http://localhost:3000, or *)."
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1, description="Largest request body accepted; larger ones get 413."
    )

    # --- admission and timeouts ----------------------------------------------------------------------
    max_waiting_requests: int | None = Field(
        512,
        ge=0,
        description="Most requests waiting for their first token; one more gets 429 (None: no limit).",
    )
    max_waiting_tokens: int | None = Field(
        None,
        ge=0,
        description="Most prompt tokens of requests waiting for their first token; more gets 429 "
        "(None: no limit).",
    )
    retry_after_seconds: int = Field(1, ge=0, description="Retry-After header value sent with a 429.")
    keepalive_interval_seconds: float = Field(
        15.0, gt=0, description="Seconds between SSE keep-alive comments on a stream waiting for tokens."
    )
    drain_timeout_seconds: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM: seconds in-flight requests may take to finish before they are cut off.",
    )
    keep_alive_timeout_seconds: int = Field(
        5, ge=1, description="Seconds an idle HTTP keep-alive connection stays open."
    )

    # --- logging -------------------------------------------------------------------------------------
    log_level: LogLevel = Field("info", description="Level of Kiln's and uvicorn's logs.")
    log_prompts: bool = Field(False, description="Include prompts and outputs in the per-request log line.")
    access_log: bool = Field(False, description="Also write uvicorn's access log line per request.")

    # --- engine runtime (EngineConfig) --------------------------------------------------------------
    dtype: str | None = Field(None, description="Weight dtype (default: the engine directory's).")
    device: str | None = Field(None, description="Device, e.g. cuda or cpu (default: cuda if available).")
    max_num_seqs: int | None = Field(
        None, ge=1, description="Most requests running at once (default: the engine's max batch size)."
    )
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="Token budget of one engine step (default: the engine's max tokens)."
    )
    max_model_len: int | None = Field(
        None, ge=1, description="Prompt plus completion tokens per request (default: the engine's)."
    )
    block_size: int | None = Field(None, ge=1, description="Tokens per KV-cache block (default: engine's).")
    num_kv_blocks: int | None = Field(
        None, ge=1, description="Exact KV-cache size in blocks; overrides the memory budget."
    )
    kv_cache_memory_bytes: int | None = Field(
        None, ge=1, description="Memory for the KV cache (CPU default: 1 GiB)."
    )
    gpu_memory_utilization: float = Field(
        0.90, gt=0, le=1, description="On CUDA: fraction of GPU memory for weights, activations and KV."
    )
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of shared prompt prefixes.")
    admission_interval: int = Field(
        1,
        ge=1,
        description="While requests run, admit new ones every this many steps, together: fewer steps "
        "mix prefills into decodes (those run without CUDA graphs), each arrival waits up to that many "
        "steps more.",
    )
    enforce_eager: bool = Field(
        False, description="On CUDA: run decode eagerly, without capturing CUDA graphs."
    )
    piecewise_graphs: bool = Field(
        True,
        description="On CUDA: also run steps that mix prompts and decodes (up to 1,024 tokens) as CUDA "
        "graphs, piece by piece around attention.",
    )
    async_scheduling: bool | None = Field(
        None,
        description="Prepare each step while the GPU runs the previous one (default: on with CUDA, "
        "off on CPU).",
    )
    seed: int = Field(0, description="Global sampling seed for requests that send none.")
    load_progress: bool = Field(True, description="Show a progress bar while the weights load.")
    engine_process: bool = Field(
        True,
        description="Run the native engine's step loop in its own process, so streaming many responses "
        "does not slow it down (off: one process, engine on a thread).",
    )

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        # NoDecode leaves env strings raw so both JSON lists and "a,b" work.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    def engine_options(self) -> EngineConfig:
        """The engine's share of these settings."""
        names = [f.name for f in dataclasses.fields(EngineConfig)]
        return EngineConfig(**{name: getattr(self, name) for name in names})
