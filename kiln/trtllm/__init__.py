"""The TensorRT-LLM 1.2 route's translations: Kiln's sampling parameters to TensorRT-LLM's (`params`), its
outputs and stats back to Kiln's (`outputs`), and the version gate around `tensorrt_llm` (`compat`).

The build step that uses them is kiln.build.trtllm; the client that serves a TensorRT engine is
kiln.clients.trtllm. Importing this package never imports `tensorrt_llm`; that happens only when an
engine is built or loaded (see `compat`), so Kiln installs and runs its native backend without it.
"""
