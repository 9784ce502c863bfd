"""The model store: Ollama's on-disk layout, names, manifests, model sources and the importer."""
