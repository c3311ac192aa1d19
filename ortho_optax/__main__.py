"""``python -m ortho_optax ...``: the ``ortho-optax`` command line (train / compare)."""

import sys

from ortho_optax.models.cli import main

if __name__ == "__main__":
  sys.exit(main())
