"""`IncrementalDetokenizer`: a request's output tokens to text, one step at a time, never broken UTF-8.

The technique (TGI's and vLLM's prefix/read offsets): keep a window of prompt + output ids whose
first `read_offset` tokens (the prefix) were already turned into text and whose rest were not. Each step
decodes only the window and its prefix and emits the difference; once text is released, the released
tokens become the next prefix and the ids before them are dropped. Decoding that short window of
preceding tokens matters for SentencePiece-style tokenizers, whose decoder drops the leading space of the
first token it sees: in the window, a token's space is kept. The cost per step is the window, not the
whole sequence. Where the tokenizer has a Rust stream decoder (`Tokenizer.decode_stream`, tokenizers'
DecodeStream), that decoder keeps the same window itself, in one call a step instead of two decodes
(the engine's host step 5-6% shorter, docs/results/2026-12-06-cpu). It refuses a window whose text does
not extend the text before it, which a ByteFallback decoder produces around invalid byte runs; the
detokenizer then restarts it from the ids before the new ones, as from a prompt, and text the old stream
still held back for them (at most an incomplete character's replacement) is not released. Refused again,
the sequence goes on in the window here, which takes any window.

Rules of the interface:
- `add` returns only text that is stable: when the window's text ends in U+FFFD, a token ended in the
  middle of a multi-byte character (byte-level BPE and byte-fallback split emoji and CJK across tokens),
  so the new text is held back until the character completes. A genuinely invalid byte is released
  (as U+FFFD) as soon as any valid text follows it.
- `text` is the concatenation of everything `add` returned. At the end it equals
  decode(window + output) minus decode(window), window being the prompt's last few tokens (see
  `_prompt_context`): for
  byte-level tokenizers exactly `tokenizer.decode(output_ids)`; for SentencePiece-style ones the same
  plus the leading space the first output token carries after the prompt (so prompt + text reads right).
  An incomplete character at the very end is never released. A prompt whose last tokens end inside a
  character gives no context (its bytes never fuse with the output's).
- Invalid UTF-8 is decoded as the tokenizer decodes it; note that transformers' ByteFallback decoder
  (Llama-style) replaces every byte of an invalid run, so text already released before an invalid
  byte run can differ from a later full decode. Byte-level BPE decoding has no such effect.
"""

from __future__ import annotations

from collections.abc import Sequence

from kiln.models.tokenizer import StreamDecoder, Tokenizer

# How many prompt tokens give the first output token its context (vLLM uses the same number).
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # The window: ids[:read_offset] is the prefix already turned into text, ids[read_offset:] the tokens
        # not yet released. Ids before the window are dropped as it moves, so the prefix starts at 0.
        self._ids = self._prompt_context(list(prompt_token_ids))
        self._read_offset = len(self._ids)
        self._text = ""
        # The tokenizer's Rust stream decoder, where it has one, keeps the same window itself (one call a
        # step instead of two decodes); `_ids` is then only the recent ids to restart it from.
        self._stream = tokenizer.decode_stream(self._ids, skip_special_tokens)

    @property
    def text(self) -> str:
        """All text released so far."""
        return self._text

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated tokens; returns the text that became stable with them (possibly "")."""
        if not token_ids:
            return ""
        if self._stream is not None:
            return self._add_streamed(self._stream, token_ids)
        ids = self._ids
        ids.extend(token_ids)
        prefix_text = self._decode(ids[: self._read_offset])
        new_text = self._decode(ids)
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            # Nothing visible yet (a skipped special token) or an incomplete character: wait for more.
            return ""
        delta = new_text[len(prefix_text) :]
        # The released tokens become the next prefix; the old prefix is never decoded again.
        del ids[: self._read_offset]
        self._read_offset = len(ids)
        self._text += delta
        return delta

    def _add_streamed(self, stream: StreamDecoder, token_ids: Sequence[int]) -> str:
        ids = self._ids
        ids.extend(token_ids)
        try:
            delta = stream.step(token_ids)
        except Exception:  # tokenizers raises a bare Exception for a window whose text it cannot extend
            # A ByteFallback decoder re-decoded an invalid byte run: restart from the ids before these,
            # as from a prompt (text the old stream still held back for them is not released).
            context = self._prompt_context(ids[: len(ids) - len(token_ids)])
            stream = self.tokenizer.decode_stream(context, self.skip_special_tokens)
            try:
                delta = stream.step(token_ids) if stream is not None else None
            except Exception:
                stream = None
            if stream is None:  # refused again: the sequence goes on in the Python window (any window works)
                self._stream, self._ids, self._read_offset = None, context, len(context)
                return self.add(token_ids)
            self._stream = stream
        if len(ids) > 4 * PROMPT_CONTEXT_TOKENS:
            del ids[: -2 * PROMPT_CONTEXT_TOKENS]  # enough for _prompt_context to step back from
        if delta is None:
            return ""
        self._text += delta
        return delta

    def _prompt_context(self, prompt: list[int]) -> list[int]:
        """The prompt's last tokens, starting at a character's first byte and ending at a character's end.

        A window that starts inside a character makes a ByteFallback decoder (Llama-style) replace the
        whole byte run, its end included, so step back up to 3 tokens (a character has at most 4 bytes)
        until the window's text ends cleanly. A prompt that itself ends inside a character gives no
        context: its bytes must not fuse with the output's, whose text would not start where it ends.
        """
        start = max(0, len(prompt) - PROMPT_CONTEXT_TOKENS)
        while self._decode(prompt[start:]).endswith(REPLACEMENT_CHAR):
            if start == 0 or len(prompt) - start >= PROMPT_CONTEXT_TOKENS + 3:
                return []
            start -= 1
        return prompt[start:]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
