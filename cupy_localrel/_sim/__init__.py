"""CPU execution engine for the package's CUDA kernels (the "sim" backend).

Each CUDA thread is a fiber, blocks run on worker threads; see cudasim.h for the model and
engine.py for the Python side. Use it through `cupy_localrel._loader.load_module(...,
target="sim")`.
"""
from .engine import (ENV_ASAN, ENV_CACHE, ENV_SEED, ENV_STACK_KB, ENV_TSAN, ENV_WORKERS, SimKernel, SimModule,
                     asan_env, available, build, cache_dir, sanitizer_env)

__all__ = ["SimModule", "SimKernel", "build", "available", "cache_dir", "asan_env", "sanitizer_env", "ENV_SEED",
           "ENV_WORKERS", "ENV_STACK_KB", "ENV_ASAN", "ENV_TSAN", "ENV_CACHE"]
