"""``python -m cloudmon`` is the ``cloudmon`` command."""

import sys

from cloudmon.cli import main

if __name__ == "__main__":
    sys.exit(main())
