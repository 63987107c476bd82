"""Certificate authority: the CA backends (internal, Vault), their state, crypto and the CSR API."""
