"""The audit log (DESIGN §5): one redacted JSON line per request or refused connection."""
