"""Engine clients: what the server and the CLI talk to, all behind `EngineClient` (`protocol`).

- `thread`: the native engine's step loop on a thread of this process (`AsyncEngine`).
- `process`: the same step loop in a child process (`ProcessEngine`, what `kiln serve` uses).
- `loop`: that step loop (`StepLoop`), shared by both; `streams`: their caller side (`RequestStreams`).
- `messages`: the typed commands and reports between callers and the loop; `wire`: outputs on a pipe.
- `trtllm`: a TensorRT-LLM 1.2 engine (`TrtLlmEngine`).
- `open`: `open_engine`, the chooser: which of the three an engine directory and the configuration ask for.
"""
