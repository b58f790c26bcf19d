"""The engine holds a structured output only after its `after` text (a reasoning model's `</think>`):
the text before it is the model's own, the answer after it matches the constraint, then the output
ends. The tiny model writes no `</think>`, so `after` is the text of the token it writes first anyway."""

from __future__ import annotations

from kiln import LLM, SamplingParams
from kiln.engine.sampling_params import StructuredOutput


def test_the_answer_is_held_from_the_after_text_on(tiny_gqa_dir) -> None:
    llm = LLM(tiny_gqa_dir, device="cpu")
    tokenizer = llm.tokenizer
    for prompt in ("Once upon a time", "Hello there", "The answer is", "One two three"):
        first = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))[0].outputs[0]
        close = tokenizer.decode(first.token_ids)
        if close.strip().isascii() and close.strip().isalnum() and close == first.text:
            break
    else:
        raise AssertionError("no prompt whose first greedy token reads as plain text")
    held = StructuredOutput("regex", "[ab]{3}", after=close)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, structured=held))[0].outputs[0]
    assert out.text.startswith(close)  # the model's own first token: the free part ends at once
    answer = out.text[len(close) :]
    assert len(answer) == 3 and set(answer) <= {"a", "b"}
    assert out.finish_reason == "stop"  # the constraint complete: the output ends
