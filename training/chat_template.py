"""The `chat_template` setting: how a conversation becomes the text a model reads.

A model whose tokenizer ships a chat template (an instruct/chat checkpoint) needs nothing.
A *base* model has none; the setting gives it one, as

- a preset name: `plain` renders "User: {prompt}\nAssistant: {answer}<eos>" (a system
  message, if any, is a first paragraph; the tokenizer's bos token, if it has one, opens
  the text), so a base model answers after "Assistant:" and learns to stop at its eos. The
  answer is trimmed: a base model's answer usually starts with the space after the colon,
  which the template writes itself;
- a Jinja template string (any text holding `{{` or `{%`), as in tokenizer_config.json;
- the path of a file holding such a template (e.g. `templates/my_chat.jinja`).

Each preset also says where an assistant turn ends (`PRESET_STOPS`): a base model does not
stop at its eos, it goes on to write the next "\\nUser: …" turn itself. Generation stops at
these strings and the answer is cut before them (`cut_at_stop`); a custom template declares
its own with the `chat_template_stop` key. A tokenizer's own template (an instruct model)
has none: its model ends a turn with its eos.

The setting replaces the tokenizer's own template wherever it is given. The training
tokenisation (`training.data.encode_example`) and the logit capture must use the same
template, or the captured teacher positions do not line up with the student's tokens;
distillflow.config shares one top-level `chat_template` between teacher, capture and
training for that reason.
"""

from __future__ import annotations

from pathlib import Path

PLAIN = (
    "{%- if bos_token %}{{ bos_token }}{% endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- if loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'assistant' %}{{ '\\n' }}{% endif -%}"
    "{{ 'User: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'Assistant: ' + (message['content'] | trim) + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ 'Assistant:' }}{% endif -%}"
)

PRESETS: dict[str, str] = {"plain": PLAIN}
# Where an assistant turn of each preset ends: the text that opens the next turn.
PRESET_STOPS: dict[str, tuple[str, ...]] = {"plain": ("\nUser:", "\nAssistant:")}
TEMPLATE_FILE_SUFFIXES = (".jinja", ".j2", ".jinja2", ".txt", ".tmpl")


def _is_jinja(value: str) -> bool:
    return "{{" in value or "{%" in value


def _looks_like_a_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.endswith(TEMPLATE_FILE_SUFFIXES)


def check_chat_template_setting(value: str | None) -> str | None:
    """Pydantic validator of every `chat_template` key: a preset, a Jinja string or an existing file."""
    if value is None or value in PRESETS or _is_jinja(value):
        return value
    presets = ", ".join(PRESETS)
    if _looks_like_a_path(value):
        if not Path(value).is_file():
            raise ValueError(
                f"chat template file {value} not found (relative paths resolve against {Path.cwd()}); "
                f"fix the path, or use a preset ({presets}) or a Jinja template string"
            )
        if not _is_jinja(Path(value).read_text(encoding="utf-8")):
            raise ValueError(f"chat template file {value} holds no Jinja ({{{{ … }}}} or {{% … %}}); check its content")
        return value
    raise ValueError(
        f"{value!r} is not a chat template preset; the presets are: {presets} "
        "(or give a Jinja template string, or the path of a .jinja file)"
    )


def chat_template_text(setting: str) -> str:
    """The Jinja text of a (validated) setting."""
    if setting in PRESETS:
        return PRESETS[setting]
    if _is_jinja(setting):
        return setting
    return Path(setting).read_text(encoding="utf-8")


def effective_chat_template(tokenizer, setting: str | None) -> str | None:
    """The template a model is used with: the setting's, else the tokenizer's own (or None)."""
    if setting is not None:
        return chat_template_text(setting)
    return getattr(tokenizer, "chat_template", None) or None


def check_renders(tokenizer, template: str, for_training: bool = True) -> None:
    """Render a one-turn conversation; raise ValueError (saying why) when it cannot work: a
    Jinja error, a missing eos token, or (`for_training`: tokenising answers for training or
    capture) an answer that is not appended to the generation prompt, so that the answer's
    tokens cannot be located."""
    if "eos_token" in template and not getattr(tokenizer, "eos_token", None):
        raise ValueError("the template ends answers with eos_token, but the tokenizer has no eos token")
    messages = [{"role": "user", "content": "Hello?"}]
    try:
        prompt = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": "Hi."}], chat_template=template, tokenize=False
        )
    except Exception as error:  # jinja2 raises several types; all mean the same to the user
        raise ValueError(f"the chat template does not render ({type(error).__name__}: {error})") from None
    if for_training and not full.startswith(prompt):
        raise ValueError(
            "the chat template does not render a conversation as <generation prompt> + <answer>, "
            "so the answer's tokens cannot be located; use a template whose add_generation_prompt "
            "output is a prefix of the full conversation"
        )


def check_stop_strings(value: list[str] | None) -> list[str] | None:
    """Pydantic validator of every list of stop strings: each non-empty, none repeated."""
    if value is None:
        return value
    if any(not stop for stop in value):
        raise ValueError("a stop string is empty (it would end every answer at once); remove it")
    if len(set(value)) != len(value):
        raise ValueError(f"stop strings repeat ({value!r}); list each once")
    return value


def template_stops(template: str | None) -> tuple[str, ...]:
    """Where an assistant turn of a template (the Jinja text, or a preset's name) ends: the
    preset's stops when the text is a preset's, else none. A student trained with a preset
    carries the preset's text in its tokenizer, so it is recognised without a setting."""
    if template is None:
        return ()
    if template in PRESET_STOPS:
        return PRESET_STOPS[template]
    for name, text in PRESETS.items():
        if template == text:
            return PRESET_STOPS.get(name, ())
    return ()


def turn_stops(setting: str | None, declared: list[str] | None) -> tuple[str, ...]:
    """The stops of a `chat_template` setting: `chat_template_stop` when given (it replaces a
    preset's), else the preset's (none for a Jinja string or file, or no setting)."""
    if declared is not None:
        return tuple(declared)
    return template_stops(setting)


def cut_at_stop(text: str, stops: tuple[str, ...] | list[str]) -> tuple[str, bool]:
    """(the text before the first stop string, whether one was found); the stop is not kept."""
    cut = min((text.find(stop) for stop in stops if stop in text), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)
