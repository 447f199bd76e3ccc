"""HyTRec command-line entry point (`hytrec`)."""
