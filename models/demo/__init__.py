"""The bundled demo checkpoint (package data): what `hytrec serve` serves when HYTREC_MODEL is not set."""
