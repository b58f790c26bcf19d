"""The checks a new version passes before it gets any traffic: tokenizer, smoke generation, golden prompts.

Rules:
- Tokenizer: requests are tokenized before they are routed, so a candidate must have the stable
  version's tokenizer files byte for byte (tokenizer.json, tokenizer_config.json, chat_template.jinja,
  whichever exist). A new tokenizer is a new model, not a new version.
- Smoke: a short greedy generation must finish.
- Golden prompts (`--golden-prompts`, JSONL of {"prompt", "expected"?, "max_tokens"?}): the candidate's
  greedy completion of each prompt (raw text, no chat template; max_tokens default 16) must start with
  `expected`, or without one equal the stable version's completion of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kiln.clients.protocol import EngineClient
from kiln.engine.sampling_params import SamplingParams
from kiln.serve.versions import ServedVersion

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
SMOKE_PROMPT = "Hello"


@dataclass(frozen=True, slots=True)
class GoldenPrompt:
    prompt: str
    expected: str | None = None
    max_tokens: int = 16


def read_golden_prompts(path: str | Path) -> tuple[GoldenPrompt, ...]:
    """Parse a golden-prompts file; ValueError naming the line at fault."""
    prompts = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise ValueError('each line must be an object with a string "prompt"')
            unknown = set(item) - {"prompt", "expected", "max_tokens"}
            if unknown:
                raise ValueError(f"unknown fields {sorted(unknown)}")
            prompts.append(
                GoldenPrompt(item["prompt"], item.get("expected"), int(item.get("max_tokens", 16)))
            )
        except ValueError as exc:
            raise ValueError(f"{path}, line {number}: {exc}") from None
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return tuple(prompts)


def tokenizer_difference(stable: Path, candidate: Path) -> str | None:
    """Which tokenizer file differs between two engine directories, or None."""
    for name in TOKENIZER_FILES:
        a, b = stable / name, candidate / name
        if a.is_file() != b.is_file() or (a.is_file() and a.read_bytes() != b.read_bytes()):
            return name
    return None


async def greedy(engine: EngineClient, prompt: str, max_tokens: int, request_id: str) -> str:
    ids = engine.tokenizer.encode(prompt)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    text = ""
    async for out in engine.generate(ids, params, request_id):
        text += out.outputs[0].text
    return text


async def check_version(
    candidate: ServedVersion, stable: ServedVersion, golden: tuple[GoldenPrompt, ...]
) -> None:
    """Raise ValueError saying what failed (see the module rules)."""
    differs = tokenizer_difference(stable.path, candidate.path)
    if differs is not None:
        raise ValueError(
            f"its {differs} differs from version {stable.number}'s: a new tokenizer needs a new model"
        )
    tag = f"rollout-check-{candidate.number}"
    await greedy(candidate.engine, SMOKE_PROMPT, 4, f"{tag}-smoke")
    for i, item in enumerate(golden):
        got = await greedy(candidate.engine, item.prompt, item.max_tokens, f"{tag}-golden-{i}")
        if item.expected is not None:
            if not got.startswith(item.expected):
                raise ValueError(f"golden prompt {i + 1}: expected {item.expected!r}, got {got!r}")
            continue
        want = await greedy(stable.engine, item.prompt, item.max_tokens, f"{tag}-stable-{i}")
        if got != want:
            raise ValueError(f"golden prompt {i + 1}: {got!r} where version {stable.number} says {want!r}")
