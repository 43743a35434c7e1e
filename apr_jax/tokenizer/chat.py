"""Chat templates: the checkpoint's own Jinja template, rendered as transformers does
(sandboxed, trim_blocks/lstrip_blocks), or ChatML when the checkpoint has none."""
from __future__ import annotations

import functools

from apr_jax.errors import UserError

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@functools.lru_cache(maxsize=16)
def _compile(template: str):
  from jinja2.exceptions import TemplateError
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(msg):
    raise TemplateError(msg)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  return env.from_string(template)


def render(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
           **extra) -> str:
  from jinja2.exceptions import TemplateError
  try:
    return _compile(template or CHATML).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **extra)
  except TemplateError as e:
    raise UserError(f"chat template failed: {e}") from None
