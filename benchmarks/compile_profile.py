"""What the Hopper kernels cost to compile, kernel by kernel (H200 diagnostic).

Usage: python benchmarks/compile_profile.py [--out DIR]

Each case runs in a process of its own (the kernels' builders and compiled Mosaic GPU
modules are cached per process), lowered and compiled apart without the persistent cache,
then timed (median of 20 calls, wall clock):

* ``ns_many steps=S``: the grouped Newton–Schulz kernels on the user loop's three stacks
  (12×768×2304, 12×768², 24×768×3072; ``muon`` coefficients). The compile time must not
  grow with ``S``: the coefficients are run-time operands, so the ``3·S`` launches share
  three compiled kernels (one per GEMM kind).
* ``stack N×R×C``: :func:`ortho_optax.pallas.stack.concatenate` of ``N`` bf16 pieces, in
  launches of at most ``CHUNK_PIECES`` pieces, against XLA's ``jnp.concatenate``.

Writes ``compile_profile.json`` (one row per case) and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ortho_optax.coefficients import resolve_coefficients

USER_LOOP_STACKS = ((12, 768, 2304), (12, 768, 768), (24, 768, 3072))
STACKS = ((24, (768, 3072)), (48, (768, 768)), (12, (768, 2304)))


def measure(case: str, fn, *args) -> dict:
  """Lower and compile seconds of a jit of ``fn``, its Mosaic GPU launches and its median
  wall ms per call."""
  jitted = jax.jit(fn)
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  launches = len(re.findall(r'custom_call_target="mosaic_gpu', compiled.as_text()))
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(20):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t)
  return {"case": case, "lower_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3),
          "mosaic_launches": launches, "ms": round(1e3 * float(np.median(times)), 4)}


def cases() -> list[str]:
  """Every case's name, the longer NS first."""
  names = [f"ns_many steps={s}" for s in (5, 1)]
  for count, (rows, cols) in STACKS:
    names += [f"stack {count}x{rows}x{cols}", f"xla concatenate {count}x{rows}x{cols}"]
  return names


def run_case(name: str) -> dict:
  """Builds the inputs of case ``name`` and measures it."""
  from ortho_optax.pallas import ns, stack  # pylint: disable=import-outside-toplevel
  key = jax.random.key(0)
  if name.startswith("ns_many"):
    steps = int(name.rpartition("=")[2])
    xs = [(jax.random.normal(jax.random.fold_in(key, i), s, jnp.float32) / 100)
          .astype(jnp.bfloat16) for i, s in enumerate(USER_LOOP_STACKS)]
    table = resolve_coefficients("muon", steps)
    return measure(name, lambda v: ns.newton_schulz_many(v, table), xs)
  count, rows, cols = map(int, name.rpartition(" ")[2].split("x"))
  pieces = [jax.random.normal(jax.random.fold_in(key, 100 + i), (rows, cols), jnp.bfloat16)
            for i in range(count)]
  if name.startswith("stack"):
    return {**measure(name, stack.concatenate, pieces), "chunk_pieces": stack.CHUNK_PIECES}
  return measure(name, lambda v: jnp.concatenate(v, 0), pieces)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=".", help="folder of compile_profile.json")
  p.add_argument("--case", default=None, choices=cases(),
                 help="run one case here and print its row (default: every case, each in "
                      "a process of its own)")
  args = p.parse_args(argv)
  from ortho_optax import pallas  # pylint: disable=import-outside-toplevel
  if not pallas.is_available():
    print("compile_profile.py needs a Hopper GPU with Mosaic GPU Pallas.")
    return 1
  if args.case is not None:
    print(json.dumps(run_case(args.case)), flush=True)
    return 0
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  rows = []
  for name in cases():
    done = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True,
                          text=True, check=False)
    lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
    row = json.loads(lines[-1]) if done.returncode == 0 and lines else {
        "case": name, "error": done.stderr.strip().splitlines()[-1:]}
    rows.append(row)
    print(json.dumps(row), flush=True)
    (out / "compile_profile.json").write_text(json.dumps(
        {"machine": {"device": jax.devices()[0].device_kind, "jax": jax.__version__},
         "rows": rows}, indent=1))
  print("\n| case | lower s | compile s | Mosaic launches | ms / call |\n|---|---|---|---|---|")
  for r in rows:
    if "error" in r:
      print(f"| {r['case']} | error: {r['error']} | | | |")
    else:
      print(f"| {r['case']} | {r['lower_s']:.2f} | {r['compile_s']:.2f} | "
            f"{r['mosaic_launches']} | {r['ms']:.3f} |")
  return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
