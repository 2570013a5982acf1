"""megasail's prompt templates as Jinja chat templates, for the tokenizer of a HuggingFace export.

``chat_template_jinja(name, system_message)`` renders through ``apply_chat_template`` exactly the
strings ``megasail.data.text.template`` renders (docs/preprocessing.md, "Templates"), with each image
slot written as ``<IMG_CONTEXT>``: the placeholder transformers' ``InternVLProcessor`` expands to
``<img>`` + image_seq_length * tiles ``<IMG_CONTEXT>`` + ``</img>``, as megasail's reader expands a slot.

Messages are transformers' chat messages: ``{"role", "content"}`` with ``content`` a string (an
``<image>`` tag in a user turn is an image slot, as in megasail's data) or a list of parts
(``{"type": "image"}`` is ``<image>\\n`` at its place, ``{"type": "text", "text": ...}`` is text).
"""

from __future__ import annotations

import json

from megasail.data.text.template import IMAGE_TAG, CaptionTemplate, ChatTemplate, TextTemplate, get_template
from megasail.data.text.tokenizer import IM_END, IM_START, IMG_CONTEXT


def _literal(text: str) -> str:
    """A Jinja string literal of ``text`` (JSON escapes are Jinja's; non-ASCII stays as it is)."""
    return json.dumps(text, ensure_ascii=False)


# Text of a message's content; user turns turn <image> tags and image parts into slots.
_CONTENT_MACROS = """\
{%- macro text_of(content) -%}
{%- if content is string -%}{{ content }}
{%- else -%}{%- for part in content if part.type == 'text' -%}{{ part.text }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- macro user_of(content) -%}
{%- if content is string -%}{{ content | replace(IMAGE_TAG, IMG_CONTEXT) }}
{%- else -%}{%- for part in content -%}
{%- if part.type == 'image' -%}{{ IMG_CONTEXT + '\\n' }}
{%- elif part.type == 'text' -%}{{ part.text | replace(IMAGE_TAG, IMG_CONTEXT) }}
{%- endif -%}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
"""

# ChatTemplate.render: system turn (the first message's, else the default), then every turn.
_CHAT = """\
{%- set ns = namespace(system=DEFAULT_SYSTEM, turns=messages) -%}
{%- if messages and messages[0].role == 'system' -%}
{%- set ns.system = text_of(messages[0].content) -%}{%- set ns.turns = messages[1:] -%}
{%- endif -%}
{{- IM_START + 'system\\n' + ns.system + IM_END + SEP -}}
{%- for message in ns.turns -%}
{%- if message.role == 'user' -%}{{- IM_START + 'user\\n' + user_of(message.content) + IM_END + SEP -}}
{%- elif message.role == 'assistant' -%}{{- IM_START + 'assistant\\n' + text_of(message.content) + IM_END + SEP -}}
{%- else -%}{{- raise_exception('a ' + message.role + ' turn after the first turn') -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- IM_START + 'assistant\\n' -}}{%- endif -%}
"""

# CaptionTemplate.render: every image slot, then the captions (assistant turns) and <|im_end|>; a
# generation prompt is the image slots alone (the caption is what the model writes).
_CAPTION = """\
{%- set ns = namespace(caption='') -%}
{%- for message in messages if message.role == 'user' -%}
{%- if message.content is string -%}{{- IMG_CONTEXT * message.content.count(IMAGE_TAG) -}}
{%- else -%}{%- for part in message.content if part.type == 'image' -%}{{- IMG_CONTEXT -}}{%- endfor -%}
{%- endif -%}
{%- endfor -%}
{%- for message in messages if message.role == 'assistant' -%}
{%- set ns.caption = ns.caption + text_of(message.content) -%}
{%- endfor -%}
{%- if ns.caption and not add_generation_prompt -%}{{- ns.caption + IM_END -}}{%- endif -%}
"""

# TextTemplate.render: every turn's text, then <|im_end|> (documents, not prompts).
_TEXT = """\
{%- for message in messages -%}{{- text_of(message.content) -}}{%- endfor -%}
{%- if messages -%}{{- IM_END -}}{%- endif -%}
"""


def chat_template_jinja(name: str, system_message: str | None = None) -> str:
    """Jinja source of megasail template ``name`` (``system_message`` replaces a chat template's
    default system text, as preprocessing's --system-message does)."""
    template = get_template(name)
    constants = {"IMAGE_TAG": IMAGE_TAG, "IMG_CONTEXT": IMG_CONTEXT, "IM_START": IM_START, "IM_END": IM_END}
    if isinstance(template, ChatTemplate):
        body = _CHAT
        default = template.default_system if system_message is None else system_message
        constants.update(DEFAULT_SYSTEM=default, SEP=template.separator)
    elif isinstance(template, CaptionTemplate):
        body = _CAPTION
    elif isinstance(template, TextTemplate):
        body = _TEXT
    else:
        raise ValueError(f"template {name!r} has no Jinja form")
    header = "".join(f"{{%- set {key} = {_literal(value)} -%}}\n" for key, value in constants.items())
    return header + _CONTENT_MACROS + body
