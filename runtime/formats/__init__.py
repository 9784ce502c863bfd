"""Weight file formats: safetensors (the three-phase read) and GGUF (container, tensors, tokenizer)."""
