"""The quickstart notebook runs: every Python cell in order (shell `!`/`%` lines, the clone,
install and CLI calls, are left out), on the tests' 8 fake devices."""
import json
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  nb = json.load(open(os.path.join(ROOT, "notebooks", "quickstart.ipynb")))
  ns = {}
  ran = 0
  for cell in nb["cells"]:
    if cell["cell_type"] != "code":
      continue
    src = "".join(cell["source"]).replace("/tmp/apr_small_py", str(tmp_path / "small"))
    code = "\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("!", "%")))
    exec(compile(code, f"quickstart cell {ran}", "exec"), ns)
    ran += 1
  assert ran >= 6
  assert [s for s, _ in ns["losses"]] == [1, 2, 3, 4] and all(math.isfinite(l) for _, l in ns["losses"])
  assert ns["c"].train.data_parallel == 0  # batch 16 over the 8 fake devices
