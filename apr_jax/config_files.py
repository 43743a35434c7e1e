"""Config files: the one way apr_jax loads them.

A config file is a Python file whose `get_config()` returns an ml_collections `ConfigDict`.
`run`, `train` and `eval` take one with `--config FILE` (and `--config.key=value`
overrides), `bench train` with `--train_config FILE`, and a config that builds on another
one loads it with `sibling(__file__, "name")`. Each command expects one kind, told apart by
what the config holds:

- "train": a `train` section and a trajectory `format` (`python -m apr_jax.train`);
- "eval": `methods` to evaluate (`python -m apr_jax.eval`);
- "run": flag defaults for `python -m apr_jax.run` (anything else).

A file that is missing, fails to load, or is of the wrong kind is one clear error line, found
while the flags are parsed (before any model or data is built).
"""
from __future__ import annotations

import importlib.util
import os
import types
import zlib

from absl import flags
from ml_collections import ConfigDict
from ml_collections.config_flags import config_flags  # the module: its parser and flag classes

from apr_jax.errors import UserError

COMMANDS = {"train": "python -m apr_jax.train", "eval": "python -m apr_jax.eval",
            "run": "python -m apr_jax.run"}
EXAMPLES = {"train": "configs/countdown_small_apr.py", "eval": "configs/eval_countdown_small.py",
            "run": "configs/smollm2_chat.py"}
WHAT = {"train": "a training config", "eval": "an evaluation config",
        "run": "a config of run flag defaults"}


def load_module(path: str) -> types.ModuleType:
  """Executes the config file `path` as a module of its own."""
  if not path:
    raise UserError("empty config path")
  if not os.path.isfile(path):
    raise UserError(f"config file not found: {path}")
  name = f"apr_jax_config_{zlib.crc32(os.path.abspath(path).encode()):08x}"
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise UserError(f"cannot load config file {path} (not a .py file?)")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 - any error in the user's file is one line
    raise UserError(f"config file {path} failed to load: {type(e).__name__}: {e}") from None
  if not callable(getattr(module, "get_config", None)):
    raise UserError(f"config file {path} has no get_config()")
  return module


def sibling(file: str, name: str) -> types.ModuleType:
  """The config module `name` next to the config file `file` (a config's `__file__`)."""
  return load_module(os.path.join(os.path.dirname(os.path.abspath(file)), name + ".py"))


def kind_of(config) -> str:
  if "methods" in config:
    return "eval"
  if "train" in config and "format" in config:
    return "train"
  return "run"


def load(path: str, kind: str | None = None, command: str | None = None) -> ConfigDict:
  """`get_config()` of the file `path` ("file.py:arg" passes arg to it), checked to be of
  `kind` when given (`command` names the command in the error, default: kind's own)."""
  file, *arg = path.split(":", 1)
  module = load_module(file)
  try:
    config = module.get_config(*arg)
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001
    raise UserError(f"config file {file}: get_config() failed: {type(e).__name__}: {e}") from None
  if not isinstance(config, ConfigDict):
    raise UserError(f"config file {file}: get_config() returned {type(config).__name__}, "
                    "not an ml_collections ConfigDict")
  if kind is not None:
    found = kind_of(config)
    if found != kind:
      raise UserError(f"{file} is {WHAT[found]} (for `{COMMANDS[found]} --config ...`); "
                      f"{command or COMMANDS[kind].split()[-1]} expects {WHAT[kind]}, e.g. "
                      f"{EXAMPLES[kind]}")
  return config


class _Parser(config_flags.ConfigFileFlagParser):
  """ml_collections' config-file flag parser, loading through `load` (one loader for every
  command; errors become one line when the flags are parsed)."""

  def __init__(self, name: str, kind: str | None):
    super().__init__(name=name, lock_config=True)
    self.kind = kind

  def parse(self, path):
    try:
      config = load(path, self.kind)
    except UserError as e:
      raise ValueError(str(e)) from None
    config.lock()
    return config


def DEFINE_config_file(name: str = "config", kind: str | None = None, help_string: str = "",
                       flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
  """A `--name FILE` flag (with `--name.key=value` overrides) holding the loaded config."""
  flag = config_flags._ConfigFlag(  # noqa: SLF001 - the override machinery of ml_collections
      parser=_Parser(name, kind), serializer=flags.ArgumentSerializer(), name=name, default=None,
      help_string=help_string or f"{WHAT.get(kind, 'a config').capitalize()} file.",
      flag_values=flag_values)
  return flags.DEFINE_flag(flag, flag_values)
