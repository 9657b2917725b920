"""``python -m cloudmon.collector [flags]`` is ``cloudmon collector [flags]``."""

import sys

from cloudmon.cli import main

sys.exit(main(["collector", *sys.argv[1:]]))
