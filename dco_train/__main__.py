"""`python -m dco_train ...` (see cli.py)."""

import sys

from .cli import main

sys.exit(main())
