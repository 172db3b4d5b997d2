"""``python -m fastdense``: the same command as the ``fastdense`` console script."""
import sys

from fastdense.cli import main

if __name__ == "__main__":
    sys.exit(main())
