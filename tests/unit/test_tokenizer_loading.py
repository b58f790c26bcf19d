"""Tokenizer loads a generic fast tokenizer without AutoTokenizer's model registry, and gets the same one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kiln.models.tokenizer import GENERIC_FAST_CLASSES, Tokenizer


def test_generic_fast_tokenizer_skips_the_model_registry(tiny_gqa_dir: Path) -> None:
    assert json.loads((tiny_gqa_dir / "tokenizer_config.json").read_text())["tokenizer_class"] in (
        GENERIC_FAST_CLASSES
    )
    code = (
        "import sys; from kiln.models.tokenizer import Tokenizer; "
        f"Tokenizer({str(tiny_gqa_dir)!r}); "
        "print('transformers.models.auto.tokenization_auto' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_it_is_the_tokenizer_autotokenizer_loads(tiny_gqa_dir: Path) -> None:
    from transformers import AutoTokenizer

    ours, auto = Tokenizer(tiny_gqa_dir).hf, AutoTokenizer.from_pretrained(str(tiny_gqa_dir))
    text = "Hello, world! 2+2=4 ünïcode"
    assert type(ours) is type(auto)
    assert ours.encode(text) == auto.encode(text)
    assert ours.all_special_ids == auto.all_special_ids and len(ours) == len(auto)
    assert ours.chat_template == auto.chat_template and ours.eos_token_id == auto.eos_token_id
