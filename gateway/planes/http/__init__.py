"""The aiohttp data plane: base-URL services and transparent plain HTTP, one pooled session.

Nothing is imported here: `planes.outbound` (shared by both planes) uses `http.hop`, and an
eager import of `http.proxy` from this file would make `outbound` import itself half-built.
"""
