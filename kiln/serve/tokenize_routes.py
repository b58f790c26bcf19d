"""`POST /tokenize` and `POST /detokenize`, in vLLM's shapes: text or a conversation -> token ids -> text.

Rules:
- /tokenize takes vLLM's two request forms, told apart by their field: `{prompt}`, encoded as
  /v1/completions encodes a prompt (with the tokenizer's special tokens, unless
  `add_special_tokens: false`), or `{messages}` (with `tools` and vLLM's template options:
  `add_generation_prompt`, `continue_final_message`, `chat_template_kwargs`; those with `prompt` are a
  400), rendered by the chat template exactly as /v1/chat/completions renders them, so `count` is
  the `prompt_tokens` a chat request would use. Exactly one of the two; the template adds a
  conversation's special tokens itself (`add_special_tokens: true` with `messages` is a 400). It
  answers `{count, max_model_len, tokens}`, plus `token_strs` with `return_token_strs: true`.
- /detokenize takes `{tokens}` and answers `{prompt}`: the text, special tokens kept (so a
  conversation's ids come back as its rendered prompt). An id outside the vocabulary is a 400 naming
  `tokens`.
- `model`, when given, must name the served model (404). Prompt text is bounded as the generation
  routes bound it (`--max-prompt-chars`, valid Unicode), and large inputs run off the event loop.
- Only the tokenizer is used: both answer while the engine is busy or draining; 503 while it loads.
- Behind the API key when the server has keys, as the /v1 routes are. Unknown fields are ignored, with
  one log line, as everywhere.
"""

from __future__ import annotations

import logging

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from kiln.serve.auth import require_api_key
from kiln.serve.chat_tools import plan_tools, renders_tools, template_messages
from kiln.serve.errors import InvalidRequestError
from kiln.serve.openapi import error_responses, key_responses
from kiln.serve.protocol import ChatCompletionRequest, ChatMessage, LenientModel, TemplateOptions, ToolDef
from kiln.serve.sampling import check_token_ids
from kiln.serve.settings import ServerSettings
from kiln.serve.state import server_state
from kiln.serve.tokenize import chat_template_options, check_prompt_text, tokenize

logger = logging.getLogger("kiln.serve")


class TokenizeRequest(TemplateOptions):
    """vLLM's TokenizeCompletionRequest (`prompt`) and TokenizeChatRequest (`messages`) in one model."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"prompt": "Hello, world"},
                {"messages": [{"role": "user", "content": "Hi"}], "return_token_strs": True},
            ]
        }
    )

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # prompt: default true; messages: the template adds them
    tools: list[ToolDef] | None = None  # messages only (as the TemplateOptions fields)
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = Field(None, exclude_if=lambda v: v is None)  # with return_token_strs


class DetokenizeRequest(LenientModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"tokens": [1, 2, 3]}]})

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


def _log_unknown_fields(body: BaseModel, request: Request) -> None:
    extra = sorted((body.model_extra or {}).keys())
    if extra:
        logger.info("request %s: ignoring unknown fields %s", request.state.request_id, extra)


async def create_tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = server_state(request)
    state.check_model(body.model)
    _log_unknown_fields(body, request)
    tokenizer = state.engine.tokenizer
    limit = state.settings.max_prompt_chars
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError(
            "give prompt (text) or messages (a conversation), exactly one", param="prompt"
        )
    if body.messages is None:
        assert body.prompt is not None
        for name in ("add_generation_prompt", "continue_final_message", "chat_template_kwargs", "tools"):
            if name in body.model_fields_set:
                raise InvalidRequestError(
                    f"{name} applies to messages (a conversation), not prompt", param=name
                )
        text, special = body.prompt, body.add_special_tokens is not False
        chars = check_prompt_text([text], limit=limit, param="prompt")
        ids = await tokenize(lambda: tokenizer.encode(text, add_special_tokens=special), chars=chars)
    else:
        if body.add_special_tokens:
            raise InvalidRequestError(
                "add_special_tokens applies to prompt; the chat template adds a conversation's own",
                param="add_special_tokens",
            )
        # The chat route's rendering, tools included (kiln.serve.chat).
        chat = ChatCompletionRequest(messages=body.messages, tools=body.tools)
        plan = plan_tools(chat, tokenizer, state.settings.tool_call_parser)
        native = renders_tools(tokenizer)
        messages = template_messages(body.messages, plan, native)
        tools = plan.tools if plan is not None and native else None
        chars = check_prompt_text((m["content"] for m in messages), limit=limit, param="messages")
        options = chat_template_options(body, tokenizer)
        try:
            ids = await tokenize(
                lambda: tokenizer.apply_chat_template(messages, tools=tools, **options), chars=chars
            )
        except ValueError as exc:  # no chat template, or a message it cannot render
            raise InvalidRequestError(str(exc), param="messages") from None
    ids = list(ids)
    return TokenizeResponse(
        count=len(ids),
        max_model_len=state.engine.model_info.max_model_len,
        tokens=ids,
        token_strs=tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None,
    )


async def create_detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = server_state(request)
    state.check_model(body.model)
    _log_unknown_fields(body, request)
    tokenizer = state.engine.tokenizer
    ids = body.tokens
    check_token_ids(ids, vocab_size=tokenizer.vocab_size, param="tokens")
    text = await tokenize(lambda: tokenizer.decode(ids, skip_special_tokens=False), chars=len(ids))
    return DetokenizeResponse(prompt=text)


def add_tokenize_routes(app: FastAPI, settings: ServerSettings) -> None:
    """Register POST /tokenize and POST /detokenize on `app`, behind the API key when there are keys."""
    responses = {**error_responses(400, 404, 503), **key_responses(settings)}  # 503: the model is loading
    guarded = [Depends(require_api_key)]
    app.add_api_route(
        "/tokenize", create_tokenize, methods=["POST"], dependencies=guarded, responses=responses
    )
    app.add_api_route(
        "/detokenize", create_detokenize, methods=["POST"], dependencies=guarded, responses=responses
    )
