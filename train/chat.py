"""Conversations -> token ids and the loss flags of the assistant's tokens, through the tokenizer's chat template.

A conversation is a list of ``{role, content}`` turns (system, user, assistant; any number of each). It is
rendered with the tokenizer's own chat template (``apply_chat_template``) or ``data.chat_template`` (a file,
or a name in ``TEMPLATES``). With ``loss_on: assistant`` the loss covers the tokens of every assistant turn and
nothing else:

- a template that marks them (``{% generation %}`` ... ``{% endgeneration %}``): what transformers' assistant
  mask says (what TRL's assistant-only loss uses);
- any other template: the turn is what the template renders after the generation prompt of the turns before
  it, up to the end of the turn (its end-of-turn token and what the template writes after it): the text between
  ``render(turns[:i], add_generation_prompt=True)`` and ``render(turns[:i + 1])``. Both must be prefixes of the
  whole conversation's rendering, else the template renders earlier turns differently as the conversation goes
  on (Qwen3's drops earlier reasoning) and the conversation is refused, naming the template: give one with
  generation markers.

Tokens are those of the whole rendering (``add_special_tokens=False``, as ``apply_chat_template``), a token
being the assistant's when its characters overlap an assistant span.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from train.config import ConfigError

__all__ = ["ROLES", "TEMPLATES", "check_conversation", "chat_template", "render", "apply_template"]

ROLES = ("system", "user", "assistant")

# Named templates for data.chat_template. ChatML (SmolLM2, Qwen2.5 without tools): no default system turn.
TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
               "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}"),
}

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def check_conversation(value: Any, assistant: bool) -> str | None:
    """What is wrong with one row's conversation (``None``: nothing): not a list, empty, a turn without a known
    role or text content, or (``assistant``: the loss is on the assistant's turns) no assistant turn."""
    if not isinstance(value, list):
        return f"{'null' if value is None else 'a ' + type(value).__name__} where a list of turns belongs"
    if not value:
        return "an empty conversation"
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            return f"turn {i + 1} is {type(turn).__name__}, not a {{role, content}} mapping"
        role = turn.get("role")
        if role not in ROLES:
            return f"turn {i + 1} has role {role!r}; the roles are {list(ROLES)}"
        if not isinstance(turn.get("content"), str):
            return f"turn {i + 1} ({role}) has {'no' if turn.get('content') is None else 'non-text'} content"
    if assistant and not any(t["role"] == "assistant" for t in value):
        return "no assistant turn (data.loss_on: assistant has nothing to learn from it)"
    return None


def chat_template(tokenizer: Any, setting: str | None) -> tuple[str, str]:
    """(the template's text, its name for errors): ``data.chat_template`` as a name in ``TEMPLATES`` or a file,
    else the tokenizer's own."""
    if setting is None:
        text = getattr(tokenizer, "chat_template", None)
        if not text:
            raise ConfigError(f"data.chat_template: the tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} has "
                              f"no chat template; name one ({sorted(TEMPLATES)}) or a template file")
        if isinstance(text, dict):  # several named templates: the default one
            text = text.get("default") or next(iter(text.values()))
        return text, f"the tokenizer's chat template ({getattr(tokenizer, 'name_or_path', '?')})"
    if setting in TEMPLATES:
        return TEMPLATES[setting], f"chat template {setting!r}"
    path = Path(setting).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.chat_template: {setting!r} is neither a named template ({sorted(TEMPLATES)}) nor "
                          "a file")
    return path.read_text(), f"chat template file {path}"


def render(tokenizer: Any, turns: list[dict[str, str]], template: str, name: str,
           loss_on: str) -> tuple[list[int], list[int]]:
    """Token ids of the conversation and their loss flags (``loss_on``: ``assistant`` or ``all``)."""
    turns = [{"role": t["role"], "content": t["content"]} for t in turns]
    if loss_on == "all" or not _GENERATION.search(template):
        text = apply_template(tokenizer, turns, template, name)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        if loss_on == "all":
            return ids, [1] * len(ids)
        spans = _assistant_spans(tokenizer, turns, template, name, text)
        flags = [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]
        return ids, flags
    out = apply_template(tokenizer, turns, template, name, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), [int(x) for x in out["assistant_masks"]]


def apply_template(tokenizer: Any, turns: list[dict[str, str]], template: str, name: str, **kwargs: Any) -> Any:
    """``tokenizer.apply_chat_template`` (text unless ``tokenize=True``); a template's failure is an error naming
    the template."""
    kwargs.setdefault("tokenize", False)
    try:
        return tokenizer.apply_chat_template(turns, chat_template=template, **kwargs)
    except Exception as e:  # noqa: BLE001 - a template raises what it likes (jinja's raise_exception, ...)
        raise ConfigError(f"data.chat_template: {name} cannot render this conversation: {type(e).__name__}: {e}") from None


def _assistant_spans(tokenizer: Any, turns: list[dict[str, str]], template: str, name: str,
                     text: str) -> list[tuple[int, int]]:
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = apply_template(tokenizer, turns[:i], template, name, add_generation_prompt=True)
        through = apply_template(tokenizer, turns[:i + 1], template, name)
        if not (text.startswith(before) and text.startswith(through) and len(through) > len(before)):
            raise ConfigError(f"data.chat_template: {name} renders the turns before assistant turn {i + 1} "
                              "differently once the conversation goes on, so its tokens cannot be found by rendering "
                              "prefixes; give a template that marks them with {% generation %} ... "
                              "{% endgeneration %} (data.chat_template: a file)")
        spans.append((len(before), len(through)))
    return spans
