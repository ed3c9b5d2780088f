"""``python -m pleas.bench [options]``: the same as ``pleas bench [options]``."""
import sys

from ..cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
