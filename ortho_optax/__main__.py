"""``python -m ortho_optax ...``: the ``ortho-optax`` command line (train / compare)."""

from ortho_optax.models.cli import run

if __name__ == "__main__":
  run()
