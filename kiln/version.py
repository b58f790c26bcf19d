"""The one place the Kiln version lives (pyproject reads it too)."""

__version__ = "0.1.0"

# Bumped whenever the layout of an engine directory changes in a way older readers cannot load; the
# newest this Kiln reads. 2: native engines with quantized weights (int8/fp8 + scales, `quant_config`).
# 3: native engines with an fp8 KV cache (per-layer k_scale / v_scale tensors, `kv_cache_config`).
ENGINE_FORMAT_VERSION = 3
