"""``python -m fastinf``: the fastinf command line (see :mod:`fastinf.cli`)."""

import sys

from .cli import main

sys.exit(main())
