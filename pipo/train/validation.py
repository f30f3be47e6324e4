"""Input checks that fail early with a message naming the bad row or model.

ms-swift skips rows it cannot encode and falls back to EOS when a tokenizer has no pad
token; both would silently corrupt PIPO training, so the stages check first.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipo.chat import check_messages
from pipo.errors import InputError, PadTokenError, PIPOError
from pipo.jsonl import numbered_jsonl


def check_sft_row(row: Mapping[str, Any], file: str | Path, number: int) -> None:
    """An SFT row ends with a non-empty assistant turn that follows a user turn."""
    messages = check_messages(row.get("messages"), file=file, row=number)
    last = messages[-1]
    if last["role"] != "assistant":
        raise InputError(f"no assistant turn at the end (last role is {last['role']!r}); SFT needs a response",
                         file=file, row=number, field="messages")
    if not last["content"].strip():
        raise InputError("the assistant turn is empty", file=file, row=number, field="messages")
    if not any(m["role"] == "user" for m in messages[:-1]):
        raise InputError("no user turn before the assistant turn", file=file, row=number, field="messages")


def check_prompt_row(row: Mapping[str, Any], file: str | Path, number: int) -> None:
    """An OPD row has a user turn (a trailing assistant turn is allowed and replaced by the rollout)."""
    if not any(m["role"] == "user" for m in check_messages(row.get("messages"), file=file, row=number)):
        raise InputError("no user turn to roll out from", file=file, row=number, field="messages")


def validate_jsonl(path: str | Path, kind: str) -> int:
    """Check every row of an SFT (`kind='sft'`) or OPD prompt (`kind='opd'`) jsonl file; return the row count."""
    check = {"sft": check_sft_row, "opd": check_prompt_row}[kind]
    path = Path(path)
    if not path.is_file():
        raise PIPOError(f"{kind} dataset {path} does not exist")
    count = 0
    for number, row in numbered_jsonl(path):
        check(row, path, number)
        count += 1
    if count == 0:
        raise PIPOError(f"{kind} dataset {path} has no rows")
    return count


def check_dataset(dataset: str, kind: str) -> None:
    """A stage's dataset: a `pipo cache` folder, a JSONL file checked row by row, or a hub id; a missing
    local file is an error (ms-swift would look it up on the hub and fail there)."""
    path = Path(dataset)
    if path.is_file():
        validate_jsonl(path, kind)
    elif not path.is_dir() and path.suffix in (".jsonl", ".json"):
        raise PIPOError(f"{kind} dataset {path} does not exist")


def require_pad_token(tokenizer: Any, source: str) -> int:
    """The tokenizer's pad id; PIPO needs a real pad token distinct from EOS."""
    pad = tokenizer.pad_token_id
    if pad is None:
        raise PadTokenError(f"{source}: the tokenizer has no pad token; PIPO needs one (Qwen3.5: '<|endoftext|>')")
    if pad == tokenizer.eos_token_id:
        raise PadTokenError(f"{source}: the pad token is the EOS token ({pad}); PIPO needs a distinct pad token")
    return int(pad)


def check_same_tokenizer(student: Any, teacher: Any, student_source: str, teacher_source: str) -> None:
    """Teacher and student must share the vocabulary: OPD compares their distributions id by id."""
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    if student_vocab != teacher_vocab:
        only_s = sorted(set(student_vocab) - set(teacher_vocab))[:3]
        only_t = sorted(set(teacher_vocab) - set(student_vocab))[:3]
        differ = sorted(k for k in set(student_vocab) & set(teacher_vocab) if student_vocab[k] != teacher_vocab[k])[:3]
        raise PIPOError(
            f"tokenizer mismatch between student {student_source} and teacher {teacher_source}: "
            f"{len(student_vocab)} vs {len(teacher_vocab)} tokens; only in student {only_s}, only in teacher {only_t}, "
            f"different ids {differ}"
        )


def check_teacher_tokenizer(student_dir: str | Path, teacher_dir: str | Path) -> None:
    """Fail before training when the teacher checkpoint's tokenizer differs from the student's."""
    from transformers import AutoTokenizer

    check_same_tokenizer(
        AutoTokenizer.from_pretrained(str(student_dir)),
        AutoTokenizer.from_pretrained(str(teacher_dir)),
        f"model {student_dir}",
        f"model {teacher_dir}",
    )
