"""`LLM`: offline batch generation, shaped like vLLM's `LLM` class."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from kiln.build.default_model import ensure_default_engine
from kiln.config import EngineConfig
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.outputs import RequestOutput, accumulate
from kiln.engine.process_setup import prepare_process
from kiln.engine.sampling_params import SamplingParams
from kiln.engine_dir import read_generation_defaults

Prompt = str | dict[str, Any]  # "text" or {"prompt_token_ids": [...]} (vLLM's TokensPrompt)


class LLM:
    """Load a model and generate for a batch of prompts, all run together with in-flight batching.

    `model`: an engine directory, a Hugging Face checkpoint directory, or None for the embedded default
    model (built once into the cache). Keyword arguments are `EngineConfig` fields. An `LLM` owns its
    process as a script does: once the engine is built it seeds torch's global RNG with `seed` and settles
    the garbage collector (`prepare_process`), as `kiln serve` does.

    `generation_config`: "auto" (vLLM's default) makes a call without sampling params sample with the
    model's defaults (its generation_config.json, recorded in the engine at build) over Kiln's; "none"
    with Kiln's alone. Explicit `SamplingParams` are used as given.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        generation_config: Literal["auto", "none"] = "auto",
        **config: Any,
    ) -> None:
        if generation_config not in ("auto", "none"):
            raise ValueError(f"generation_config must be 'auto' or 'none', got {generation_config!r}")
        if model is None:
            model = ensure_default_engine()
        self.engine = LLMEngine.from_path(model, EngineConfig(**config))
        prepare_process(self.engine.config)
        self._defaults = read_generation_defaults(Path(model)) if generation_config == "auto" else {}

    def get_default_sampling_params(self) -> SamplingParams:
        """The params of a call that passes none: the model's defaults (see `generation_config`)."""
        return SamplingParams(**self._defaults)  # type: ignore[arg-type]

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One finished `RequestOutput` per prompt, in order, each completion holding its whole text."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params_list = (
            list(sampling_params)
            if isinstance(sampling_params, Sequence)
            else [sampling_params or self.get_default_sampling_params()] * len(prompts)
        )
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        ids = []
        for prompt, params in zip(prompts, params_list, strict=True):
            if isinstance(prompt, dict):
                if "prompt_token_ids" not in prompt:
                    raise ValueError("a dict prompt needs 'prompt_token_ids'")
                ids.append(
                    self.engine.add_request(
                        None, prompt.get("prompt"), params, prompt_token_ids=list(prompt["prompt_token_ids"])
                    )
                )
            else:
                ids.append(self.engine.add_request(None, prompt, params))
        results = {rid: None for rid in ids}
        while self.engine.has_unfinished_requests():
            for delta in self.engine.step():
                results[delta.request_id] = accumulate(results[delta.request_id], delta)
        return [results[rid] for rid in ids]

    def chat(
        self,
        messages: list[dict[str, Any]],
        sampling_params: SamplingParams | None = None,
        *,
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> RequestOutput:
        """Generate one reply to a conversation, formatted with the tokenizer's chat template. As vLLM's:
        `continue_final_message` continues the last message (the generation prompt then defaults to off;
        both on is a ValueError); `chat_template_kwargs` are more template variables."""
        self.tokenizer.check_template_kwargs(chat_template_kwargs or {})
        token_ids = self.tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            template_kwargs=chat_template_kwargs,
        )
        return self.generate({"prompt_token_ids": token_ids}, sampling_params)[0]
