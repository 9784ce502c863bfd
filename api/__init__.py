"""The HTTP layer (quart-trio app, wire schemas, error mapping) and the command line."""
