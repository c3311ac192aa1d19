"""Every measured figure of README.md, rendered from the committed results files.

README.md marks each generated block::

  <!-- numbers:gpt_step -->
  ...table and caption written by this script...
  <!-- /numbers -->

and this script rewrites the text between the markers from ``benchmarks/results/``, so a
figure can never drift from the run that produced it. Each block names the command, the
machine and the date of its run. ``--check`` changes nothing and exits 1 (printing a
diff) when README.md is not what the results files give; the test suite runs it.

Blocks (:data:`BLOCKS`): ``user_loop`` (``bench_user_loop_h200.json``, a plain user-written
Flax loop per optimizer; says so when the file is not committed yet), ``gpt_step``
(``bench_gpt``: the trainer's step), ``kernels`` (``bench_kernels`` profile: Newton–Schulz
kernels vs XLA, with the Triton peers), ``xla_path`` (``bench_xla_ns``: the XLA path
against optax.contrib's), ``peers`` (``bench_peers``: the kernels against
flash-newton-schulz's Triton kernels in one run), ``tiny_compare`` (validation loss of the tiny GPT),
``quality_gpt`` (validation loss of GPT-2 small on a GPU, ``quality_gpt.py``'s report) and
``distributed`` (collective bytes per step).

  python benchmarks/readme_numbers.py            # rewrite README.md
  python benchmarks/readme_numbers.py --check    # exit 1 if README.md is stale
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import pathlib
import re
import sys
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- numbers:(\w+) -->\n)(.*?)(<!-- /numbers -->)", re.S)


@dataclasses.dataclass(frozen=True)
class Source:
  """A results file and what its own JSON does not say (the command, the machine)."""

  file: str
  command: str | None = None
  machine: str | None = None


def _load(results: pathlib.Path, source: Source):
  path = results / source.file
  return json.loads(path.read_text()) if path.exists() else None


def _caption(source: Source, payload, *, machine: str | None = None,
             date: str | None = None, note: str = "") -> str:
  command = (payload.get("command") if isinstance(payload, dict) else None) or source.command
  where = machine or source.machine or "unknown machine"
  when = f", {date[:10]}" if date else ""
  text = (f"Measured with `{command}` on {where}{when} "
          f"(`benchmarks/results/{source.file}`).")
  return text + (f" {note}" if note else "")


def _table(lines, source: Source, payload, *, date: str, note: str) -> str:
  """A Markdown table and its caption (the source's machine with the run's JAX)."""
  return "\n".join(lines) + "\n\n" + _caption(
      source, payload, machine=f"{source.machine}, JAX {payload['jax']}", date=date,
      note=note) + "\n"


def _date_in(text: str) -> str:
  m = re.search(r"\d{4}-\d{2}-\d{2}", text)
  return f" on {m.group(0)}" if m else ""


def _pct(frac: float) -> str:
  return f"{100 * frac:+.1f}%"


# ---------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------

USER_LOOP = Source("bench_user_loop_h200.json", command="python benchmarks/bench_user_loop.py",
                   machine="one NVIDIA H200")


def user_loop(results: pathlib.Path) -> str:
  """A plain user-written NNX GPT-2 small per optimizer: rows of ``optimizer``,
  ``tokens_per_step``, ``ms_per_step``, ``vs_adamw`` (a fraction), ``compile_s``,
  ``peak_mem_gb`` (a list, or ``{"rows": [...], "machine": ..., "command": ...}``)."""
  payload = _load(results, USER_LOOP)
  if payload is None:
    return (f"Not measured yet: `benchmarks/bench_user_loop.py` writes "
            f"`benchmarks/results/{USER_LOOP.file}`.\n")
  rows = payload["rows"] if isinstance(payload, dict) else payload
  meta = payload if isinstance(payload, dict) else {}
  meta = meta.get("meta", meta)  # bench_user_loop.py writes {"meta": ..., "rows": ...}
  machine = meta.get("device") or (meta.get("machine") or {}).get("device")
  num = lambda v, fmt: "–" if v is None else format(v, fmt)
  lines = ["| optimizer | tokens / step | ms / step | vs optax.adamw | first step (compile) s "
           "| peak memory GB |", "|---|---|---|---|---|---|"]
  for r in rows:
    rel = ("–" if r["optimizer"] in ("adamw", "optax.adamw") or r["vs_adamw"] is None
           else _pct(r["vs_adamw"]))
    lines.append(f"| `{r['optimizer']}` | {r['tokens_per_step']:,} | "
                 f"{num(r['ms_per_step'], '.1f')} | {rel} | {num(r['compile_s'], '.1f')} | "
                 f"{num(r['peak_mem_gb'], '.1f')} |")
  date = meta.get("date") or (meta.get("machine") or {}).get("date")
  return "\n".join(lines) + "\n\n" + _caption(
      USER_LOOP, meta, machine=f"one {machine}" if machine else None, date=date,
      note="Every optimizer at its defaults in one process, compiled first, then timed in "
           "interleaved rounds.") + "\n"


GPT_STEP = Source(
    "bench_gpt_h200_run6_interleaved.json",
    command="python3 benchmarks/bench_gpt.py --drivers split --opts adamw muon turbo_muon "
            "--rounds 4 --profile --all-kernels --out $OUT")


def gpt_step(results: pathlib.Path) -> str:
  """The trainer's step on GPT-2 small (``bench_gpt.py``)."""
  payload = _load(results, GPT_STEP)
  rows = payload["results"]
  base = {r["tokens_per_step"]: r["median_ms"] for r in rows if r["optimizer"] == "adamw"}
  lines = ["| optimizer | tokens / step | ms / step | MFU | vs AdamW |", "|---|---|---|---|---|"]
  for r in rows:
    b = base.get(r["tokens_per_step"])
    rel = "–" if r["optimizer"] == "adamw" or not b else _pct(r["median_ms"] / b - 1)
    lines.append(f"| `{r['optimizer']}` | {r['tokens_per_step']:,} | {r['median_ms']:.1f} | "
                 f"{100 * r['mfu']:.1f}% | {rel} |")
  m = payload["machine"]
  return "\n".join(lines) + "\n\n" + _caption(
      GPT_STEP, payload, machine=f"one {m['device']}, JAX {m['jax']}", date=m["date"],
      note="GPT-2 small (`--preset small`: bf16 compute, cuDNN attention, untied 50304-token "
           "head); all steps compiled first, then timed in interleaved rounds; median step. "
           "MFU counts 6·N + 12·L·d·T flops per token against 989 TFLOP/s.") + "\n"


