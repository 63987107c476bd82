"""The admin side of a running meshca: Prometheus collectors and the HTTP endpoint serving them and /status."""
