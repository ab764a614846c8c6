"""Floor 3, running the model: the transformer written once against an ops interface, the two ops
backends (numpy reference, CUDA), the runner that turns a scheduled batch into flat device inputs,
CUDA graphs for decode steps (cuda_graph) and for steps with a prompt (mixed_graphs), and tensor
parallelism across GPUs (tensor_parallel, workers).

The only floor that imports cupy: the model floor's loaders hand their weights to an ops backend
from here, which puts them on the device.
"""
