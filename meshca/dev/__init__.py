"""Dev and demo support: dev material and tokens, Envoy and OpenBao child processes, the demo and its e2e harness."""
