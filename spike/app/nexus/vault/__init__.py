"""Nexus's second face: Vault's HTTP API (KV v2, transit, cert auth, seal status) over the same store.

Under SPIKE's route prefixes Nexus answers as SPIKE does; any other path under
``/v1/`` comes here and is answered as Vault answers it (docs/design.md section 7,
docs/vault-clients.md).  The caller's identity is its X.509 SVID, as on every other
route; a Vault token, when sent, must have been issued to that same SPIFFE ID.
"""
