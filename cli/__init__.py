"""The ``mlxrunner`` command line: ``serve``, ``run`` and the store commands."""
