"""One process of a loopback multi-process job: ``worker.py SCENARIO OUT_DIR``.

Joins the job with :func:`ortho_optax.distributed.initialize_multiprocess` (which reads
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` and selects the
CPU collectives) before anything else touches JAX, runs ``scenarios.<SCENARIO>(OUT_DIR)``
and leaves the job. Started by :func:`launch.run_worker`.
"""

import os
import pathlib
import sys
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

# Bounds how long a process waits for a peer that never comes (the launcher's timeout
# bounds the rest).
INIT_TIMEOUT_S = int(os.environ.get("ORTHO_OPTAX_MP_INIT_TIMEOUT", "30"))


def main(scenario: str, out_dir: str) -> None:
  from ortho_optax import distributed  # pylint: disable=import-outside-toplevel
  distributed.initialize_multiprocess(initialization_timeout=INIT_TIMEOUT_S)
  import jax  # pylint: disable=import-outside-toplevel
  import scenarios  # pylint: disable=import-outside-toplevel
  try:
    getattr(scenarios, scenario)(pathlib.Path(out_dir))
  except BaseException:  # pylint: disable=broad-except
    # No jax.distributed.shutdown(): its barrier would wait for peers that may be stuck
    # in a collective; exiting at once lets the launcher stop them.
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
