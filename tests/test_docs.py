"""The docs hold together: links and named files exist, error messages name real flags, the
README stays a front door, and the repository speaks of the project only."""
import ast
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = ["run", "train", "eval", "bench"]


def _files(*exts, under=("apr_jax", "configs", "tests", "launch", "docs", "notebooks")):
  out = []
  for top in under:
    for d, _, names in os.walk(os.path.join(ROOT, top)):
      if "__pycache__" in d or "shipped" in d:
        continue
      out += [os.path.join(d, n) for n in names if n.endswith(exts)]
  return sorted(out)


def _markdown():
  return [os.path.join(ROOT, "README.md")] + _files(".md", under=("docs",))


def test_markdown_links_exist():
  bad = []
  for md in _markdown():
    text = open(md, encoding="utf-8").read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold commands, not links
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"[a-z]+://|mailto:", target):
        continue
      path = target.split("#", 1)[0]
      if path and not os.path.exists(os.path.join(os.path.dirname(md), path)):
        bad.append(f"{os.path.relpath(md, ROOT)} -> {target}")
  assert not bad, bad


# a file named in a docstring: a relative path with a directory and a known extension
PATH_RE = re.compile(r"(?<![\w/.$-])((?:[\w.-]+/)+[\w.-]+\.(?:py|md|json|sh|ipynb|model|jinja))(?![\w/])")
PLACEHOLDER = re.compile(r"(^|/)([A-Z_]+|path|to|out_dir|tmp|runs|FILE)(/|$)")


def _docstrings(path):
  tree = ast.parse(open(path, encoding="utf-8").read())
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node)
      if doc:
        yield doc


# files of the original repositories (APR, ThreadWeaver) that docstrings cite
ORIGINALS = ("src/data/", "src/eval/", "src/countdown_utils", "threadweaver_rl/", "threadweaver_sft/")


def test_files_named_in_docstrings_exist():
  bad, seen = [], 0
  for py in _files(".py"):
    for doc in _docstrings(py):
      for name in PATH_RE.findall(doc):
        if PLACEHOLDER.search(name) or name.startswith(ORIGINALS):
          continue  # WORKDIR/model, path/to/x.gguf, runs/<name>/..., the originals' files: not ours
        seen += 1
        here = os.path.dirname(py)
        if not any(os.path.exists(os.path.join(base, name))
                   for base in (ROOT, os.path.join(ROOT, "apr_jax"), here)):
          bad.append(f"{os.path.relpath(py, ROOT)}: {name}")
  assert seen >= 10  # the check found file names to check
  assert not bad, bad


def _defined_flags():
  """Flag names the entry points define (read from their source: importing them all in one
  process would define the shared names twice)."""
  names, booleans = set(), set()
  for ep in ENTRY_POINTS:
    src = open(os.path.join(ROOT, "apr_jax", ep + ".py"), encoding="utf-8").read()
    for kind, name in re.findall(r"DEFINE_(\w+)\(\s*\"(\w+)\"", src):
      names.add(name)
      if kind == "boolean":
        booleans.add(name)
  return names | {"help", "helpfull", "flagfile"}, booleans


FLAG_RE = re.compile(r"(?<![\w-])--([a-z][a-z0-9_]*)(?![\w-])")


def _user_messages():
  """(file, text) of every string in a UserError(...) call or a log line of apr_jax."""
  for py in _files(".py", under=("apr_jax",)):
    for node in ast.walk(ast.parse(open(py, encoding="utf-8").read())):
      if not isinstance(node, ast.Call):
        continue
      f = node.func
      name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
      if name not in ("UserError", "log", "_log"):
        continue
      parts = [c.value for a in node.args for c in ast.walk(a)
               if isinstance(c, ast.Constant) and isinstance(c.value, str)]
      yield os.path.relpath(py, ROOT), "".join(parts)


def test_error_messages_name_defined_flags():
  names, booleans = _defined_flags()
  assert {"config", "prompt", "chat", "out", "train_config"} <= names
  bad, seen = [], 0
  for where, text in _user_messages():
    for flag in FLAG_RE.findall(text):
      seen += 1
      if flag not in names and not (flag.startswith("no") and flag[2:] in booleans):
        bad.append(f"{where}: --{flag} in {text[:80]!r}")
  assert seen >= 10
  assert not bad, bad


def test_readme_is_a_front_door():
  lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
  assert len(lines) <= 160, len(lines)
  ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
  test_cmd = ci.strip().splitlines()[-1]
  assert test_cmd in lines  # the README's test command is exactly what CI runs
  assert any("python -m apr_jax.run --task countdown" in l for l in lines)
  for doc in ["engine.md", "protocols.md", "training.md", "evaluation.md", "benchmarks.md"]:
    assert f"docs/{doc}" in "\n".join(lines), doc


def test_repository_speaks_of_the_project_only():
  # the words are joined here so that this file does not match its own search
  words = [("this", "session"), ("earlier", "session"), ("previous", "session"),
           ("issue", "#[0-9]"), ("this", "machine"), ("earlier", "machine")]
  pattern = "|".join(f"{a} {b}" for a, b in words)
  p = subprocess.run(["git", "grep", "-niE", pattern],
                     cwd=ROOT, capture_output=True, text=True)
  if p.returncode == 128 or "not a git repository" in p.stderr:
    pytest.skip("not a git checkout")
  assert p.stdout == "", p.stdout
