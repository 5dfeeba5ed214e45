"""Checkpoint converters: HF/PyTorch/GGUF LLaMA -> memlong-jax (`from_hf`) and back (`to_hf`)."""
