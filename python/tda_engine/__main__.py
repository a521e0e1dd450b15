"""``python -m tda_engine`` runs the command-line interface (see tda_engine.cli)."""

import sys

from tda_engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
