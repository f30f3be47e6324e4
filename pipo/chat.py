"""Chat messages as every entry point takes them: `pipo generate` rows, `pipo serve` requests, SFT/OPD rows.

One check, so a chat that one entry point accepts is a chat the others accept; each caller
names its own source (file and row, or the HTTP request's field) through `InputError`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipo.errors import InputError

ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


def check_messages(
    messages: object,
    *,
    file: str | Path | None = None,
    row: int | None = None,
    roles: Sequence[str] = ROLES,
    text_parts: bool = False,
) -> list[dict[str, str]]:
    """A chat: a non-empty list of `{"role": one of roles, "content": str}` objects, returned as such.

    With `text_parts`, a content given as OpenAI content parts (`[{"type": "text", "text": ...}]`)
    is joined into one string. A bad chat raises InputError naming `file`, `row` and the field
    (`messages[1].content`).
    """
    def fail(problem: str, field: str) -> InputError:
        return InputError(problem, file=file, row=row, field=field)

    if not isinstance(messages, list) or not messages:
        raise fail("must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise fail(f"must be an object, got {type(message).__name__}", f"messages[{i}]")
        if message.get("role") not in roles:
            raise fail(f"must be one of {', '.join(roles)}, got {message.get('role')!r}", f"messages[{i}].role")
        content = message.get("content")
        if text_parts and isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise fail("content parts must be text parts", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise fail(f"must be a string, got {type(content).__name__}", f"messages[{i}].content")
        out.append({"role": message["role"], "content": content})
    return out
