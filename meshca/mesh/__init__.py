"""The mesh model (services, callers, routes), its source, and the Envoy resources derived from it."""
