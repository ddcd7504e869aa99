"""``python -m lmlab <command> ...``: the ``lmlab`` command (``lmlab.cli``) without its console script."""

from lmlab.cli import main

if __name__ == "__main__":
    main()
