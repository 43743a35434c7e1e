"""Chat templates: the checkpoint's own Jinja template, rendered as transformers does
(sandboxed, trim_blocks/lstrip_blocks). A checkpoint without one (a base model) has no chat
format: `use_chat` decides, from the user's `auto | on | off`, whether prompts are wrapped."""
from __future__ import annotations

import functools

from apr_jax.errors import UserError

CHAT_MODES = ("auto", "on", "off")


@functools.lru_cache(maxsize=16)
def _compile(template: str):
  from jinja2.exceptions import TemplateError
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(msg):
    raise TemplateError(msg)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  return env.from_string(template)


def use_chat(mode: str | bool, template: str | None) -> bool:
  """Whether prompts get the chat template. "auto": when the checkpoint has one (plain text
  otherwise); "on": always (a checkpoint without a template is an error); "off": never.
  True / False mean "on" / "off"."""
  if isinstance(mode, bool):
    mode = "on" if mode else "off"
  if mode not in CHAT_MODES:
    raise UserError(f"chat must be one of {', '.join(CHAT_MODES)}, got {mode!r}")
  if mode == "on" and not template:
    raise UserError("--chat=on, but the checkpoint has no chat template (a base model?); "
                    "use --chat=auto or --chat=off to send the prompt as plain text")
  return mode == "on" or (mode == "auto" and bool(template))


def render(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
           **extra) -> str:
  from jinja2.exceptions import TemplateError
  if not template:
    raise UserError("the checkpoint has no chat template (a base model?); send the prompt as "
                    "plain text (--chat=off)")
  try:
    return _compile(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **extra)
  except TemplateError as e:
    raise UserError(f"chat template failed: {e}") from None
