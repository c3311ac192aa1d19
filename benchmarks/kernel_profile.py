"""Per-kernel device time of a call under CUPTI, shared by the benchmark scripts.

Device time here is the sum of the durations of the kernels a call launches, as CUPTI
records them (``jax.experimental.mosaic.gpu.profiler.measure``): host round trips and
launch gaps between kernels do not count.
"""

from __future__ import annotations

import statistics


def profile_kernels(fn, *args, iterations: int = 1):
  """Runs ``fn(*args)`` ``iterations`` times under CUPTI.

  Returns:
    ``(outputs, ms, kernels)``: the outputs of ``fn``, the median over the runs of the
    summed kernel time in milliseconds, and the kernels of the median run aggregated by
    name as ``[name, launches, ms]``, largest first.
  """
  from jax.experimental.mosaic.gpu import profiler  # pylint: disable=import-outside-toplevel
  out, runs = profiler.measure(fn, aggregate=False, iterations=iterations)(*args)
  if iterations == 1:  # a single run comes back as a bare list of (name, ms)
    runs = [runs]
  totals = [sum(t for _, t in run) for run in runs]
  median_run = runs[sorted(range(len(runs)), key=totals.__getitem__)[len(runs) // 2]]
  by_name: dict[str, tuple[int, float]] = {}
  for name, t in median_run:
    n, tt = by_name.get(name, (0, 0.0))
    by_name[name] = (n + 1, tt + t)
  kernels = sorted(([k, n, tt] for k, (n, tt) in by_name.items()), key=lambda r: -r[2])
  return out, statistics.median(totals), kernels
