"""The prompt templates, one source of truth: what ``octoray filter`` writes into the SFT rows,
what ``octoray eval`` sends, and the ``chat_template`` ``octoray train`` saves with the model.

Two formats, as in OctoPack:

- ``octocoder``: ``Question: {instruction}\\n\\nAnswer:\\n{response}``. The ``Answer:\\n`` is
  bigcode-evaluation-harness's HumanEvalPack prompt byte for byte (the reference prompts must not
  change), so training writes the same bytes: a model trained on ``Answer: \\n`` and evaluated on
  ``Answer:\\n`` sees a token sequence at evaluation it never saw in training.
- ``commit_tags``: ``<commit_before>{old}<commit_msg>{subject}<commit_after>{new}`` (StarCoder's
  commit format; the tags are single special tokens of StarCoder's tokenizer and the demo's).

The chat templates are Jinja (what ``tokenizer.apply_chat_template``, vLLM and the Hub render);
tests check that they render exactly the training prompt. Pure Python: no transformers import.
"""

from __future__ import annotations

from typing import Iterable, Literal

TemplateName = Literal["octocoder", "commit_tags"]

QUESTION = "Question: "
#: Between the instruction and the response.
ANSWER = "\n\nAnswer:\n"
COMMIT_BEFORE, COMMIT_MSG, COMMIT_AFTER = "<commit_before>", "<commit_msg>", "<commit_after>"

#: The template a model without a ``chat_template`` is served with (OctoCoder's).
DEFAULT_TEMPLATE: TemplateName = "octocoder"

# A system message goes first, followed by a blank line; each user turn is a Question, each
# assistant turn an Answer closed by EOS -- training packs prompt + completion + EOS, so a
# conversation reads exactly like packed training examples.
_OCTOCODER_JINJA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}{{ '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Question: ' }}{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '\\n\\nAnswer:\\n' }}{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAnswer:\\n' }}{% endif %}"
)
# The system message is the code before the change, the user message the commit message, the
# assistant message the code after.
_COMMIT_TAGS_JINJA = (
    "{% set ns = namespace(before='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.before = message['content'] %}"
    "{% elif message['role'] == 'user' %}{{ '<commit_before>' }}{{ ns.before }}{{ '<commit_msg>' }}"
    "{{ message['content'] }}{% set ns.before = '' %}"
    "{% elif message['role'] == 'assistant' %}{{ '<commit_after>' }}{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<commit_after>' }}{% endif %}"
)
CHAT_TEMPLATES: dict[str, str] = {"octocoder": _OCTOCODER_JINJA, "commit_tags": _COMMIT_TAGS_JINJA}


def octocoder_prompt(instruction: str) -> str:
    """The OctoCoder prompt of one instruction (the response follows it directly)."""
    return f"{QUESTION}{instruction}{ANSWER}"


def commit_tags_prompt(old: str, subject: str) -> str:
    """The commit-tag prompt of a change (the new contents follow it directly)."""
    return f"{COMMIT_BEFORE}{old}{COMMIT_MSG}{subject}{COMMIT_AFTER}"


def chat_template(name: str) -> str:
    """The Jinja chat template of the format ``name`` (``octocoder`` or ``commit_tags``)."""
    return CHAT_TEMPLATES[name]


def detect(prompts: Iterable[str]) -> TemplateName:
    """Which format SFT prompts were written in: ``commit_tags`` when most start with the tag
    (OASST rows are always OctoCoder-style, so a commit-tag dataset still holds some of those)."""
    tags = other = 0
    for prompt in prompts:
        if prompt.startswith(COMMIT_BEFORE):
            tags += 1
        else:
            other += 1
    return "commit_tags" if tags > other else "octocoder"
