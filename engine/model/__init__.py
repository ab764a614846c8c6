"""Floor 2, what a model is: its config, its weights as loaded from safetensors or GGUF (or made
up for benchmarks), and its tokenizer with the chat template.

No device code here: the loaders take the backend (an ops object) and put the weights on it.
"""
