"""Cluster mode: a cluster CA, its members' credentials and revocation list
(`credentials`), and the TLS contexts and peer checks built on them (`tls`)."""
