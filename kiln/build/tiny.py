"""The tiny random-weight Llama checkpoint: Kiln's offline test model and `kiln build --tiny`.

`write_tiny_checkpoint` writes a complete Hugging Face checkpoint (config, safetensors weights, a
byte-level BPE tokenizer trained here, a ChatML chat template, generation config) in about a second,
with no download. Rules the rest of Kiln relies on:

- Same arguments -> byte-identical files (weights come from `torch.manual_seed(seed)`; the tokenizer is
  trained on the fixed corpus below, which does not depend on the seed).
- The tokenizer has exactly `vocab_size` tokens and any UTF-8 string round-trips through it exactly
  (byte-level pre-tokenizer and decoder, no normalizer, no clean-up of spaces).
- Token ids: 0 `<|endoftext|>` (bos, pad), 1 `<|im_start|>`, 2 `<|im_end|>` (eos of the chat template).
  `config.json` says eos is 0; `generation_config.json` lists both 0 and 2, as chat models do.
- Weights are fp32 drawn with a large `initializer_range`, so next-token distributions are peaky and
  greedy comparisons against transformers do not sit on near-ties.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kiln.models.weight_files import WEIGHTS_NAME

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
BOS_TOKEN_ID = 0
CHAT_EOS_TOKEN_ID = 2
# The byte alphabet (256) plus the special tokens; every token above this is a learned merge.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# std of the normal init. transformers' default (0.02) gives nearly flat logits on a random model; at
# 0.7 the median gap between the top two logits is ~1.2 and near-ties are rare (tests/build/test_tiny.py).
INITIALIZER_RANGE = 0.7

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The training corpus: a little English, code and non-Latin text so that merges exist for ASCII words,
# indentation, and multi-byte UTF-8 sequences (CJK, Cyrillic, Arabic, emoji). Changing it changes every
# tiny checkpoint's token ids; that is fine (nothing stores them) but keep it fixed within a release.
TRAINING_CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs away.",
    "Hello! How are you today? I am fine, thank you. What would you like to talk about?",
    "Once upon a time there was a small kiln in a village. Potters brought their clay to the kiln, "
    "and the fire turned the soft clay into hard, beautiful pots, cups and plates.",
    "A language model predicts the next token from the tokens before it. Serving a model means running "
    "that prediction again and again, as fast as possible, for many users at the same time.",
    "The assistant answers questions politely. The user asks about the weather, the time, and the news.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024 2048 4096 65536 3.14159 2.71828 -1 +1 1e-6",
    "def add(a: int, b: int) -> int:\n    return a + b\n\n\nclass Counter:\n    def __init__(self):\n"
    "        self.count = 0\n\n    def step(self) -> None:\n        self.count += 1\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(f'even {i}')\n    else:\n        print('odd', i)\n",
    "import json\nwith open('config.json') as f:\n    config = json.load(f)\nprint(config['hidden_size'])\n",
    '#include <stdio.h>\nint main(void) {\n    printf("hello, world\\n");\n    return 0;\n}\n',
    '{"name": "kiln", "version": "0.1.0", "tokens": [1, 2, 3], "ok": true, "value": null}',
    "SELECT id, name FROM users WHERE age > 21 ORDER BY name;",
    "<html><body><p>Hello &amp; welcome</p></body></html>",
    "今天天气很好。我们去公园散步吧。你好，世界！机器学习和人工智能正在改变世界。",
    "日本語のテキストです。こんにちは、世界。東京は大きな都市です。ありがとうございます。",
    "한국어 문장입니다. 안녕하세요, 세계. 감사합니다.",
    "Привет, мир! Как дела? Сегодня хорошая погода. Москва — столица России.",
    "مرحبا بالعالم. كيف حالك اليوم؟ شكرا جزيلا.",
    "שלום עולם. מה שלומך?",
    "नमस्ते दुनिया। आप कैसे हैं?",
    "Γειά σου κόσμε! Τι κάνεις;",
    "Ünïcödé àccents: café, naïve, résumé, façade, jalapeño, Straße, smörgåsbord, Łódź, Ærø.",
    "Emoji: 😀 😃 😄 😁 😆 😅 😂 🤣 🙂 🙃 😉 😊 😇 🥰 😍 🤩 😘 👍 👎 🎉 🔥 ❤️ 🚀 🌍 🐍 🦀 ✨ ✅ ❌ 👨‍👩‍👧‍👦 🏳️‍🌈",
    "Math: ∑ ∫ √ ∞ ≈ ≠ ≤ ≥ ± × ÷ π λ μ σ Ω → ← ↑ ↓ ⇒ ∀ ∃ ∈ ∉ ⊂ ∪ ∩",
    "Tabs\tand  double  spaces,\r\nwindows line endings, and trailing spaces   \n\n\nblank lines.",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    "The capital of France is Paris.<|im_end|>\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nTell me a joke."
    "<|im_end|>\n<|im_start|>assistant\nWhy did the scarecrow win an award? Because he was outstanding "
    "in his field.<|im_end|>\n",
    "In the beginning the universe was created. This has made a lot of people very angry and been "
    "widely regarded as a bad move.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings "
    "and arrows of outrageous fortune, or to take arms against a sea of troubles.",
]


def _train_tokenizer(vocab_size: int) -> Any:
    """Train the byte-level BPE on TRAINING_CORPUS; returns a `tokenizers.Tokenizer` of exactly vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: a leading space must stay a property of the text, or decode(encode(s)) != s.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_CORPUS, trainer=trainer)
    got = tokenizer.get_vocab_size()
    if got != vocab_size:
        # The corpus ran out of pairs to merge; the model's vocab must match the tokenizer's exactly.
        raise ValueError(f"vocab_size={vocab_size} is more than the tiny corpus can train (got {got} tokens)")
    return tokenizer


def _tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": ENDOFTEXT,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        # Space clean-up would rewrite " ." to "." and break exact round trips.
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "chat_template": CHATML_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {
                "content": tok,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
                "special": True,
            }
            for i, tok in enumerate(SPECIAL_TOKENS)
        },
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tiny_checkpoint(
    out_dir: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = False,
    rope_scaling: dict[str, Any] | None = None,
    vocab_size: int = 512,
) -> Path:
    """Write a random Llama checkpoint in Hugging Face format into out_dir (created if needed); returns out_dir.

    rope_scaling is the HF dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None for plain RoPE.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + special tokens)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(vocab_size)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config())
    _write_json(
        out_dir / "special_tokens_map.json",
        {"bos_token": ENDOFTEXT, "eos_token": IM_END, "pad_token": ENDOFTEXT},
    )

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        # A copy: transformers adds rope_theta to the dict it is given, and the caller's is not ours.
        rope_scaling=dict(rope_scaling) if rope_scaling is not None else None,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=INITIALIZER_RANGE,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=BOS_TOKEN_ID,
        pad_token_id=BOS_TOKEN_ID,
        architectures=["LlamaForCausalLM"],
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float()
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    if tie_word_embeddings:
        # Tied: lm_head shares embed_tokens' storage; HF checkpoints store only the embedding.
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})

    hf_config = config.to_dict()
    hf_config["dtype"] = "float32"
    _write_json(out_dir / "config.json", hf_config)
    _write_json(
        out_dir / "generation_config.json",
        {
            "bos_token_id": BOS_TOKEN_ID,
            "eos_token_id": [BOS_TOKEN_ID, CHAT_EOS_TOKEN_ID],
            "pad_token_id": BOS_TOKEN_ID,
        },
    )
    return out_dir
