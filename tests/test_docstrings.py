"""Every public function of ``ortho_optax`` and ``ortho_optax.pallas`` has an optax-style
docstring with ``Args:`` (when it takes parameters), ``Returns:`` and ``References:``."""

import functools
import inspect

import pytest

import ortho_optax
import ortho_optax.pallas


def _public_functions(module, prefix):
  """``{qualified name: function}`` for the public functions exported by ``module``."""
  found = {}
  for name, obj in vars(module).items():
    if name.startswith("_") or inspect.isclass(obj) or not callable(obj):
      continue
    # functools wrappers (e.g. ``lru_cache``) are callables, not function objects, and
    # presets are ``functools.partial`` objects of a function.
    target = inspect.unwrap(obj) if hasattr(obj, "__wrapped__") else obj
    target = target.func if isinstance(target, functools.partial) else target
    if inspect.isfunction(target) and getattr(obj, "__module__", "").startswith(prefix):
      found[f"{module.__name__}.{name}"] = obj
  return found


_FUNCTIONS = {
    **_public_functions(ortho_optax, "ortho_optax"),
    **_public_functions(ortho_optax.pallas, "ortho_optax.pallas"),
    **{f"ortho_optax.OPTIMIZERS[{k!r}]": v for k, v in ortho_optax.OPTIMIZERS.items()},
}


def test_collects_the_known_exports():
  names = set(_FUNCTIONS)
  for expected in ("muon", "adamuon", "normuon", "namo", "scale_by_namo", "label_by_path",
                   "aurora_polar", "newton_schulz", "orthogonalize", "resolve_dims"):
    assert f"ortho_optax.{expected}" in names
  assert "ortho_optax.pallas.newton_schulz" in names
  assert "ortho_optax.pallas.is_available" in names


@pytest.mark.parametrize("name", sorted(_FUNCTIONS))
def test_docstring_sections(name):
  fn = _FUNCTIONS[name]
  doc = inspect.getdoc(fn)
  assert doc, f"{name} has no docstring"
  has_params = bool(inspect.signature(fn).parameters)
  missing = [section for section, needed in (("Args:", has_params), ("Returns:", True),
                                             ("References:", True))
             if needed and section not in doc]
  assert not missing, f"{name} docstring lacks {missing}"