KERNELS = Source("bench_kernels_h200_profile_run7.json",
                 command="python benchmarks/bench_kernels.py --profile --skip-check --out $OUT",
                 machine="one NVIDIA H200")
PEERS = Source("peers_anchors.json", machine="one NVIDIA H100 80GB SXM")
#: The Triton peer of each configuration in peers_anchors.json.
PEER_COLUMN = {"AOL+4": "triton_turbo_aol4", "Frob+5": "triton_dion_style_5"}
CONFIG_NAMES = {"AOL+4": "AOL + 4", "Frob+5": "Frobenius + 5"}


def _shape(shape) -> str:
  b, m, n = shape
  core = f"{m}²" if m == n else f"{m}×{n}"
  return core if b == 1 else f"{b}×{core}"


def kernels(results: pathlib.Path) -> str:
  """Newton–Schulz: the Pallas kernels, the XLA path and the Triton peers."""
  payload = _load(results, KERNELS)
  peers = _load(results, PEERS) or {"rows": []}
  peer_ms = {tuple(r["shape"]): r["ms"] for r in peers["rows"]}
  has_optax = any("optax_contrib_ms" in r for r in payload["profile"])
  head = "| shape | config | kernels ms | XLA ms | speed-up | % of floor |"
  rule = "|---|---|---|---|---|---|"
  if has_optax:
    head += " optax.contrib XLA ms |"
    rule += "---|"
  head += " Triton peer ms (H100) |"
  rule += "---|"
  lines = [head, rule]
  for r in payload["profile"]:
    peer = peer_ms.get(tuple(r["shape"]), {}).get(PEER_COLUMN.get(r["config"], ""))
    row = (f"| {_shape(r['shape'])} | {CONFIG_NAMES.get(r['config'], r['config'])} | "
           f"{r['pallas_ms']:.3f} | {r['xla_ms']:.3f} | {r['speedup']:.2f}× | "
           f"{100 * r['frac_floor']:.0f} |")
    if has_optax:
      row += f" {r['optax_contrib_ms']:.3f} |" if r.get("optax_contrib_ms") else " – |"
    row += f" {peer:.2f} |" if peer else " – |"
    lines.append(row)
  note = (f"Device time (CUPTI, sum of one call's kernels, median of 7), bf16. XLA = "
          f"`newton_schulz(backend=\"xla\")`, the same algorithm. Floor = one-triangle flops "
          f"(3m²n + m³ per step) at the bf16 matmul peak measured in the same run "
          f"({payload['peak_tflops']:.0f} TFLOP/s). Triton peer: flash-newton-schulz's "
          f"Turbo-Muon kernel (AOL + 4) and its Dion-style 5-step kernel (Frobenius + 5), "
          f"measured on {PEERS.machine}{_date_in(peers.get('source', ''))} "
          f"(`benchmarks/results/{PEERS.file}`): another card, compare loosely.")
  return _table(lines, KERNELS, payload, date=payload["time"], note=note)


