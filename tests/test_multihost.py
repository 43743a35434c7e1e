"""The fork/join engine in two real processes (`jax.distributed` on localhost, gloo CPU
collectives, 4 fake devices each, one (data, model) mesh spanning both) gives what one
process with 8 devices gives; so does `Generator`. Each process imports the package before
`jax.distributed.initialize` (importing allocates nothing on a device)."""
import json
import os
import socket
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(nproc, devices, out):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  port = _port()
  return [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(i), str(nproc),
                            str(port), str(devices), out], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(nproc)]


def _wait(procs, timeout=240):
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-3000:]


def test_two_processes_equal_one(tmp_path):
  one, two = str(tmp_path / "one.json"), str(tmp_path / "two.json")
  procs = _launch(1, 8, one) + _launch(2, 4, two)
  _wait(procs)
  a, b = json.load(open(one)), json.load(open(two))
  assert a["processes"] == 1 and b["processes"] == 2
  assert len(a["results"]) == len(b["results"]) == 10
  assert len(b["results"][4]["samples"]) == 3
  flat = lambda rs: [s for r in rs for s in (r.get("samples") or [r])]
  for x, y in zip(flat(a["results"]), flat(b["results"])):
    assert x["token_ids"] == y["token_ids"] and x["stop_reason"] == y["stop_reason"]
    assert [t["tokens"] for t in x["threads"]] == [t["tokens"] for t in y["threads"]]
  assert sum(r["forks"] for r in b["results"]) >= 10
  assert a["generator"] == b["generator"] and all(len(t) == 12 for t in b["generator"])
