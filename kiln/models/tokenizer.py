"""`Tokenizer`: the one wrapper Kiln uses around a Hugging Face tokenizer (encode, decode, chat template).

Rules of the interface:
- Loaded with `AutoTokenizer.from_pretrained` (or, when tokenizer_config.json names the generic fast
  class, that class directly) from a directory holding tokenizer files (an engine directory and an HF
  checkpoint both do), or from a GGUF file (`path/to/model.gguf`, or a directory plus
  `gguf_file=`), whose embedded tokenizer transformers converts.
- `decode` never applies transformers' `clean_up_tokenization_spaces` (it rewrites " ." to "." for
  word-piece tokenizers): with it, the text streamed delta by delta would differ from the final text.
- `eos_token_ids` is the tokenizer's eos id followed by the ids `generation_config.json` lists (chat
  models end turns with a token that is not the tokenizer's eos), without duplicates.
- Thread safety: the server's event-loop thread and the engine's step thread may call any method at the
  same time. Hugging Face fast tokenizers (Rust `tokenizers`) encode and decode without shared mutable
  state, and transformers compiles a chat template once and then only renders it. Kiln never calls the
  mutating methods (add_tokens, truncation/padding setters) after loading. Slow (pure Python)
  tokenizers give no such promise, so loading one is refused.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kiln.models.token_bytes import TokenBytes

# tokenizer_config.json classes that are transformers' generic fast tokenizer (the name before and since
# transformers 5): loaded as that class directly. AutoTokenizer would land on the same class, but first
# imports the import structure of every model transformers has (~0.5 s of each start-up).
GENERIC_FAST_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})


class Tokenizer:
    def __init__(self, path: str | Path, *, gguf_file: str | None = None) -> None:
        path = Path(path)
        if gguf_file is None and path.is_file() and path.suffix == ".gguf":
            path, gguf_file = path.parent, path.name
        if gguf_file is None and _configured_class(path) in GENERIC_FAST_CLASSES:
            from transformers import PreTrainedTokenizerFast

            self.hf = PreTrainedTokenizerFast.from_pretrained(str(path))
        else:
            from transformers import AutoTokenizer

            kwargs = {"gguf_file": gguf_file} if gguf_file else {}
            self.hf = AutoTokenizer.from_pretrained(str(path), **kwargs)
        if not getattr(self.hf, "is_fast", False):
            raise ValueError(
                f"{path}: only fast (Rust) tokenizers are supported, got {type(self.hf).__name__}"
            )
        self._path = path
        self._eos_token_ids = self._read_eos_token_ids(path)
        # The Rust tokenizer itself: decoding through it skips transformers' per-call Python conversion,
        # which dominated detokenizing hundreds of streams per step. Same text: transformers' fast decode
        # is this call plus the space clean-up that Kiln turns off anyway.
        self._rust = getattr(self.hf, "_tokenizer", None)
        self._token_bytes: TokenBytes | None = None  # made on first use: most servers never ask

    @property
    def name_or_path(self) -> str:
        return str(self.hf.name_or_path)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, added tokens included. A model's embedding may
        have more rows (padded for speed); those ids decode to nothing."""
        return len(self.hf)

    @property
    def all_special_ids(self) -> list[int]:
        """Sorted ids of every special token: the named ones (bos, eos, pad, ...) and every added token
        flagged special (e.g. <|im_start|>), which transformers' own list can leave out but
        `decode(skip_special_tokens=True)` skips."""
        ids = set(self.hf.all_special_ids)
        ids.update(i for i, tok in self.hf.added_tokens_decoder.items() if tok.special)
        return sorted(ids)

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos_token_ids)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self._rust is not None:  # a list goes as it is: decoding runs for every token of every request
            return self._rust.decode(
                ids if isinstance(ids, list) else list(ids), skip_special_tokens=skip_special_tokens
            )
        return self.hf.decode(
            list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def decode_stream(self, context: Sequence[int], skip_special_tokens: bool = True) -> StreamDecoder | None:
        """The Rust tokenizer's incremental decoder for one sequence whose text so far ends with the
        tokens `context`; None where this tokenizer or the installed `tokenizers` has none."""
        if self._rust is None or not has_primed_decode_stream():
            return None
        return StreamDecoder(self._rust, context, skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes the token stands for (kiln.models.token_bytes): what OpenAI's logprob `bytes` carry,
        the part of a character where decoding the token alone gives U+FFFD."""
        if self._rust is None:
            return self.decode([token_id], skip_special_tokens=False).encode()
        if self._token_bytes is None:
            added = {i: token.content for i, token in self.hf.added_tokens_decoder.items()}
            self._token_bytes = TokenBytes(self._rust, added)
        return self._token_bytes(token_id)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return list(self.hf.convert_ids_to_tokens(list(ids)))

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool | None = None,
        tools: list[dict[str, Any]] | None = None,
        *,
        continue_final_message: bool = False,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Token ids of the conversation rendered with the tokenizer's chat template.

        Raises ValueError when the tokenizer has no chat template, or a message holds a non-text part.
        `tools`: OpenAI tool definitions, for templates that render them. `continue_final_message`: the
        render ends inside the last message (no end-of-turn after it), so generation continues it.
        `add_generation_prompt` (the assistant turn's opening at the end): None means not when continuing
        the final message, else yes; both is a ValueError. `template_kwargs`: more variables for the
        template (`check_template_kwargs` first).
        A message whose content is a list of OpenAI text parts has them joined with newlines.
        """
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        if add_generation_prompt and continue_final_message:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        ids = self.hf.apply_chat_template(
            self._normalize(messages),
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=True,
            tools=tools,
            **(template_kwargs or {}),
        )
        # transformers 5 returns a BatchEncoding by default, 4.x a plain list.
        if isinstance(ids, Mapping):
            ids = ids["input_ids"]
        ids = list(ids)
        if ids and isinstance(ids[0], list):  # a batch of one conversation
            ids = ids[0]
        return [int(i) for i in ids]

    def render_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text `apply_chat_template` tokenizes (for logs and `RequestOutput.prompt`)."""
        text = self.hf.apply_chat_template(
            self._normalize(messages), add_generation_prompt=add_generation_prompt, tokenize=False
        )
        return str(text)

    def check_template_kwargs(self, kwargs: Mapping[str, Any]) -> None:
        """Raise ValueError naming the keys of `kwargs` that are transformers' own arguments of
        `apply_chat_template` (`tokenize`, `chat_template`, ...): template variables may not steer them."""
        reserved = sorted(set(kwargs) & _template_arguments(type(self.hf)))
        if reserved:
            raise ValueError(
                f"{', '.join(reserved)}: not template variables but arguments of rendering the template; "
                "Kiln sets them"
            )

    def _normalize(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not self.has_chat_template:
            raise ValueError(
                f"the tokenizer of {self.name_or_path} has no chat template; send a plain completion "
                "request (/v1/completions) or use a chat model"
            )
        return [{**m, "content": _content_text(m.get("content"))} for m in messages]

    def _read_eos_token_ids(self, path: Path) -> list[int]:
        ids: list[int] = []
        if self.hf.eos_token_id is not None:
            ids.append(int(self.hf.eos_token_id))
        config = path / "generation_config.json"
        if path.is_dir() and config.is_file():
            eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token_id")
            for token in [eos] if isinstance(eos, int) else (eos or []):
                if int(token) not in ids:
                    ids.append(int(token))
        return ids

    def __repr__(self) -> str:
        return f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """`tokenizers.decoders.DecodeStream` over one sequence: the windowed decoding of
    `kiln.models.detokenizer` done in Rust, one call a step instead of two decodes.

    `step` returns the text the new ids made stable, or None while they end inside a character (or add
    no text). It raises when a window's text does not extend the text before it, which a ByteFallback
    decoder does around invalid byte runs; the caller then starts a new stream. A stream holds its
    sequence's state: one caller (the engine's output processing) steps it."""

    __slots__ = ("_rust", "_stream")

    def __init__(self, rust: Any, context: Sequence[int], skip_special_tokens: bool) -> None:
        from tokenizers.decoders import DecodeStream

        self._rust = rust
        self._stream = DecodeStream(list(context), skip_special_tokens=skip_special_tokens)

    def step(self, ids: Sequence[int]) -> str | None:
        if len(ids) == 1:  # every decode step
            return self._stream.step(self._rust, ids[0])
        chunks = [self._stream.step(self._rust, i) for i in ids]
        text = "".join(c for c in chunks if c is not None)
        return text or None


@functools.cache
def has_primed_decode_stream() -> bool:
    """Whether `tokenizers` has a DecodeStream that starts from context ids."""
    try:
        from tokenizers.decoders import DecodeStream

        DecodeStream([], skip_special_tokens=True)
    except (ImportError, TypeError):
        return False
    return True


def _content_text(content: Any) -> str:
    """A message's content as text: a string as is, None as "", a list of text parts joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, Mapping) and part.get("type", "text") == "text":
            parts.append(str(part.get("text", "")))
        else:
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ValueError(f"message content part of type {kind!r} is not supported; only text parts are")
    return "\n".join(parts)


@functools.cache
def _template_arguments(cls: type) -> frozenset[str]:
    """The named parameters of `cls.apply_chat_template` (its **kwargs go to the template)."""
    parameters = inspect.signature(cls.apply_chat_template).parameters.values()
    return frozenset(p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


def _configured_class(directory: Path) -> str | None:
    """The `tokenizer_class` a directory's tokenizer_config.json names, if it names one."""
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("tokenizer_class") if isinstance(config, dict) else None
    return name if isinstance(name, str) else None