XLA_PATH = Source("bench_xla_ns_h200.json", machine="one NVIDIA H200")


def xla_path(results: pathlib.Path) -> str:
  """The XLA Newton–Schulz path against optax.contrib's, side by side (bench_xla_ns.py)."""
  payload = _load(results, XLA_PATH)
  lines = ["| shape | config | optax.contrib ms | ortho-optax XLA ms | ortho-optax / optax | "
           "distance to f32: optax.contrib | ortho-optax |", "|---|---|---|---|---|---|---|"]
  for r in payload["rows"]:
    lines.append(
        f"| {_shape(r['shape'])} | {CONFIG_NAMES.get(r['config'], r['config'])} | "
        f"{r['optax_ms']:.3f} | {r['ours_ms']:.3f} | {r['ours_ms'] / r['optax_ms']:.2f} | "
        f"{r['optax_err']:.4f} | {r['ours_err']:.4f} |")
  note = ("Wall ms per call (20 calls in one jitted loop, median of 5), bf16, both in one "
          "process; optax.contrib = `optax.contrib._muon.orthogonalize_via_newton_schulz` "
          "vmapped over the stack (as `optax.contrib.muon` runs it) with the same "
          "coefficients; distance = relative Frobenius distance to the same iteration in "
          "float32 at HIGHEST precision.")
  commands = " and ".join(f"`{c['command']}` ({c['note']})" for c in payload["commands"])
  return ("\n".join(lines) + "\n\n"
          + f"Measured with {commands} on {XLA_PATH.machine}, JAX {payload['jax']}, "
            f"{payload['date']} (`benchmarks/results/{XLA_PATH.file}`). {note}\n")


PEERS_SIDE_BY_SIDE = Source("bench_peers_h200.json", machine="one NVIDIA H200")


def peers(results: pathlib.Path) -> str:
  """The kernels against flash-newton-schulz's Triton kernels in one run (bench_peers.py)."""
  payload = _load(results, PEERS_SIDE_BY_SIDE)
  fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
  lines = ["| shape | config | ortho-optax kernels ms | flash-newton-schulz ms | speed-up | "
           "% of floor | distance to polar: ortho-optax | flash-newton-schulz |",
           "|---|---|---|---|---|---|---|---|"]
  for r in payload["rows"]:
    lines.append(
        f"| {_shape(r['shape'])} | {CONFIG_NAMES.get(r['config'], r['config'])} | "
        f"{fmt(r.get('ours_ms'), '.3f')} | {fmt(r.get('peer_ms'), '.3f')} | "
        f"{fmt(r.get('speedup'), '.2f')}× | "
        f"{fmt(r.get('frac_floor') and 100 * r['frac_floor'], '.0f')} | "
        f"{fmt(r.get('ours_polar_dist'), '.4f')} | {fmt(r.get('peer_polar_dist'), '.4f')} |")
  verdicts = "; ".join(
      f"{t['what']}: {'met' if t['passed'] else 'not met'}" for t in payload["targets"].values())
  note = (f"Wall ms per call (20 calls, output fed back, median of 5), bf16, both in one "
          f"process on the same inputs: PyTorch {payload['torch']} for the peer's "
          f"`newton_schulz_triton_aol` (its own AOL + 4 coefficients), ours with Turbo-Muon's. "
          f"Floor = one-triangle flops at the bf16 peak measured in the same run "
          f"({payload['peak_tflops']:.0f} TFLOP/s); distance = relative Frobenius distance to "
          f"the exact polar factor (float64 SVD), up to 4096. Targets: {verdicts}.")
  return _table(lines, PEERS_SIDE_BY_SIDE, payload, date=payload["date"], note=note)


