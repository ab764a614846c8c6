"""Floor 3, running the model: the transformer written once against an ops interface, the two ops
backends (numpy reference, CUDA), the runner that turns a scheduled batch into flat device inputs,
and CUDA graphs for decode steps.

The only floor that holds device arrays or imports cupy.
"""
