"""``python -m umbrella`` runs the command-line interface (the same as the ``umbrella`` script)."""

import sys

from umbrella.cli import main

sys.exit(main())
