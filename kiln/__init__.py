"""Kiln: build Llama-family checkpoints into engines and serve them with an OpenAI-compatible API.

>>> from kiln import LLM, SamplingParams
>>> llm = LLM("path/to/engine-or-hf-dir")
>>> llm.generate(["Hello"], SamplingParams(max_tokens=8))[0].outputs[0].text
"""

from kiln.engine.outputs import CompletionOutput, RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.version import __version__

__all__ = ["LLM", "AsyncEngine", "CompletionOutput", "RequestOutput", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Import the engine lazily: `import kiln` stays cheap for the CLI's --help and for the server's workers.
    if name == "LLM":
        from kiln.llm import LLM

        return LLM
    if name == "AsyncEngine":
        from kiln.clients.thread import AsyncEngine

        return AsyncEngine
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
