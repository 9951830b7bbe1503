"""Secret values: loading, storage, redaction and placeholders. Only the gateway imports this."""
