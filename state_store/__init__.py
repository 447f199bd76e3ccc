"""state_store."""
