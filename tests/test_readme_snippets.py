"""The README's self-contained code blocks run as written (a fresh interpreter's globals)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
#: Sections whose first Python block must run on its own (the others show fragments of a loop).
SELF_CONTAINED = ("## Ten lines: Muon from stages", "### From optax.contrib.muon")


def _first_block_after(heading: str) -> str:
  text = README.read_text()
  start = text.index(heading)
  return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


@pytest.mark.parametrize("heading", SELF_CONTAINED)
def test_block_runs_as_written(heading, capsys):
  namespace = {}
  exec(compile(_first_block_after(heading), f"README.md {heading}", "exec"), namespace)  # noqa: S102
  assert hasattr(namespace["tx"], "update")  # an optax.GradientTransformation
