"""The old entry point, ``python -m hytrec.loadtest.run``: now the open-loop ``hytrec loadtest`` (new options).

The closed-loop generator that lived here (each worker waited for its reply, so the queue it should have seen
never formed) is gone; see :mod:`hytrec.loadtest.engine`.
"""

if __name__ == "__main__":
    from hytrec.loadtest.commands import main

    main()
