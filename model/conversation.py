"""The "deepseek" chat format of DeepSeek-VL2.

Two renderings exist in the reference and they are not the same thing:
- `display_prompt` is the human-readable `sft_format` string (system messages are shown as
  ordinary turns there, and seps alternate by message index);
- `token_segments` is what is actually tokenized: BOS once, a system message as raw text,
  each user turn as "<|User|>: {text}\n\n<|Assistant|>:", each assistant reply as
  text + EOS (the EOS id, not the string).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

USER = "<|User|>"
ASSISTANT = "<|Assistant|>"
SEP = "\n\n"
SEP2 = "<｜end▁of▁sentence｜>"
IMAGE = "<image>"

USER_ROLES = (USER, "user")
ASSISTANT_ROLES = (ASSISTANT, "assistant")
SYSTEM_ROLES = ("system", "deepseekapi-sys")

Message = Mapping[str, str]


@dataclass(frozen=True)
class Segment:
    text: str  # may contain "<image>" only for user turns
    eos: bool  # append the EOS id after the text


def _turn(role: str, text: str, sep: str) -> str:
    # An empty message renders as "role:" with no separator: that is how the
    # open assistant slot at the end of a prompt gets its trailing ":".
    return f"{role}: {text}{sep}" if text else f"{role}:"


def display_prompt(conversation: Sequence[Message]) -> str:
    """The reference's `sft_format` string (roles printed as given)."""
    seps = (SEP, SEP2)
    out = "".join(_turn(m["role"], str(m["content"]).strip(), seps[i % 2]) for i, m in enumerate(conversation))
    return out.strip()


def token_segments(conversation: Sequence[Message]) -> list[Segment]:
    """Split a conversation into the text pieces the processor tokenizes, in order.

    A conversation ending in a user turn gets the same tokens as one ending in an empty
    assistant turn (the reference would assert instead).
    """
    if not conversation:
        raise ValueError("empty conversation")
    segments: list[Segment] = []
    for i, m in enumerate(conversation):
        role, text = m["role"], str(m["content"]).strip()
        if role in USER_ROLES:
            segments.append(Segment(_turn(USER, text, SEP) + _turn(ASSISTANT, "", ""), eos=False))
        elif role in ASSISTANT_ROLES:
            if IMAGE in text:
                raise ValueError(f"message {i}: {IMAGE} is not allowed in an assistant reply")
            last = i == len(conversation) - 1
            segments.append(Segment(text, eos=not last))  # the final EOS is dropped at inference
        elif role in SYSTEM_ROLES:
            if i != 0:
                raise ValueError(f"message {i}: a system message must be the first message")
            if IMAGE in text:
                raise ValueError(f"message {i}: {IMAGE} is not allowed in a system message")
            segments.append(Segment(text, eos=False))
        else:
            raise ValueError(f"message {i}: unknown role {role!r}")
    return segments
