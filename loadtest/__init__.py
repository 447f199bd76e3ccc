"""Load generator for the HyTRec service (python -m hytrec.loadtest.run)."""
