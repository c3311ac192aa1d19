"""What a training run reports: the header, the results table, the loss plot, results.json.

A run's result is the dict :func:`ortho_optax.models.train.train` returns; its
``timings`` are what was measured: ``compile_s`` (tracing and compiling the step),
``train_s`` (wall time of the training steps alone, evaluation and checkpoints
excluded), ``eval_s``, ``checkpoint_s``, and the derived ``step_s`` (train_s / steps) and
``tokens_per_s``, all of this process; ``total_train_s`` and ``total_steps_timed`` add those
of the processes a resumed run continues (as its checkpoint recorded them; the table's
``train s`` is ``total_train_s``). :func:`write_reports` writes ``results.json``, ``results.md`` and
``loss.png`` into an output folder.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import platform
from typing import Sequence

import jax
import numpy as np
import optax


def machine_info() -> dict:
  """The device, software versions and date of this process."""
  dev = jax.devices()[0]
  return {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
          "num_devices": jax.device_count(), "cpu_count": os.cpu_count(),
          "platform": platform.platform(), "python": platform.python_version(),
          "jax": jax.__version__, "optax": optax.__version__,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def header(command: str, cfgs: Sequence, dataset, out_dir) -> str:
  """The lines printed before training: model, data, device, steps, optimizers, output.

  Args:
    command: ``train`` or ``compare``.
    cfgs: the runs' :class:`~ortho_optax.models.config.TrainConfig` (one per run).
    dataset: their (shared) dataset.
    out_dir: where the results go (``None``: nowhere).
  """
  from ortho_optax.models import config as config_lib  # pylint: disable=import-outside-toplevel
  c = cfgs[0]
  m = c.model_config()
  d = dataset.describe()
  dev = jax.devices()[0]
  mesh = ("" if c.mesh_data is None and c.mesh_fsdp is None else
          f", mesh data={c.mesh_data or '-'} fsdp={c.mesh_fsdp or '-'}")
  unused = ("" if mesh or jax.device_count() == 1 else
            f", of {jax.device_count()} visible (a mesh flag uses them all)")
  runs = ", ".join(f"{x.optimizer} lr={x.peak_lr():g}" for x in cfgs)
  lines = [
      f"ortho-optax {command}",
      f"  model      {c.preset}: {m.num_layers} layers x {m.model_dim}, {m.num_heads} heads, "
      f"vocab {m.vocab_size}, {m.dtype.name} compute",
      f"  data       {d['name']}: {d['train_tokens']:,} train / {d['val_tokens']:,} "
      f"validation tokens, sha256 {d['sha256'][:16]}",
      f"  device     {jax.device_count() if mesh else 1} x "
      f"{getattr(dev, 'device_kind', str(dev))} ({jax.default_backend()}){mesh}{unused}",
      f"  steps      {c.steps} x {c.batch_size} x {m.seq_len} tokens, warm-up "
      f"{config_lib.warmup_steps_of(c)}, {c.schedule} schedule, seed {c.seed}",
      f"  optimizers {runs}",
      f"  output     {out_dir if out_dir else '(none)'}",
  ]
  return "\n".join(lines)


def sort_key(r: dict) -> float:
  """Sorts results by final validation loss (diverged and unfinished runs last)."""
  v = r["final_val_loss"]
  return v if v is not None and math.isfinite(v) else float("inf")


def _cell(value, fmt: str) -> str:
  return "-" if value is None else format(value, fmt)


def markdown_table(runs: Sequence[dict], best: dict | None = None) -> str:
  """The results table: losses, then what was measured (training time without evaluation
  and compilation, time per step, compilation time, throughput)."""
  lines = ["| optimizer | lr | val loss | train loss (last 10%) | steps | train s | ms / step "
           "| compile s | tokens / s |",
           "|---|---|---|---|---|---|---|---|---|"]
  best_ids = {id(r) for r in (best or {}).values()}
  rows = sorted(runs, key=lambda r: (sort_key(r), r["config"]["optimizer"]))
  for r in rows:
    c, t = r["config"], r["timings"]
    val = r["final_val_loss"]
    val_s = _cell(val, ".4f")
    if r.get("diverged_at") is not None:
      val_s = f"diverged at step {r['diverged_at']}"
    if id(r) in best_ids and len(runs) > len(best or {}):
      val_s = f"**{val_s}**"
    step_s = t.get("step_s", t.get("median_step_s"))
    lines.append(
        f"| {c['optimizer']} | {c['lr']:g} | {val_s} | {_cell(r['final_train_loss'], '.4f')} | "
        f"{r['completed_steps']} | {_cell(t.get('total_train_s', t.get('train_s')), '.1f')} | "
        f"{_cell(None if step_s is None else 1e3 * step_s, '.1f')} | "
        f"{_cell(t.get('compile_s'), '.1f')} | {_cell(t.get('tokens_per_s'), ',.0f')} |")
  return "\n".join(lines) + "\n"


def _smooth(losses: np.ndarray, steps: np.ndarray, points: int = 50):
  k = max(1, len(losses) // points)
  return steps[k - 1:], np.convolve(losses, np.ones(k) / k, mode="valid")


def plot_losses(runs: Sequence[dict], path, title: str = "") -> None:
  """Loss curves to a PNG: the whole smoothed train loss; the second half of training,
  smoothed more and zoomed onto the best 70% of the runs (where optimizers differ by a few
  hundredths; the others leave the panel at the top); and validation."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (full, tail, val) = plt.subplots(1, 3, figsize=(16, 4.5))
  levels, lows, highs = [], [], []
  for i, r in enumerate(runs):
    c = r["config"]
    style = {"label": f"{c['optimizer']} lr={c['lr']:g}", "color": f"C{i % 10}",
             "linestyle": ("-", "--", ":", "-.")[(i // 10) % 4]}
    if r["train_loss"]:
      s, l = np.asarray(r["train_loss"], dtype=float).T
      full.plot(*_smooth(l, s), **style)
      half = s >= c["steps"] / 2
      if half.sum() > 1 and np.isfinite(l[half]).all():
        ts, tl = _smooth(l[half], s[half], points=12)
        tail.plot(ts, tl, **style)
        levels.append(float(np.mean(tl)))
        lows.append(float(np.min(tl)))
        highs.append(float(np.max(tl)))
    if r["val_loss"]:
      s, l = np.asarray(r["val_loss"], dtype=float).T
      val.plot(s, l, marker="o", ms=3, **style)
  full.set(xlabel="step", ylabel="train loss (nats/token)", title="train loss (smoothed)")
  tail.set(xlabel="step", ylabel="train loss (nats/token)",
           title="second half of training, zoomed")
  if levels:
    order = np.argsort(levels)
    n = len(levels)
    keep = order[:n if n <= 3 else int(round(0.7 * n))]
    lo, hi = min(lows[i] for i in keep), max(highs[i] for i in keep)
    if hi > lo:
      pad = 0.05 * (hi - lo)
      tail.set_ylim(lo - pad, hi + pad)
  val.set(xlabel="step", ylabel="validation loss (nats/token)", title="validation")
  for ax in (full, tail, val):
    ax.grid(alpha=0.3)
  handles, labels = full.get_legend_handles_labels()
  if handles:
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
  if title:
    fig.suptitle(title)
  fig.tight_layout(rect=(0, 0, 0.86 if handles else 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def jsonable(x):
  """``x`` with NumPy scalars as Python numbers and non-finite floats as ``None``."""
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, (np.floating, np.integer)):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def write_reports(out_dir, runs: Sequence[dict], title: str, best: dict | None = None) -> None:
  """Writes ``results.json``, ``loss.png`` and ``results.md`` into ``out_dir``.

  ``best`` (a sweep's best run per optimizer) becomes ``results.json``'s ``"best"``:
  ``{optimizer: {"lr", "final_val_loss"}}``; a single run (``None``) has no such key.
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  payload = {"title": title, "runs": list(runs)}
  if best is not None:
    payload["best"] = {k: {"lr": v["config"]["lr"], "final_val_loss": v["final_val_loss"]}
                       for k, v in best.items()}
  (out / "results.json").write_text(json.dumps(jsonable(payload), indent=1))
  plot_losses(runs, out / "loss.png", title)
  r0 = runs[0]
  c, m = r0["config"], r0["machine"]
  head = (f"# {title}\n\npreset `{c['preset']}`, data `{r0['data']['name']}` "
          f"(sha256 `{r0['data']['sha256'][:16]}…`), {c['steps']} steps × "
          f"{c['batch_size']}×{c['model_config']['seq_len']} tokens, {c['schedule']} schedule, "
          f"seed {c['seed']}; machine: {m['device']} ({m['backend']}), {m['date']}. "
          "train s: wall time of the training steps (evaluation, checkpoints and "
          "compilation excluded; a resumed run's counts every process's steps); compile s: "
          "tracing and compiling the step.\n\n")
  (out / "results.md").write_text(head + markdown_table(runs, best))
