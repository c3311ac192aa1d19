"""Checkpoints of a training run: orbax's ``CheckpointManager`` in ``<out_dir>/checkpoints``.

Each checkpoint is one orbax step directory with two items, written together and
committed atomically (orbax writes into a temporary directory and renames it when every
item is complete):

* ``state``: ``nnx.to_pure_dict(nnx.state((model, optimizer)))``, saved with
  ``StandardSave``. Every process writes the shards it holds (no array is gathered on
  one host), and restoring reads each shard straight into the sharding of a freshly
  built model (``StandardRestore`` of the abstract state), on any mesh.
* ``meta``: JSON with the step, the run's configuration
  (:func:`ortho_optax.models.config.run_record`) and the loss history so far.

A step directory that orbax never finalised (no ``_CHECKPOINT_METADATA`` with a commit
time, or an item missing), as a crash on a file system without atomic renames can leave,
is skipped with a ``RuntimeWarning`` and the previous complete checkpoint is used.
Resuming checks the saved configuration against the current one first and names every
field that differs.

This follows the checkpointing of Flax's NNX examples (``nnx.split`` / ``nnx.state``,
orbax ``StandardSave`` / ``StandardRestore``).
"""

from __future__ import annotations

import json
import pathlib
import warnings
from typing import Callable

import jax
from flax import nnx

from ortho_optax.matrix_view import path_str
from ortho_optax.models import config as config_lib

STATE, META = "state", "meta"


def directory(out_dir) -> pathlib.Path:
  """The checkpoint folder of a run's output folder."""
  return pathlib.Path(out_dir).absolute() / "checkpoints"


def complete_steps(out_dir) -> list[int]:
  """Steps of the complete checkpoints in ``out_dir``, oldest first.

  Orbax's temporary directories are never listed; a step directory without a committed
  ``_CHECKPOINT_METADATA`` or without both items is skipped with a ``RuntimeWarning``.
  """
  d = directory(out_dir)
  if not d.is_dir():
    return []
  steps = []
  for p in d.iterdir():
    if not (p.is_dir() and p.name.isdigit()):
      continue  # orbax's *.orbax-checkpoint-tmp-* folders and anything else
    problem = _problem(p)
    if problem:
      warnings.warn(f"ignoring checkpoint {p}: {problem}.", RuntimeWarning, stacklevel=2)
      continue
    steps.append(int(p.name))
  return sorted(steps)


def _problem(path: pathlib.Path) -> str | None:
  meta = path / "_CHECKPOINT_METADATA"
  try:
    committed = json.loads(meta.read_text()).get("commit_timestamp_nsecs")
  except (OSError, ValueError):
    committed = None
  if not committed:
    return "orbax never committed it (an interrupted or damaged save)"
  missing = [item for item in (STATE, META) if not (path / item).is_dir()]
  if missing:
    return f"item(s) {missing} are missing"
  return None


def read_meta(out_dir, step: int) -> dict:
  """The ``meta`` JSON of checkpoint ``step`` (step, run configuration, loss history)."""
  return json.loads((directory(out_dir) / str(step) / META / "metadata").read_text())


def _entry_paths(tree) -> set[str]:
  """The ``a/b/0`` paths of a nested dict / list tree's leaves."""
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: not isinstance(x, (dict, list, tuple)))[0]
  return {path_str(path) for path, leaf in leaves if leaf is not None}


