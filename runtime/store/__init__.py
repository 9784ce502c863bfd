"""The model store: Ollama's on-disk layout, names, manifests and the importer."""
