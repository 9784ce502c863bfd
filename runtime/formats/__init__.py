"""Model file formats: a model folder's files besides its tensors (``model_files``), safetensors
(the three-phase read) and GGUF (container, tensors, tokenizer)."""