class Checkpoints:
  """The checkpoints of one run (a thin layer over ``orbax.checkpoint.CheckpointManager``).

  Args:
    out_dir: the run's output folder (checkpoints go to ``out_dir/checkpoints``).
    max_to_keep: how many of the newest checkpoints orbax keeps.
    async_save: write in the background (orbax copies the arrays to host memory before
      :meth:`save` returns, so the training step may donate them right after).
  """

  def __init__(self, out_dir, max_to_keep: int = 3, async_save: bool = False):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    self._ocp = ocp
    self.directory = directory(out_dir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(STATE, META))

  def save(self, step: int, state: nnx.State, meta: dict) -> None:
    """Saves ``state`` (``nnx.state((model, optimizer))``) and the JSON ``meta``."""
    ocp = self._ocp
    self._manager.save(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(nnx.to_pure_dict(state)),
        META: ocp.args.JsonSave(dict(meta, step=step))}))

  def restore(self, step: int, like: nnx.State) -> nnx.State:
    """The state of checkpoint ``step``, in the structure, dtypes and shardings of ``like``.

    Raises:
      ValueError: when the checkpoint holds other entries than ``like`` (another optimizer
        state layout), naming some of them; when the arrays cannot be read (a damaged
        checkpoint).
    """
    ocp = self._ocp
    target = nnx.to_pure_dict(like)
    self._check_layout(step, target)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.StandardRestore(abstract)}))[STATE]
    except Exception as e:  # orbax / tensorstore raise many kinds; report one
      raise ValueError(f"checkpoint {self.directory / str(step)} could not be read "
                       f"({type(e).__name__}: {str(e)[:300]}). Delete that folder to resume "
                       "from the checkpoint before it.") from e
    state = jax.tree.map(lambda x: x, like)  # a copy to fill in
    nnx.replace_by_pure_dict(state, restored)
    return state

  def _check_layout(self, step: int, target) -> None:
    """Raises when checkpoint ``step``'s entries differ from ``target``'s (when its metadata
    can be read at all: a damaged checkpoint is left to :meth:`restore` to report)."""
    reader = self._ocp.StandardCheckpointer()
    try:
      saved = reader.metadata(self.directory / str(step) / STATE)
      saved = getattr(saved, "item_metadata", saved)
      saved = _entry_paths(getattr(saved, "tree", saved))
    except Exception:  # pylint: disable=broad-except
      return
    finally:
      reader.close()
    if not saved:
      return
    wanted = _entry_paths(target)
    if saved == wanted:
      return
    only_saved, only_wanted = sorted(saved - wanted), sorted(wanted - saved)
    raise ValueError(
        f"checkpoint {self.directory / str(step)} holds another state layout than this run's "
        f"model and optimizer: {len(only_saved)} entries only in the checkpoint "
        f"{only_saved[:3]}, {len(only_wanted)} only in this run {only_wanted[:3]}. It was "
        "written by another optimizer configuration or another version of ortho-optax "
        "(oadamw's state layout changed on 2026-12-02); resume it with the code and "
        "configuration that wrote it, or start a new --out.")

  def close(self) -> None:
    """Waits for a background save to finish and releases orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()


def resume_point(out_dir, record: dict, name: Callable[[str], str] = config_lib.field_name
                 ) -> tuple[int, dict]:
  """The newest complete checkpoint of ``out_dir`` that a run of ``record`` may resume.

  Args:
    out_dir: the run's output folder.
    record: :func:`ortho_optax.models.config.run_record` of the run to resume.
    name: how fields are named in messages.

  Returns:
    ``(step, meta)`` of the checkpoint.

  Raises:
    ValueError: when there is no complete checkpoint, or when it was written by another
      configuration (naming every field that differs).
  """
  steps = complete_steps(out_dir)
  if not steps:
    raise ValueError(f"{name('resume')}: there is no checkpoint in {directory(out_dir)} "
                     f"to resume; leave out {name('resume')} to start a new run (with "
                     f"{name('checkpoint_every')} N to write checkpoints).")
  step = steps[-1]
  meta = read_meta(out_dir, step)
  diff = config_lib.differences(meta.get("run", {}), record)
  if diff:
    shown = "; ".join(f"{name(k)} {_short(a)} in the checkpoint, {_short(b)} now"
                      for k, a, b in diff)
    raise ValueError(f"{name('resume')}: the checkpoint at step {step} in "
                     f"{directory(out_dir)} is of another run: {shown}. Resume with the "
                     "checkpoint's settings, or choose another output folder.")
  return step, meta


def _short(value) -> str:
  text = json.dumps(value) if not isinstance(value, str) else value
  return text if len(text) <= 60 else text[:16] + "…"
