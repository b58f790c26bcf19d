"""Checks of a whole engine that tests in several folders share.

Imported as `engine_checks`: tests/ has no __init__.py, so pytest puts it on sys.path with tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

from kiln import LLM, SamplingParams
from kiln.bench.accuracy import text_logits


def assert_greedy_is_the_prefill_argmax(llm: LLM, engine_dir: Path) -> None:
    """Greedy decoding of a batch of two prompts through the whole engine path (scheduler, paged prefill,
    decode steps): each generated token is the argmax of one prefill over the prompt and the tokens
    before it."""
    prompts = [[5, 17, 99, 3], [42, 7, 7, 300, 12, 9]]
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=6)
    )
    for prompt, out in zip(prompts, outs, strict=True):
        tokens = out.outputs[0].token_ids
        assert len(tokens) == 6
        logits = text_logits(engine_dir, prompt + tokens[:-1])
        assert logits[len(prompt) - 1 :].argmax(-1).tolist() == tokens
