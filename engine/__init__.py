"""pagedserve's engine: paged KV cache, continuous batching, and the model on numpy or CUDA.

Importing this package imports neither cupy nor torch; cupy loads only when the cuda backend is
chosen.
"""

__all__ = ["LLM", "BeamSearchParams", "SamplingParams"]


def __getattr__(name):
    # Lazy, so `import engine.model.config` stays light for the server and tools.
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from engine.core.sampling_params import SamplingParams

        return SamplingParams
    if name == "BeamSearchParams":
        from engine.core.sampling_params import BeamSearchParams

        return BeamSearchParams
    raise AttributeError(name)
