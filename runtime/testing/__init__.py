"""Public test support (like ``trio.testing``): tiny real models built in-process.

``tokenizers`` trains small BPE tokenizers; ``models`` makes random weights (float or quantized,
in mlx-lm's or Ollama's tensor names) and model folders that load like any checkpoint. Nothing
here downloads anything.
"""