TINY = Source("tiny_compare_equal_time.json")


def tiny_compare(results: pathlib.Path) -> str:
  """Validation loss of the tiny GPT per optimizer at its best lr (CPU)."""
  payload = _load(results, TINY)
  rows = sorted(payload["rows"], key=lambda r: r["val_loss_equal_steps"])
  best = rows[0]["optimizer"]
  lines = ["| optimizer | best lr | val loss at 300 steps | val loss at equal wall-clock "
           "(steps) |", "|---|---|---|---|"]
  for r in rows:
    lines.append(f"| `{r['optimizer']}` | {r['lr']:.3g} | {r['val_loss_equal_steps']:.3f} | "
                 f"{r['val_loss']:.3f} ({r['steps']}) |")
  m = payload["machine"]
  return "\n".join(lines) + "\n\n" + _caption(
      TINY, payload, machine=f"{m['cpu_count']} CPU cores, JAX {m['jax']}", date=m["date"],
      note=f"`tiny` preset (2 layers × 128, byte vocabulary), {payload['reference_steps']} "
           "steps × 32×64 tokens, warm-up then cosine, one seed; validation loss in "
           f"nats/byte on the held-out 10% of the embedded corpus. Equal wall-clock: each "
           f"optimizer trained for as many steps as fit in {payload['reference']}'s "
           f"{payload['budget_s']:.1f} s. Best at 300 steps: `{best}`; the lr sweeps are in "
           "`benchmarks/results/tiny_compare.md`.") + "\n"


QUALITY = Source("quality_gpt/quality_gpt.json")


def quality_gpt(results: pathlib.Path) -> str:
  """GPT-2 small on one GPU: validation loss per step and per second (quality_gpt.py)."""
  payload = _load(results, QUALITY)
  summary = payload["summary"]
  full = [r for r in payload["runs"] if r.startswith("full/")]
  run = json.loads((results / "quality_gpt" / full[0]).read_text())
  # The full runs took several device calls; calls.json keeps each call's command.
  calls = json.loads((results / "quality_gpt" / "calls.json").read_text())["calls"]
  commands = [c["command"] for c in calls if c["block"] == "full" and c["command"]]
  command = "` and `".join(commands)
  ref = summary["reference"]
  lines = [f"| optimizer | lr | seeds | val loss | seed spread | lowest val (step) | steps "
           f"to {ref}'s final ({summary['target']:.3f}) | seconds to it | ms / step |",
           "|---|---|---|---|---|---|---|---|---|"]
  reached = lambda v, ratio, fmt: (  # noqa: E731
      "not reached" if v is None else f"{v:{fmt}} ({ratio:.2f}×)")
  for name, r in sorted(summary["rows"].items(), key=lambda kv: kv[1]["final_val_loss"]):
    spread = f"{r['seed_spread']:.3f}" if len(r["seeds"]) > 1 else "-"
    lines.append(
        f"| `{name}` | {r['lr']:g} | {len(r['seeds'])} | {r['final_val_loss']:.3f} | "
        f"{spread} | {r['lowest_val_loss']:.3f} ({r['lowest_val_step']:.0f}) | "
        f"{reached(r['steps_to_reference'], r['step_ratio'], '.0f')} | "
        f"{reached(r['seconds_to_reference'], r['time_ratio'], '.1f')} | {r['step_ms']:.1f} |")
  goals = summary["goals"]
  verdict = lambda g: "met" if g["passed"] else "NOT met"
  m = run["machine"]
  return "\n".join(lines) + "\n\n" + _caption(
      dataclasses.replace(QUALITY, command=command), None,
      machine=f"one {m['device']}, JAX {m['jax']}", date=m["date"],
      note=f"`small` preset (12 × 768, byte vocabulary), {run['config']['steps']} steps × "
           f"{run['config']['batch_size']} × 1024 tokens of the standard-library corpus "
           "(`--data stdlib`), warm-up then cosine, each optimizer at the best lr of a "
           "250-step sweep (`--block sweep`); validation in nats/byte on held-out files. "
           f"Goals: muon at {ref}'s final loss within 0.7 of its steps "
           f"({verdict(goals['muon_step_ratio'])}), turbo_muon within 0.01 nats of muon "
           f"({verdict(goals['turbo_gap'])}), the same order at equal wall-clock "
           f"({verdict(goals['equal_time_order'])}). Report, plots and the sweep: "
           "`benchmarks/results/quality_gpt/quality_gpt.md`; every device call's command: "
           "`benchmarks/results/quality_gpt/calls.json`.") + "\n"


