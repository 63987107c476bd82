"""What runs beside a proxy: its Envoy bootstrap and the check of it."""
