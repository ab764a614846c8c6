"""Floor 2, what a model is: its config, its weights as loaded from safetensors or GGUF (or made
up for benchmarks), and its tokenizer with the chat template.

Host-side only (numpy); nothing here knows which device will run the model.
"""
