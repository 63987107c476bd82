"""meshca: mesh CA, JWT identity gate and xDS/SDS server for Envoy."""
