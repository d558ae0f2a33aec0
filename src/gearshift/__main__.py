"""``python -m gearshift ...``: the CLI without an installed entry point (e.g. ``PYTHONPATH=src`` on a GPU box)."""

import sys

from .cli import main

sys.exit(main())
