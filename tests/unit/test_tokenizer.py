"""Tokenizer wrapper: loading (HF dir, GGUF), eos ids, chat templates, decode rules, thread safety."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kiln.models.tokenizer import Tokenizer

TEXT = "Hello, world! 今天天气很好 😀 café\n    return a + b"


@pytest.fixture(scope="module")
def tiny(tiny_gqa_dir: Path) -> Tokenizer:
    return Tokenizer(tiny_gqa_dir)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> Tokenizer:
    return Tokenizer(smollm2_gguf)  # a .gguf file path: the directory + gguf_file split is done for us


def copy_tokenizer(src: Path, dst: Path, **config_changes) -> Path:
    """A copy of src's tokenizer files (no generation_config.json) with tokenizer_config.json edited."""
    dst.mkdir()
    for name in ("tokenizer.json", "special_tokens_map.json"):
        shutil.copy(src / name, dst / name)
    config = json.loads((src / "tokenizer_config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


def test_round_trip_and_properties(tiny: Tokenizer, tiny_gqa_dir: Path):
    ids = tiny.encode(TEXT)
    assert all(isinstance(i, int) for i in ids)
    assert tiny.decode(ids) == TEXT
    assert tiny.vocab_size == 512
    assert {0, 1, 2} <= set(tiny.all_special_ids)
    assert tiny.name_or_path == str(tiny_gqa_dir)
    assert tiny.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]


def test_eos_ids_merge_tokenizer_and_generation_config(tiny: Tokenizer, tiny_gqa_dir: Path, tmp_path: Path):
    # tokenizer eos is <|im_end|> (2); generation_config.json lists [0, 2].
    assert tiny.eos_token_ids == [2, 0]
    without = Tokenizer(copy_tokenizer(tiny_gqa_dir, tmp_path / "no-genconfig"))
    assert without.eos_token_ids == [2]


def test_decode_skips_special_tokens_on_request(tiny: Tokenizer):
    ids = [*tiny.encode("hi"), 2]
    assert tiny.decode(ids) == "hi"
    assert tiny.decode(ids, skip_special_tokens=False) == "hi<|im_end|>"


def test_decode_never_cleans_up_spaces(tiny_gqa_dir: Path, tmp_path: Path):
    tok = Tokenizer(copy_tokenizer(tiny_gqa_dir, tmp_path / "cleanup", clean_up_tokenization_spaces=True))
    text = "a , b . c ?"
    assert tok.decode(tok.encode(text)) == text


def test_chat_template_matches_rendered_text(tiny: Tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀"}]
    ids = tiny.apply_chat_template(messages)
    rendered = tiny.render_chat_template(messages)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert ids == tiny.encode(rendered, add_special_tokens=False)
    assert all(isinstance(i, int) for i in ids)
    without_prompt = tiny.apply_chat_template(messages, add_generation_prompt=False)
    assert ids[: len(without_prompt)] == without_prompt and len(ids) > len(without_prompt)


def test_chat_content_parts_are_joined(tiny: Tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    assert tiny.apply_chat_template(parts) == tiny.apply_chat_template(
        [{"role": "user", "content": "one\ntwo"}]
    )
    with pytest.raises(ValueError, match="image_url"):
        tiny.apply_chat_template(
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
        )


def test_missing_chat_template_is_a_clear_error(tiny_gqa_dir: Path, tmp_path: Path):
    tok = Tokenizer(copy_tokenizer(tiny_gqa_dir, tmp_path / "no-template", chat_template=None))
    assert not tok.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_concurrent_use_from_threads(tiny: Tokenizer):
    texts = [f"{TEXT} number {i}" * (1 + i % 5) for i in range(64)]
    expected = [(tiny.encode(t), t) for t in texts]

    def work(i: int) -> tuple[list[int], str]:
        ids = tiny.encode(texts[i])
        return ids, tiny.decode(ids)

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(work, range(64))) == expected


def test_smollm2_gguf_tokenizer(smollm2: Tokenizer):
    assert smollm2.vocab_size == 49152
    assert 2 in smollm2.eos_token_ids  # <|im_end|>
    ids = smollm2.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert ids[0] == 1 and all(isinstance(i, int) for i in ids)  # <|im_start|>
    assert smollm2.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert smollm2.decode(smollm2.encode(TEXT, add_special_tokens=False)) == TEXT


def test_fast_decode_equals_transformers_decode(tiny_gqa_dir, smollm2_gguf) -> None:
    import random

    rng = random.Random(0)
    for tok in (Tokenizer(tiny_gqa_dir), Tokenizer(smollm2_gguf)):
        assert tok._rust is not None
        for _ in range(50):
            ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 12))] + [0, 1, 2]
            rng.shuffle(ids)
            for skip in (True, False):
                expected = tok.hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
                assert tok.decode(ids, skip_special_tokens=skip) == expected


def test_chat_template_continues_the_final_message_and_takes_template_variables(
    tiny_gqa_dir: Path, tmp_path: Path
):
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% if not enable_thinking %}<think></think>{% endif %}"
        "{% endif %}"
    )
    tok = Tokenizer(copy_tokenizer(tiny_gqa_dir, tmp_path / "thinking", chat_template=template))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I am"}]
    continued = tok.decode(tok.apply_chat_template(messages, False, continue_final_message=True), False)
    assert continued.endswith("<|im_start|>assistant\nHello, I am")  # no end of turn: the reply goes on
    thinking = tok.decode(
        tok.apply_chat_template(messages[:1], template_kwargs={"enable_thinking": True}), False
    )
    plain = tok.decode(
        tok.apply_chat_template(messages[:1], template_kwargs={"enable_thinking": False}), False
    )
    assert thinking.endswith("assistant\n") and plain.endswith("assistant\n<think></think>")
    tok.check_template_kwargs({"enable_thinking": True, "anything": 1})
    with pytest.raises(ValueError, match=r"^chat_template, tokenize: not template variables"):
        tok.check_template_kwargs({"tokenize": False, "chat_template": "x", "ok": 1})
