"""model/tadn."""
