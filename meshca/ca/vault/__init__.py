"""Vault/OpenBao as the root of trust: the session, the two CA modes, setup."""
