"""The embedded default model, SmolLM2-135M-Instruct built from its GGUF, against transformers."""

from __future__ import annotations

import pytest
import torch
import transformers

from kiln import LLM, SamplingParams
from kiln.build import build_engine

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about autumn.",
]


@pytest.fixture(scope="module")
def engine_dir(smollm2_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "engine"
    build_engine(smollm2_gguf, out, dtype="float32", progress=False)
    return out


@pytest.fixture(scope="module")
def llm(engine_dir):
    return LLM(engine_dir, device="cpu")


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


def test_greedy_chat_matches_transformers(llm, hf_model):
    params = SamplingParams(temperature=0.0, max_tokens=24)
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([prompt])
        ref = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        assert out.outputs[0].token_ids == ref[0, len(prompt) :].tolist()


def test_answers_a_factual_question(llm):
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0)
    )
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # it ends its answer with <|im_end|>


def test_streams_multibyte_text_without_broken_characters(llm):
    prompt = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Give me an emoji for happiness."}]
    )
    # Greedy, it answers with emoji: 4-byte characters that byte-level BPE splits across tokens.
    llm.engine.add_request("mb", params=SamplingParams(temperature=0, max_tokens=8), prompt_token_ids=prompt)
    deltas, tokens = [], []
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            deltas.append(out.outputs[0].text)
            tokens.extend(out.outputs[0].token_ids)
    text = "".join(deltas)
    # Cut off by max_tokens mid-character, the final partial character is never sent at all.
    assert text == llm.tokenizer.decode(tokens).rstrip("\ufffd")
    assert any(ord(ch) > 127 for ch in text)  # the answer has multi-byte characters ...
    assert all("\ufffd" not in d for d in deltas)  # ... and no delta ever carried half of one
