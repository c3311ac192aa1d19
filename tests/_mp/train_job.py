"""One process of a loopback trainer job: ``train_job.py RECORD_DIR RUNS_JSON``.

Runs ``ortho_optax.models.cli.main(argv)`` for each ``argv`` of the JSON list, in order,
in one process of the job (the first ``--multihost`` run joins it). After each run it
writes ``RECORD_DIR/process-<i>.json``: the exit codes so far, how many times the process
wrote the reports, and which rows of which batch it read from the corpus. This goes to
``RECORD_DIR``, never to a run's ``--out``, whose contents the tests check.

``ORTHO_OPTAX_MP_KILL=<run>:<process>:<step>`` kills (``SIGKILL``) that process of that
run (0-based) right after it has started the checkpoint of that step (written in the
background with ``--async-checkpoints``), as a crashed host would.
"""

import hashlib
import json
import os
import pathlib
import signal
import sys

import numpy as np


def main(record_dir: str, runs_json: str) -> None:
  # pylint: disable=import-outside-toplevel
  from ortho_optax.models import checkpoints as ckpt_lib
  from ortho_optax.models import cli
  from ortho_optax.models import data as data_lib
  from ortho_optax.models import train as train_lib

  runs = json.loads(runs_json)
  process = int(os.environ.get("JAX_PROCESS_ID", "0"))
  kill = os.environ.get("ORTHO_OPTAX_MP_KILL")
  kill_run, kill_process, kill_step = map(int, kill.split(":")) if kill else (-1, -1, -1)
  record = {"process": process, "returncodes": [], "reports_written": 0, "rows": {}}
  current = {"run": 0}

  gather = data_lib.Windows.__getitem__

  def recording_gather(self, index):
    rows = index[0] if isinstance(index, tuple) else index
    batch = hashlib.sha256(self.starts.tobytes()).hexdigest()[:16]
    key = f"{current['run']}:{batch}:{len(self)}:{self.offset}"
    record["rows"].setdefault(key, set()).update(np.arange(len(self))[rows].ravel().tolist())
    return gather(self, index)

  write_reports = train_lib.write_reports

  def counting_write_reports(*args, **kwargs):
    record["reports_written"] += 1
    return write_reports(*args, **kwargs)

  save = ckpt_lib.Checkpoints.save

  def save_then_die(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if (current["run"], process, step) == (kill_run, kill_process, kill_step):
      os.kill(os.getpid(), signal.SIGKILL)

  data_lib.Windows.__getitem__ = recording_gather
  train_lib.write_reports = counting_write_reports
  ckpt_lib.Checkpoints.save = save_then_die

  path = pathlib.Path(record_dir) / f"process-{process}.json"
  for i, argv in enumerate(runs):
    current["run"] = i
    record["returncodes"].append(cli.main(argv))
    path.write_text(json.dumps(dict(record, rows={k: sorted(v) for k, v in
                                                   record["rows"].items()})))
    sys.stdout.flush()


if __name__ == "__main__":
  main(*sys.argv[1:])
