"""kvferry's inference engine: models, paged per-head KV cache, scheduler, sampler, offline API."""

from engine.compression import CompressionParams
from engine.config import EngineConfig
from engine.errors import (
    InvalidArgumentError,
    KvferryError,
    ModelLoadError,
    ResourceExhaustedError,
    UnsupportedModelError,
)
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "CompressionParams",
    "EngineConfig",
    "InvalidArgumentError",
    "KvferryError",
    "LLMEngine",
    "ModelLoadError",
    "RequestOutput",
    "ResourceExhaustedError",
    "SamplingParams",
    "UnsupportedModelError",
]
