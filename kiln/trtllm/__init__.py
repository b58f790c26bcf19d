"""TensorRT-LLM backend: build TensorRT engines (`build`) and serve them behind `EngineClient` (`backend`).

Importing this package never imports `tensorrt_llm`; that happens only when an engine is built or loaded
(see `compat`), so Kiln installs and runs its native backend without it.
"""

from kiln.trtllm.backend import TrtLlmEngine
from kiln.trtllm.build import TrtLlmBuildPlan, build_trtllm_engine, plan_trtllm_build
from kiln.trtllm.compat import is_available

__all__ = ["TrtLlmBuildPlan", "TrtLlmEngine", "build_trtllm_engine", "is_available", "plan_trtllm_build"]
