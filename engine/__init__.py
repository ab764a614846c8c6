"""pagedserve's engine: paged KV cache, continuous batching, and the model on numpy or CUDA.

Importing this package imports neither cupy nor torch; cupy loads only when the cuda backend is
chosen.
"""

__all__ = ["LLM", "BeamSearchParams", "SamplingParams", "StructuredOutputsParams"]


def __getattr__(name):
    # Lazy, so `import engine.model.config` stays light for the server and tools.
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    if name in ("BeamSearchParams", "SamplingParams", "StructuredOutputsParams"):
        from engine.core import sampling_params

        return getattr(sampling_params, name)
    raise AttributeError(name)
