"""What comes from disk: converted checkpoints, HF/GGUF tensor readers, tokenizers, documents."""
