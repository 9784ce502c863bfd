"""The HTTP layer: the quart-trio app and its routes, wire schemas, error mapping, metrics."""
