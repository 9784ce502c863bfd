"""Public test support (like ``trio.testing``): tiny real models built in-process.

``tokenizers`` trains small BPE tokenizers; ``models`` writes random-weight model folders that
load like any checkpoint. Nothing here downloads anything.
"""
