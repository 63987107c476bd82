"""meshca agent: keys generated on the node, certificates by CSR, SDS to the local Envoy over a Unix socket."""
