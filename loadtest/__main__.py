"""``python -m hytrec.loadtest``: the same command as ``hytrec loadtest``."""

if __name__ == "__main__":  # guarded: the packaging test imports every module, and spawn re-imports this one
    from hytrec.loadtest.commands import main

    main()
