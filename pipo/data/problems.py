"""The normalised problem record shared by benchmarks and training prompt sources.

One record per problem (contract)::

    {"id": str, "benchmark": str, "prompt": str, "answer": str | None,
     "tests": {...} | None, "metadata": {"grader": "math" | "mcq" | "code", ...}}

`prompt` is the user message; the engine applies the chat template later. This
module also holds what every loader needs: stable per-item seeds,
the prompt templates of docs/method.md section 7, and reading a dataset either from the Hugging Face Hub
or from a local copy saved in the hub's file layout.
"""
from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipo.errors import PIPOError
from pipo.jsonl import read_jsonl

Record = dict[str, Any]

GRADERS: tuple[str, ...] = ("math", "mcq", "code")
TEST_FORMATS: tuple[str, ...] = ("stdin", "functional")
CODE_LANGUAGES: tuple[str, ...] = ("python", "cpp")
INPUT_MODES: tuple[str, ...] = ("stdio", "file")
LETTERS = "ABCDEFGHIJ"

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
MCQ_INSTRUCTION = (
    "Please reason step by step, and put only the letter of the correct choice "
    "within \\boxed{} (e.g. \\boxed{A})."
)


# --------------------------------------------------------------------------- records


def make_record(
    id: str,
    benchmark: str,
    prompt: str,
    grader: str,
    *,
    answer: str | None = None,
    tests: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Record:
    """Build a record and check it, so a malformed one fails where it is made."""
    record: Record = {
        "id": id,
        "benchmark": benchmark,
        "prompt": prompt,
        "answer": answer,
        "tests": dict(tests) if tests is not None else None,
        "metadata": {**(metadata or {}), "grader": grader},
    }
    validate_record(record)
    return record


def code_tests(
    format: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    *,
    fn_name: str | None = None,
    time_limit_s: float | None = None,
    memory_limit_mb: int | None = None,
    language: str = "python",
    checker: str | None = None,
    input_mode: str = "stdio",
    input_file: str | None = None,
    output_file: str | None = None,
) -> dict[str, Any]:
    """The `tests` block of a code record: everything the sandboxed grader needs to judge a program.

    `checker` is a program that judges an output when several are right (Codeforces'
    `generated_checker`); `input_mode` "file" means the program reads `input_file` and
    writes `output_file` instead of stdin/stdout.
    """
    return {
        "format": format,
        "inputs": [str(x) for x in inputs],
        "outputs": [str(x) for x in outputs],
        "fn_name": fn_name,
        "time_limit_s": float(time_limit_s) if time_limit_s is not None else None,
        "memory_limit_mb": int(memory_limit_mb) if memory_limit_mb is not None else None,
        "language": language,
        "checker": checker,
        "input_mode": input_mode,
        "input_file": input_file,
        "output_file": output_file,
    }


def validate_record(record: Mapping[str, Any], where: str = "record") -> None:
    """Raise PIPOError (a ValueError) naming `where` and the field when a record breaks the contract."""
    for key, kind in (("id", str), ("benchmark", str), ("prompt", str), ("metadata", dict)):
        if not isinstance(record.get(key), kind):
            raise PIPOError(f"{where}: field {key!r} must be a {kind.__name__}, got {record.get(key)!r:.80}")
    grader = record["metadata"].get("grader")
    if grader not in GRADERS:
        raise PIPOError(f"{where}: metadata.grader must be one of {GRADERS}, got {grader!r}")
    answer, tests = record.get("answer"), record.get("tests")
    if grader in ("math", "mcq") and not isinstance(answer, str):
        raise PIPOError(f"{where}: a {grader} record needs a string 'answer', got {answer!r}")
    if grader == "mcq":
        choices = record["metadata"].get("choices")
        if not isinstance(choices, list) or answer not in LETTERS[: len(choices)]:
            raise PIPOError(f"{where}: an mcq record needs metadata.choices and a letter answer within them")
    if grader == "code":
        check_tests(tests, where)


def check_tests(tests: Any, where: str = "") -> None:
    """A code record's `tests`: a format in TEST_FORMATS and equally long lists of strings (a string
    would be iterated character by character, each character a "test")."""
    at = f"{where}: " if where else ""
    if not isinstance(tests, dict) or tests.get("format") not in TEST_FORMATS:
        raise PIPOError(f"{at}tests: a code record needs 'tests' with format in {TEST_FORMATS}")
    for key in ("inputs", "outputs"):
        values = tests.get(key)
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise PIPOError(f"{at}tests.{key}: must be a list of strings, got {type(values).__name__}")
    if len(tests["inputs"]) != len(tests["outputs"]):
        raise PIPOError(f"{at}tests: inputs and outputs differ in length "
                        f"({len(tests['inputs'])} vs {len(tests['outputs'])})")
    if tests.get("language", "python") not in CODE_LANGUAGES:
        raise PIPOError(f"{at}tests.language: must be one of {CODE_LANGUAGES}, got {tests.get('language')!r}")
    mode = tests.get("input_mode", "stdio")
    if mode not in INPUT_MODES or (mode == "file") != bool(tests.get("input_file") and tests.get("output_file")):
        raise PIPOError(f"{at}tests.input_mode: must be 'stdio', or 'file' with input_file and output_file")


# ------------------------------------------------------------------------ prompts


def math_prompt(question: str) -> str:
    """docs/method.md section 7: the instruction, then the question."""
    return f"{MATH_INSTRUCTION}\n\n{question.strip()}"


def mcq_prompt(question: str, choices: Sequence[str]) -> str:
    """Question, lettered choices, then the instruction to box the letter."""
    lines = [f"{LETTERS[i]}) {choice}" for i, choice in enumerate(choices)]
    return f"{question.strip()}\n\n" + "\n".join(lines) + f"\n\n{MCQ_INSTRUCTION}"


_LANGUAGE_NAMES = {"python": ("Python 3", "python"), "cpp": ("C++17", "cpp")}


def code_prompt(
    statement: str,
    starter_code: str | None = None,
    *,
    language: str = "python",
    input_file: str | None = None,
    output_file: str | None = None,
) -> str:
    """A code problem's statement plus how to answer: one fenced block in `language`, reading
    stdin (or `input_file`) and writing stdout (or `output_file`), or completing starter code."""
    name, fence = _LANGUAGE_NAMES[language]
    head = (
        f"You will be given a competitive programming problem. Write a correct {name} "
        f"program that solves it and passes all tests.\n\nQuestion: {statement.strip()}\n\n"
    )
    if starter_code and starter_code.strip():
        return head + (
            "Complete the following starter code, keeping its class and function signature, "
            f"and give the whole solution in a single ```{fence} code block:\n"
            f"```{fence}\n{starter_code.rstrip()}\n```"
        )
    if input_file and output_file:
        io = f"Read the input from the file {input_file} and write the answer to the file {output_file}."
    else:
        io = "Read the input from standard input and write the answer to standard output."
    return head + f"{io} Give the whole program in a single ```{fence} code block."


# -------------------------------------------------------------------------- seeds


def stable_seed(*parts: object) -> int:
    """A seed from the parts that is the same in every process (unlike hash())."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def shuffled_choices(correct: str, incorrect: list[str], seed: int, qid: str) -> tuple[list[str], str]:
    """Shuffle the options with a per-question seed; return them and the correct letter.

    The seed depends only on the global seed and the question id, so the order is the
    same in every process and does not change when other questions are added.
    """
    choices = [correct, *incorrect]
    order = list(range(len(choices)))
    random.Random(stable_seed("mcq-shuffle", seed, qid)).shuffle(order)
    shuffled = [choices[i] for i in order]
    return shuffled, LETTERS[order.index(0)]


# ------------------------------------------------------------------------ reading


def read_records(path: str | Path) -> list[Record]:
    """Read a JSONL of records, validating each one (errors name file and line)."""
    rows = read_jsonl(path)
    for lineno, row in enumerate(rows, start=1):
        validate_record(row, where=f"{path}: record {lineno}")
    return rows


# ---------------------------------------------------------------- hub / local data


@dataclass(frozen=True)
class HubDataset:
    """Where a dataset lives on the Hub and how its files are laid out there.

    `files` are glob patterns relative to the repository root for `split` of
    `config`; they let a local copy in the hub's layout load without the network.
    `script_based` marks repos whose Hub loader is a Python script (unsupported
    by datasets >= 4): those are fetched as files with huggingface_hub instead.
    """

    repo: str
    config: str | None
    split: str
    files: tuple[str, ...]
    script_based: bool = False


_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def is_local(source: str | Path) -> bool:
    """A source is local when it names an existing path; otherwise it is a hub id."""
    return Path(source).exists()


def local_data_files(root: Path, patterns: Sequence[str]) -> list[Path]:
    """Files under `root` matching the hub-layout patterns, in pattern then name order."""
    if root.is_file():
        return [root]
    found: list[Path] = []
    for pattern in patterns:
        found.extend(p for p in sorted(root.glob(pattern)) if p.is_file() and p not in found)
    if not found:
        raise FileNotFoundError(f"no data files matching {list(patterns)} under {root}")
    return found


def _builder_for(files: Sequence[Path]) -> str:
    """The datasets packaged builder that reads these files (they must share one format)."""
    suffixes = {p.suffix.lower() for p in files}
    builders = {_BUILDERS.get(s) for s in suffixes}
    if len(builders) != 1 or None in builders:
        raise PIPOError(f"cannot read data files with suffixes {sorted(suffixes)}: {[str(p) for p in files]}")
    return builders.pop()


class GatedDatasetError(PIPOError):
    """A gated hub dataset was asked for without a token whose account accepted its terms."""


def _refused_as_gated(exc: BaseException) -> bool:
    """True when the hub refused a gated repo anywhere in the error's chain (datasets wraps
    huggingface_hub's GatedRepoError in its own DatasetNotFoundError)."""
    from huggingface_hub.errors import GatedRepoError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, GatedRepoError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def gated_hint(repo: str) -> Iterator[None]:
    """Turn a gated-repo refusal into one line that says how to get access."""
    try:
        yield
    except Exception as exc:
        if not _refused_as_gated(exc):
            raise
        raise GatedDatasetError(
            f"{repo} is a gated dataset on the Hugging Face Hub: accept its terms at "
            f"https://huggingface.co/datasets/{repo} and give a token of that account "
            "(HF_TOKEN, or `hf auth login` / `huggingface-cli login`)"
        ) from exc


def load_rows(
    spec: HubDataset,
    source: str | Path | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> Any:
    """Load `spec` as a datasets.Dataset from a hub id (default spec.repo) or a local path.

    A local path may be a snapshot folder in the hub's layout or one data file. A gated
    hub dataset without access raises GatedDatasetError (one line: what to do).
    """
    import datasets  # heavy import, only when data is actually read

    source = spec.repo if source is None else source
    cache = str(cache_dir) if cache_dir is not None else None
    if not is_local(source):
        with gated_hint(str(source)):
            if not spec.script_based:
                return datasets.load_dataset(
                    str(source), spec.config, split=spec.split, revision=revision, cache_dir=cache
                )
            source = snapshot(str(source), spec.files, revision=revision)
    files = local_data_files(Path(source), spec.files)
    return datasets.load_dataset(
        _builder_for(files), data_files=[str(p) for p in files], split="train", cache_dir=cache
    )


def snapshot(repo: str, patterns: Sequence[str], *, revision: str | None = None) -> Path:
    """Download only the files matching `patterns` of a hub dataset repo; return the folder."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, repo_type="dataset", revision=revision, allow_patterns=list(patterns)))


def require(row: Mapping[str, Any], field: str, where: str) -> Any:
    """A row's field, or a PIPOError naming the dataset row and the missing field."""
    if field not in row or row[field] is None:
        raise PIPOError(f"{where}: missing field {field!r} (fields present: {sorted(row)})")
    return row[field]



def normalise_rows(
    rows: Any,
    to_record: Callable[[Mapping[str, Any], int, str], Record | None],
    *,
    name: str,
    where: str,
    limit: int | None = None,
) -> list[Record]:
    """Map dataset rows to records with a progress bar; None drops a row; ids must be unique.

    `to_record(row, position, where)`: `where` names the data (repo, source and row) so
    an error points at the bad row.
    """
    from tqdm.auto import tqdm

    records: list[Record] = []
    seen: set[str] = set()
    total = len(rows) if hasattr(rows, "__len__") else None
    for index, row in enumerate(tqdm(rows, desc=f"normalising {name}", unit="row", total=total)):
        if limit is not None and len(records) >= limit:
            break
        row_where = f"{where} row {index}"
        record = to_record(row, index, row_where)
        if record is None:
            continue
        if record["id"] in seen:
            raise PIPOError(f"{row_where}: duplicate id {record['id']!r}")
        seen.add(record["id"])
        records.append(record)
    return records


def load_records(
    spec: HubDataset,
    to_record: Callable[[Mapping[str, Any], int, str], Record | None],
    source: str | Path | None = None,
    *,
    name: str,
    limit: int | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> list[Record]:
    """Read `spec` (hub id or local copy, see load_rows) and normalise its rows (see normalise_rows)."""
    rows = load_rows(spec, source, revision=revision, cache_dir=cache_dir)
    where = f"{spec.repo} ({source if source is not None else 'hub'})"
    return normalise_rows(rows, to_record, name=name, where=where, limit=limit)
