import time, jax, jax.numpy as jnp
import ortho_optax as oo
from ortho_optax.pallas import stack as pstack
shapes = [(12, 768, 2304), (12, 768, 768), (24, 768, 3072)]
xs = [jax.random.normal(jax.random.key(i), s, jnp.float32) for i, s in enumerate(shapes)]
def probe(name, f, *args):
  t0 = time.perf_counter(); lo = jax.jit(f).lower(*args); t1 = time.perf_counter()
  c = lo.compile(); t2 = time.perf_counter(); jax.block_until_ready(c(*args)); t3 = time.perf_counter()
  print(f"[probe] {name}: lower {t1-t0:.2f} s, compile {t2-t1:.2f} s, first run {t3-t2:.2f} s", flush=True)
probe("ns_many muon5 kernels", lambda xs: oo.newton_schulz_many(xs, of_transpose=[False, True, False]), xs)
probe("ns_many aol4 kernels", lambda xs: oo.newton_schulz_many(xs, of_transpose=[False, True, False], steps=4, coefficients="turbo_aol", preconditioning="aol"), xs)
probe("ns_many muon5 xla", lambda xs: oo.newton_schulz_many(xs, backend="xla"), xs)
pieces = [jnp.zeros((1, 768, 3072), jnp.bfloat16)] * 24
probe("tma stack 24", lambda ps: pstack.concatenate(ps), pieces)
pieces = [jnp.zeros((1, 768, 2304), jnp.bfloat16)] * 12
probe("tma stack 12", lambda ps: pstack.concatenate(ps), pieces)