DISTRIBUTED = Source("distributed_bytes.json")


def distributed(results: pathlib.Path) -> str:
  """Collective bytes per optimizer step and device (compiled HLO, fake CPU devices)."""
  payload = _load(results, DISTRIBUTED)
  by = {(r["optimizer"], r["mesh"]["data"], r["mesh"]["fsdp"], r["strategy"]): r
        for r in payload["rows"]}
  meshes = sorted({(d, f) for _, d, f, _ in by}, key=lambda m: -m[0])
  lines = ["| optimizer | mesh (data × fsdp) | gather_whole | gather_whole, bf16 | auto |",
           "|---|---|---|---|---|"]
  mb = lambda r: f"{r['bytes_per_device'] / 2**20:.0f} MB"
  for opt in ("muon", "aurora"):
    for d, f in meshes:
      cells = [by.get((opt, d, f, s)) for s in ("gather_whole", "gather_whole_bf16", "auto")]
      if not all(cells):
        continue
      auto = mb(cells[2])
      if cells[2]["bytes_per_device"] == 0:
        ratio = cells[2]["gflop_per_device"] / cells[0]["gflop_per_device"]
        auto = f"0 MB, but each device does {ratio:.1f}× the flops"
      lines.append(f"| `{opt}` | {d}×{f} | {mb(cells[0])} | {mb(cells[1])} | {auto} |")
  m = payload["machine"]
  return "\n".join(lines) + "\n\n" + _caption(
      DISTRIBUTED, payload, machine=f"{m['num_devices']} fake CPU devices, JAX {m['jax']}",
      date=payload["date"],
      note="Per optimizer step and device, GPT-2-small parameter tree (f32), read from the "
           "compiled HLO's collectives (loops counted per iteration); AdamW moves nothing in "
           "its optimizer step. Full table: `benchmarks/results/distributed_bytes.md`.") + "\n"


BLOCKS: dict[str, Callable[[pathlib.Path], str]] = {
    "user_loop": user_loop, "gpt_step": gpt_step, "kernels": kernels,
    "tiny_compare": tiny_compare, "distributed": distributed, "quality_gpt": quality_gpt,
    "xla_path": xla_path, "peers": peers}


def render(text: str, results: pathlib.Path = RESULTS) -> str:
  """``text`` with every marked block regenerated.

  Raises:
    ValueError: for a block name this script does not know.
  """
  def one(m):
    name = m.group(2)
    if name not in BLOCKS:
      raise ValueError(f"README block <!-- numbers:{name} --> is unknown; known: "
                       f"{sorted(BLOCKS)}.")
    return m.group(1) + BLOCKS[name](results) + m.group(4)
  return BLOCK.sub(one, text)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--readme", default=str(ROOT / "README.md"))
  p.add_argument("--results", default=str(RESULTS))
  p.add_argument("--check", action="store_true",
                 help="change nothing; exit 1 with a diff if the README is stale")
  args = p.parse_args(argv)
  path = pathlib.Path(args.readme)
  old = path.read_text()
  new = render(old, pathlib.Path(args.results))
  if args.check:
    if new != old:
      sys.stdout.writelines(difflib.unified_diff(
          old.splitlines(True), new.splitlines(True), str(path), "regenerated"))
      print(f"\n{path} is stale: run python benchmarks/readme_numbers.py", file=sys.stderr)
      return 1
    return 0
  if new != old:
    path.write_text(new)
  return 0


if __name__ == "__main__":
  sys.exit(main())
