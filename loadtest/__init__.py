"""Load generator for the HyTRec service (python -m loadtest.run)."""
