"""The Newton–Schulz kernels against flash-newton-schulz's Triton kernels, side by side.

Usage: python benchmarks/bench_peers.py --peer .peers/flash-newton-schulz [--shapes ...]
                                        [--configs AOL+4,Frob+5] [--out DIR]

The peer (thib-s/flash-newton-schulz, PyTorch + Triton; Turbo-Muon's kernels) is not part
of this repository and is never committed: put a checkout of it in the git-ignored
``.peers/`` folder and, on the device, carry that folder with the call. In one process, on
the same bf16 inputs (``bench_kernels._ns_input``), it times

* ``ours``: ``ortho_optax.newton_schulz(backend="pallas")``, AOL + 4 ``turbo_aol`` steps or
  Frobenius + 5 quintic steps, as ``bench_kernels.py`` times it (20 calls in one jitted
  loop, output fed back, wall time / 20, median of 5);
* ``peer``: ``newton_schulz_triton_aol`` (AOL + 4, its own genetic coefficient table) or
  ``newton_schulz_triton_dion`` (Frobenius + 5), the same way (20 calls, output fed back,
  ``torch.cuda.synchronize`` around them, median of 5, after warm-up calls that run
  ``torch.compile`` and Triton's autotuning);

and, up to ``--polar-max-dim``, each output's relative Frobenius distance to the exact
polar factor (float64 SVD on the GPU), so that a speed-up is never read without accuracy.
It measures the bf16 matmul peak in the same run (``bench_kernels.ceilings``) for the
one-triangle floor (3m²n + m³ flops per step). Targets (``TARGETS``): ours at least 1.2×
the peer's AOL + 4 at every shape from 4096², at least 1.4× on the GPT-2 stacks, and 8192²
within 85% of the floor. Writes ``bench_peers.json``; prints a table last.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402  (inputs, timing loop, ceilings, shapes)

#: Shapes of the targets: from 4096² and the GPT-2-small stacks.
DEFAULT_SHAPES = "4096x4096,2048x8192,8192x8192,48x768x768,24x768x3072"
#: The peer's function for each config, and ours (``bench_kernels.ns_fn``'s AOL flag).
PEER_FUNCTIONS = {"AOL+4": "newton_schulz_triton_aol", "Frob+5": "newton_schulz_triton_dion"}
STEPS = {"AOL+4": 4, "Frob+5": 5}
#: ``(what, test)`` of each target; ``test(row)`` is None where it does not apply.
GPT2_STACKS = ([48, 768, 768], [24, 768, 3072])
TARGETS = {
    "speedup_from_4096": (
        "AOL + 4 at least 1.2× the peer at every shape from 4096²",
        lambda r: (r["speedup"] >= 1.2 if r["config"] == "AOL+4" and r["shape"][0] == 1
                   and max(r["shape"][1:]) >= 4096 else None)),
    "speedup_gpt2_stacks": (
        "AOL + 4 at least 1.4× the peer on the GPT-2 stacks",
        lambda r: (r["speedup"] >= 1.4 if r["config"] == "AOL+4"
                   and r["shape"] in [list(s) for s in GPT2_STACKS] else None)),
    "floor_8192": (
        "8192² AOL + 4 within 85% of the one-triangle floor",
        lambda r: (r["frac_floor"] >= 0.85 if r["config"] == "AOL+4"
                   and r["shape"] == [1, 8192, 8192] else None)),
}


def load_peer(folder: str):
  """The peer's ``newton_schulz_triton`` module from a checkout in ``folder``.

  Raises:
    SystemExit: when the folder or the module is missing, saying how to get it.
  """
  path = pathlib.Path(folder)
  if not (path / "newton_schulz_triton.py").is_file():
    raise SystemExit(
        f"--peer {folder!r}: no newton_schulz_triton.py there. Put a checkout of "
        "https://github.com/thib-s/flash-newton-schulz in the git-ignored .peers/ folder "
        "(never commit it) and pass --peer .peers/flash-newton-schulz.")
  sys.path.insert(0, str(path.resolve()))
  try:
    return importlib.import_module("newton_schulz_triton")
  except ImportError as ex:
    raise SystemExit(f"--peer {folder!r} needs PyTorch and Triton ({ex}); the GPU machine "
                     "has both.") from ex


def time_torch(fn, x, reps=bk.REPS, trials=5):
  """Median seconds per call of ``fn`` on a CUDA tensor, ``reps`` calls fed back into each
  other between two ``torch.cuda.synchronize`` (as :func:`bench_kernels.time_call`)."""
  import torch

  def run():
    y = x
    for _ in range(reps):
      y = fn(y)
    torch.cuda.synchronize()  # returns None: nothing left for jax.block_until_ready
  for _ in range(2):  # torch.compile and Triton's autotuning run here
    run()
  return bk._median_time(run, trials, reps)  # pylint: disable=protected-access


def polar_distance(out, polar):
  """Relative Frobenius distance of ``out`` to ``polar`` (torch tensors, float64)."""
  import torch
  out = out.to(torch.float64)
  return float(torch.linalg.norm(out - polar) / torch.linalg.norm(polar))


def exact_polar(x):
  """``U·Vᵀ`` of the float64 SVD of a (batch, m, n) CUDA tensor."""
  import torch
  u, _, vh = torch.linalg.svd(x.to(torch.float64), full_matrices=False)
  return u @ vh


def judge(rows):
  """``{target: {"what", "passed", "rows"}}`` over the rows each target applies to
  (``passed`` None where none applies)."""
  out = {}
  for key, (what, test) in TARGETS.items():
    applied = [(r, test(r)) for r in rows if "speedup" in r and "frac_floor" in r]
    applied = [(r, ok) for r, ok in applied if ok is not None]
    out[key] = {"what": what,
                "passed": all(ok for _, ok in applied) if applied else None,
                "rows": [["x".join(map(str, r["shape"])), r["config"], bool(ok)]
                         for r, ok in applied]}
  return out


def parse_configs(text):
  configs = [c for c in text.split(",") if c]
  bad = [c for c in configs if c not in PEER_FUNCTIONS]
  if bad or not configs:
    raise SystemExit(f"--configs: {bad or text!r} not among {sorted(PEER_FUNCTIONS)}")
  return configs


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--peer", default=".peers/flash-newton-schulz",
                  help="checkout of thib-s/flash-newton-schulz (git-ignored, never committed)")
  ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="e.g. 8192x8192,24x768x3072")
  ap.add_argument("--configs", default="AOL+4", help="AOL+4 and/or Frob+5, comma-separated")
  ap.add_argument("--polar-max-dim", type=int, default=4096,
                  help="distance to the exact polar factor for shapes up to this side")
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  args = ap.parse_args(argv)
  # JAX and PyTorch share the GPU: JAX must not take 75% of it when its backend starts.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
  shapes = bk.parse_shapes(args.shapes)
  configs = parse_configs(args.configs)
  peer = load_peer(args.peer)
  import torch
  if not torch.cuda.is_available() or jax.default_backend() != "gpu":
    raise SystemExit("bench_peers.py needs a CUDA GPU for both JAX and PyTorch.")

  peak, bw = bk.ceilings()
  results = dict(device=str(jax.devices()[0]), torch_device=torch.cuda.get_device_name(0),
                 jax=jax.__version__, torch=torch.__version__,
                 date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 command="python benchmarks/bench_peers.py " + " ".join(
                     argv if argv is not None else sys.argv[1:]),
                 peak_tflops=peak / 1e12, copy_tbps=bw / 1e12, rows=[])
  path = pathlib.Path(args.out) / "bench_peers.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  for (b, m, n) in shapes:
    x = bk._ns_input(b, m, n)
    xt = torch.from_numpy(np.asarray(x.astype(np.float32))).to("cuda", torch.bfloat16)
    polar = exact_polar(xt) if max(m, n) <= args.polar_max_dim else None
    for config in configs:
      aol = config == "AOL+4"
      row = dict(shape=[b, m, n], config=config, flops=bk.ns_flops(b, m, n, STEPS[config]))
      ours, theirs = bk.ns_fn("pallas", aol), getattr(peer, PEER_FUNCTIONS[config])
      for name, timed in (("ours", lambda: bk.time_call(ours, x)),
                          ("peer", lambda: time_torch(theirs, xt))):
        try:
          t, ts = timed()
          row[name + "_ms"], row[name + "_trials_ms"] = t * 1e3, [v * 1e3 for v in ts]
        except Exception as ex:  # pylint: disable=broad-except
          row[name + "_error"] = repr(ex)[:2000]
          bk.log(f"{name} {b}x{m}x{n} {config}: ERROR {ex!r}"[:3000])
      if polar is not None:
        try:
          mine = torch.from_numpy(np.asarray(jax.jit(ours)(x).astype(np.float32))).cuda()
          row["ours_polar_dist"] = polar_distance(mine, polar)
          row["peer_polar_dist"] = polar_distance(theirs(xt), polar)
        except Exception as ex:  # pylint: disable=broad-except
          row["polar_error"] = repr(ex)[:2000]
      if "ours_ms" in row and "peer_ms" in row:
        row["speedup"] = row["peer_ms"] / row["ours_ms"]
        row["frac_floor"] = row["flops"] / peak / (row["ours_ms"] * 1e-3)
      results["rows"].append(row)
      results["targets"] = judge(results["rows"])
      path.write_text(json.dumps(results, indent=1))
      bk.log(json.dumps({k: v for k, v in row.items() if not k.endswith("_trials_ms")}))
    del xt, polar
  print(f"\nbf16 peak {peak / 1e12:.0f} TFLOP/s (8192³ jnp.matmul, this run)\n")
  print("| shape | config | ours ms | peer ms | speed-up | % of floor | polar distance: ours "
        "| peer |")
  print("|---|---|---|---|---|---|---|---|")
  fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
  for r in results["rows"]:
    print(f"| {'x'.join(map(str, r['shape']))} | {r['config']} | {fmt(r.get('ours_ms'), '.3f')} "
          f"| {fmt(r.get('peer_ms'), '.3f')} | {fmt(r.get('speedup'), '.2f')} | "
          f"{fmt(r.get('frac_floor') and 100 * r['frac_floor'], '.0f')} | "
          f"{fmt(r.get('ours_polar_dist'), '.4f')} | {fmt(r.get('peer_polar_dist'), '.4f')} |")
  for t in results["targets"].values():
    verdict = {True: "met", False: "NOT met", None: "not measured"}[t["passed"]]
    print(f"- {t['what']}: {verdict}")
  return results


if __name__ == "__main__":
  main()
