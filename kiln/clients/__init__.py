"""Engine clients: what the server and the CLI talk to, all behind `EngineClient` (`protocol`).

- `thread`: the native engine's step loop on a thread of this process (`ThreadEngine`).
- `process`: the same step loop in a child process (`ProcessEngine`, what `kiln serve` uses).
- `trtllm`: a TensorRT-LLM 1.2 engine (`TrtLlmEngine`).
- `open`: `open_engine`, the chooser: which of the three an engine directory and the configuration ask for.
"""
