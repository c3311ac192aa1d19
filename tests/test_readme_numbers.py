"""README.md's measured figures are those of the committed results files
(``benchmarks/readme_numbers.py``), and the generator renders each block."""

import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module():
  spec = importlib.util.spec_from_file_location("readme_numbers",
                                                ROOT / "benchmarks" / "readme_numbers.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def test_readme_figures_match_the_results_files(capsys):
  assert _module().main(["--check"]) == 0, capsys.readouterr().out


def test_every_block_is_in_the_readme_and_names_command_machine_and_date():
  rn = _module()
  text = (ROOT / "README.md").read_text()
  names = [m.group(2) for m in rn.BLOCK.finditer(text)]
  assert sorted(names) == sorted(rn.BLOCKS)
  for name in names:
    if name == "user_loop" and not (rn.RESULTS / rn.USER_LOOP.file).exists():
      continue
    block = rn.BLOCKS[name](rn.RESULTS)
    assert "Measured with `" in block and "`benchmarks/results/" in block, name
    assert " on " in block and "20" in block.split("Measured with")[1], name  # machine, date


def test_a_changed_figure_is_caught(tmp_path):
  rn = _module()
  text = (ROOT / "README.md").read_text()
  assert "| 64.4 |" in text
  stale = tmp_path / "README.md"
  stale.write_text(text.replace("| 64.4 |", "| 60.0 |", 1))
  assert rn.main(["--check", "--readme", str(stale)]) == 1
  assert rn.main(["--readme", str(stale)]) == 0  # rewrites it
  assert stale.read_text() == text


def test_user_loop_block_renders_its_results_file(tmp_path):
  rn = _module()
  rows = [
      {"optimizer": "optax.adamw", "tokens_per_step": 32768, "ms_per_step": 81.04,
       "vs_adamw": 0.0, "compile_s": 10.5, "peak_mem_gb": 20.12},
      {"optimizer": "ortho_optax.turbo_muon", "tokens_per_step": 32768, "ms_per_step": 86.3,
       "vs_adamw": 0.065, "compile_s": 51.0, "peak_mem_gb": 21.0},
  ]
  (tmp_path / rn.USER_LOOP.file).write_text(json.dumps(rows))
  block = rn.user_loop(tmp_path)
  assert "| `optax.adamw` | 32,768 | 81.0 | – | 10.5 | 20.1 |" in block
  assert "| `ortho_optax.turbo_muon` | 32,768 | 86.3 | +6.5% | 51.0 | 21.0 |" in block
  assert "one NVIDIA H200" in block and rn.USER_LOOP.file in block
  with_meta = {"rows": rows, "command": "python benchmarks/bench_user_loop.py --rounds 5",
               "machine": {"device": "NVIDIA H200", "date": "2026-12-02T10:00:00+00:00"}}
  (tmp_path / rn.USER_LOOP.file).write_text(json.dumps(with_meta))
  block = rn.user_loop(tmp_path)
  assert "`python benchmarks/bench_user_loop.py --rounds 5` on one NVIDIA H200, 2026-12-02" in block
  assert "Not measured yet" in rn.user_loop(tmp_path / "empty")


def test_an_unknown_block_is_an_error():
  with pytest.raises(ValueError, match="numbers:typo"):
    _module().render("<!-- numbers:typo -->\nx\n<!-- /numbers -->\n")
