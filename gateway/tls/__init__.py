"""TLS for the gateway: its persisted CA and the trust bundles agents get."""
