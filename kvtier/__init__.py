"""kvtier: an LLM serving engine with a hierarchical KV cache."""

from kvtier.sampling_params import SamplingParams
from kvtier.server_args import ServerArgs, ServerArgsError

__all__ = ["Engine", "SamplingParams", "ServerArgs", "ServerArgsError"]
__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: importing the engine loads torch models and kernels
    if name == "Engine":
        from kvtier.engine import Engine

        return Engine
    raise AttributeError(name)
