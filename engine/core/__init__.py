"""Floor 1, the engine's logic: sequences, sampling parameters, the block manager with its prefix
cache, the continuous-batching scheduler, stop rules and request outputs.

Plain Python (standard library only): no numpy, no cupy. Everything here is tested on any machine
with invariants checked after every operation.
"""
