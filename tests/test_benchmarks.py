"""Benchmark and training-source loaders read hub-layout fixtures offline into the record schema."""
from __future__ import annotations

import base64
import io
import json
import pickle
import uuid
import zlib
from pathlib import Path

import pandas as pd
import pytest

from pipo.data.problems import LETTERS, MATH_INSTRUCTION, read_records, validate_record
from pipo.data.sources import dapo_question, load_codeforces_prompts, load_dapo_math, load_prompt_source
from pipo.errors import PIPOError
from pipo.eval.tasks import BENCHMARKS, decode_lcb_tests, load_benchmark
from pipo.jsonl import read_jsonl, write_jsonl
from tests import fixtures_hub as hub


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    hub.block_network(monkeypatch)


@pytest.fixture()
def cache(tmp_path: Path) -> Path:
    return tmp_path / "hf-cache"


def _check_all(records: list[dict]) -> None:
    for i, record in enumerate(records):
        validate_record(record, where=f"record {i}")
        assert set(record) == {"id", "benchmark", "prompt", "answer", "tests", "metadata"}


def test_aime25(tmp_path: Path, cache: Path) -> None:
    rows = hub.write_aime25(tmp_path / "aime25")
    records = load_benchmark("aime25", tmp_path / "aime25", cache_dir=cache)
    _check_all(records)
    assert [r["answer"] for r in records] == [row["answer"] for row in rows]
    assert records[1]["id"] == "aime25/1" and records[1]["metadata"]["grader"] == "math"
    assert records[1]["prompt"] == f"{MATH_INSTRUCTION}\n\nFind the sum of 1 and 2."


def test_gpqa_shuffle_is_deterministic_per_question(tmp_path: Path, cache: Path) -> None:
    rows = hub.write_gpqa_diamond(tmp_path / "gpqa")
    first = load_benchmark("gpqa_diamond", tmp_path / "gpqa", seed=7, cache_dir=cache)
    again = load_benchmark("gpqa_diamond", tmp_path / "gpqa", seed=7, cache_dir=cache)
    other = load_benchmark("gpqa_diamond", tmp_path / "gpqa", seed=8, cache_dir=cache)
    _check_all(first)
    assert first == again
    assert [r["metadata"]["choices"] for r in first] != [r["metadata"]["choices"] for r in other]
    assert len({r["answer"] for r in first}) > 1  # the correct answer is not always in one slot
    for record, row in zip(first, rows):
        choices = record["metadata"]["choices"]
        assert choices[LETTERS.index(record["answer"])] == row["Correct Answer"].strip()
        assert sorted(choices) == sorted(
            [row["Correct Answer"].strip()] + [row[f"Incorrect Answer {i}"] for i in (1, 2, 3)]
        )
        assert "A) " in record["prompt"] and "D) " in record["prompt"] and "\\boxed{" in record["prompt"]

    # The order depends on the question id, not on its position in the file.
    hub.write_gpqa_diamond(tmp_path / "reversed")
    csv = tmp_path / "reversed" / "gpqa_diamond.csv"
    pd.read_csv(csv).iloc[::-1].to_csv(csv, index=False)
    reordered = {r["id"]: r for r in load_benchmark("gpqa_diamond", csv.parent, seed=7, cache_dir=cache)}
    assert all(reordered[r["id"]] == r for r in first)


def test_livecodebench_date_filter_and_private_tests(tmp_path: Path, cache: Path) -> None:
    hub.write_livecodebench(tmp_path / "lcb")
    records = {r["id"]: r for r in load_benchmark("livecodebench", tmp_path / "lcb", cache_dir=cache)}
    _check_all(list(records.values()))
    # 2025-01-31T18:30:00 and 23:59:59 fall before the window, 2025-02-01T00:00:00 inside it
    assert sorted(records) == ["livecodebench/edge-on", "livecodebench/new-func", "livecodebench/new-stdin"]
    assert records["livecodebench/edge-on"]["metadata"]["contest_date"] == "2025-02-01"

    stdin = records["livecodebench/new-stdin"]
    assert stdin["tests"] == {
        "format": "stdin",
        "inputs": ["1 2\n", "5 7\n", "0 0\n"],
        "outputs": ["3\n", "12\n", "0\n"],
        "fn_name": None,
        "time_limit_s": None,
        "memory_limit_mb": None,
        "language": "python",
        "checker": None,
        "input_mode": "stdio",
        "input_file": None,
        "output_file": None,
    }
    assert "standard input" in stdin["prompt"] and "```python" in stdin["prompt"]

    func = records["livecodebench/new-func"]
    assert func["tests"]["format"] == "functional" and func["tests"]["fn_name"] == "add"
    assert func["tests"]["inputs"] == ["1\n2", "5\n7", "0\n0"] and func["tests"]["outputs"] == ["3", "12", "0"]
    assert "class Solution:" in func["prompt"] and func["metadata"]["contest_date"] == "2025-04-02"


def test_code_records_grade_with_the_project_grader(tmp_path: Path, cache: Path) -> None:
    """The tests block is what pipo.eval.graders runs: right programs pass, wrong ones fail."""
    from pipo.eval.graders import grade

    hub.write_livecodebench(tmp_path / "lcb")
    records = {r["id"]: r for r in load_benchmark("livecodebench", tmp_path / "lcb", cache_dir=cache)}
    stdin_ok = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    func_ok = "```python\nclass Solution:\n    def add(self, a, b):\n        return a + b\n```"
    func_bad = func_ok.replace("a + b", "a - b")
    assert grade("code", stdin_ok, tests=records["livecodebench/new-stdin"]["tests"]).correct
    assert grade("code", func_ok, tests=records["livecodebench/new-func"]["tests"]).correct
    assert not grade("code", func_bad, tests=records["livecodebench/new-func"]["tests"]).correct


def test_lcb_decoding_refuses_pickled_objects() -> None:
    tests = [{"input": "x", "output": "y", "testtype": "stdin"}]
    assert decode_lcb_tests(hub.encode_lcb_private(tests)) == tests
    assert decode_lcb_tests(json.dumps(tests)) == tests
    evil = base64.b64encode(zlib.compress(pickle.dumps(io.BytesIO(b"")))).decode()
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        decode_lcb_tests(evil)


def test_longbench_short_subset(tmp_path: Path, cache: Path) -> None:
    rows = hub.write_longbench_v2(tmp_path / "lb")
    records = load_benchmark("longbench_v2", tmp_path / "lb", cache_dir=cache)
    _check_all(records)
    short = [r for r in rows if r["length"] == "short"]
    assert [r["id"] for r in records] == [f"longbench_v2/{r['_id']}" for r in short]
    for record, row in zip(records, short):
        assert record["answer"] == row["answer"]
        assert record["metadata"]["choices"] == ["red", "green", "blue", "black"]
        assert record["metadata"]["truncation"] == "middle"
        assert row["context"] in record["prompt"] and "C) blue" in record["prompt"]


def _words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def test_longbench_middle_truncation_keeps_head_and_tail_within_budget(tmp_path: Path, cache: Path) -> None:
    """A context far over budget is cut in the middle with the model's tokenizer: the prompt as
    the engine encodes it (chat template included) fits, the start of the document and the
    question/choices at the end survive, and the token counts are recorded."""
    from pipo.engine.parts import encode_prompt
    from pipo.eval.truncation import fit_to_model, middle_truncate
    from pipo.model.tiny import default_corpus, train_tokenizer

    tokenizer = train_tokenizer(default_corpus(200))
    tokenizer.save_pretrained(tmp_path / "tok")
    long_context = "BEGIN-OF-DOC " + _words(3000) + " END-OF-DOC"
    hub.write_longbench_v2(tmp_path / "lb", [hub.longbench_row(0, context=long_context), hub.longbench_row(2)])
    records = load_benchmark("longbench_v2", tmp_path / "lb", cache_dir=cache)
    fitted = fit_to_model(records, tmp_path / "tok", {"max_seq_len": 700, "max_new_tokens": 200})
    _check_all(fitted)

    cut, whole = fitted[0], fitted[1]
    tokens = cut["metadata"]["prompt_tokens"]
    assert tokens["budget"] == 500 and tokens["original"] > 5 * 500
    assert tokens["kept"] == len(encode_prompt(tokenizer, cut["prompt"])) and 490 <= tokens["kept"] <= 500
    assert cut["prompt"].startswith("Please read the following text") and "BEGIN-OF-DOC w0 w1" in cut["prompt"]
    assert cut["prompt"].endswith(records[0]["prompt"][-200:])  # question, choices, instruction kept
    assert "w1500 " not in cut["prompt"] and "END-OF-DOC" in cut["prompt"]
    # the cut prompt is a prefix of the original then a suffix of it, each about half
    text, original = cut["prompt"], records[0]["prompt"]
    prefix = next(i for i, (a, b) in enumerate(zip(text, original)) if a != b)
    suffix = next(i for i, (a, b) in enumerate(zip(text[::-1], original[::-1])) if a != b)
    assert prefix + suffix >= len(text) - 3 and min(prefix, suffix) > 0.35 * len(text)
    # a prompt within budget is kept whole, with its count recorded
    assert whole["prompt"] == records[1]["prompt"]
    assert whole["metadata"]["prompt_tokens"]["original"] == whole["metadata"]["prompt_tokens"]["kept"] < 500

    # an explicit budget wins; one too small for the chat template alone is one clear error
    assert middle_truncate(tokenizer, records[0]["prompt"], 120)[2] <= 120
    with pytest.raises(ValueError, match="no room for the text"):
        middle_truncate(tokenizer, records[0]["prompt"], 3)


def test_pipo_benchmark_cli_fits_longbench_prompts(tmp_path: Path, cache: Path) -> None:
    from pipo.cli import main
    from pipo.model.tiny import default_corpus, train_tokenizer

    train_tokenizer(default_corpus(200)).save_pretrained(tmp_path / "tok")
    hub.write_longbench_v2(tmp_path / "lb", [hub.longbench_row(0, context=_words(3000))])
    out = tmp_path / "bench.jsonl"
    assert main(["benchmark", "--name", "longbench_v2", "--source", str(tmp_path / "lb"), "--output", str(out),
                 "--tokenizer", str(tmp_path / "tok"), "--prompt-budget", "300"]) == 0
    (record,) = read_records(out)
    assert record["metadata"]["prompt_tokens"]["budget"] == 300 and record["metadata"]["prompt_tokens"]["kept"] <= 300
    assert main(["benchmark", "--name", "longbench_v2", "--source", str(tmp_path / "lb"), "--output", str(out),
                 "--tokenizer", str(tmp_path / "tok")]) == 2  # no budget and no max-seq-len: an error
    assert read_records(out) == [record]  # and the file is left as it was


def test_dapo_split_is_disjoint_and_complete(tmp_path: Path, cache: Path) -> None:
    rows = hub.write_dapo_math(tmp_path / "dapo", n=20)
    sft = load_dapo_math(tmp_path / "dapo", "sft", cache_dir=cache)
    rl = load_dapo_math(tmp_path / "dapo", "rl", cache_dir=cache)
    everything = load_dapo_math(tmp_path / "dapo", "all", cache_dir=cache)
    _check_all(everything)
    assert (len(sft), len(rl)) == (18, 2)
    assert not {r["id"] for r in sft} & {r["id"] for r in rl}
    assert [r["id"] for r in sft + rl] == [r["id"] for r in everything]
    assert [r["answer"] for r in everything] == [row["solution"] for row in rows]
    assert {r["metadata"]["split"] for r in sft} == {"sft"} and {r["metadata"]["split"] for r in rl} == {"rl"}
    assert load_dapo_math(tmp_path / "dapo", "rl", limit=1, cache_dir=cache) == rl[:1]


def test_dapo_uuid_index_and_both_prompt_forms(tmp_path: Path, cache: Path) -> None:
    """`extra_info.index` is a UUID string (the id); a bare prompt and one inside DAPO's
    "Answer:" wrapper give the same clean question under the instruction of docs/method.md section 7."""
    rows = hub.write_dapo_math(tmp_path / "dapo", n=4)
    records = load_dapo_math(tmp_path / "dapo", cache_dir=cache)
    assert [r["id"] for r in records] == [f"dapo_math/{row['extra_info']['index']}" for row in rows]
    assert str(uuid.UUID(rows[0]["extra_info"]["index"])) == rows[0]["extra_info"]["index"]
    assert "Answer:" not in rows[2]["prompt"] and "Answer:" in rows[3]["prompt"]
    for i in (2, 3):
        assert records[i]["prompt"] == f"{MATH_INSTRUCTION}\n\nWhat is {i} squared?"
    assert dapo_question(rows[3]["prompt"]) == dapo_question(" What is 3 squared?\n") == "What is 3 squared?"


def test_codeforces_prompts_keep_python_and_cpp_with_checker_fields(tmp_path: Path, cache: Path) -> None:
    hub.write_codeforces_prompts(tmp_path / "cf")
    records = {r["id"]: r for r in load_codeforces_prompts(tmp_path / "cf", cache_dir=cache)}
    _check_all(list(records.values()))
    # one record per problem and language; the interactive problem is dropped
    assert sorted(records) == ["codeforces/1/A/cpp", "codeforces/1/A/python", "codeforces/2/B/cpp", "codeforces/4/D/python"]

    python, cpp = records["codeforces/1/A/python"], records["codeforces/1/A/cpp"]
    assert python["tests"] == {
        "format": "stdin", "inputs": ["1 2\n", "4 5\n"], "outputs": ["3\n", "9\n"], "fn_name": None,
        "time_limit_s": 2.0, "memory_limit_mb": 256, "language": "python", "checker": None,
        "input_mode": "stdio", "input_file": None, "output_file": None,
    }
    assert cpp["tests"] == {**python["tests"], "language": "cpp"}
    assert "```python" in python["prompt"] and "Python 3" in python["prompt"]
    assert "```cpp" in cpp["prompt"] and "C++17" in cpp["prompt"] and "```python" not in cpp["prompt"]
    assert "Given a and b, print a + b." in cpp["prompt"] and "Example 1" in cpp["prompt"]
    assert python["metadata"]["split"] == cpp["metadata"]["split"]  # a problem's languages stay together

    checked = records["codeforces/2/B/cpp"]["tests"]
    assert checked["checker"] == hub.SUM_CHECKER and checked["language"] == "cpp"
    file_io = records["codeforces/4/D/python"]
    assert (file_io["tests"]["input_mode"], file_io["tests"]["input_file"], file_io["tests"]["output_file"]) == (
        "file", "input.txt", "output.txt")
    assert "from the file input.txt" in file_io["prompt"] and "to the file output.txt" in file_io["prompt"]
    assert "standard input" not in file_io["prompt"]

    only_python = load_codeforces_prompts(tmp_path / "cf", languages=("python",), cache_dir=cache)
    assert [r["id"] for r in only_python] == ["codeforces/1/A/python", "codeforces/4/D/python"]


def test_codeforces_sft_rl_split_by_problem_hash(tmp_path: Path, cache: Path) -> None:
    """About `sft_fraction` of the problems go to SFT, the rest to RL; the part of a problem
    depends on its id only (not on row order), and the prompt source passes the fraction on."""
    rows = [hub.codeforces_row(f"{i}/A") for i in range(400)]
    hub.write_codeforces_prompts(tmp_path / "cf", rows)
    hub.write_codeforces_prompts(tmp_path / "reversed", rows[::-1])

    parts = {r["id"]: r["metadata"]["split"] for r in load_codeforces_prompts(tmp_path / "cf", cache_dir=cache)}
    assert abs(sum(p == "sft" for p in parts.values()) / 400 - 0.9) < 0.05
    reordered = load_codeforces_prompts(tmp_path / "reversed", cache_dir=cache)
    assert {r["id"]: r["metadata"]["split"] for r in reordered} == parts

    seventy = load_prompt_source("codeforces", tmp_path / "cf", sft_fraction=0.7)
    assert abs(sum(r["metadata"]["split"] == "sft" for r in seventy) / 400 - 0.7) < 0.06
    rl = load_codeforces_prompts(tmp_path / "cf", "rl", sft_fraction=0.7, cache_dir=cache)
    assert {r["id"] for r in rl} == {r["id"] for r in seventy if r["metadata"]["split"] == "rl"}
    assert {r["id"] for r in rl} >= {i for i, p in parts.items() if p == "rl"}  # a larger RL share only adds problems
    with pytest.raises(ValueError, match="sft_fraction must be in"):
        load_codeforces_prompts(tmp_path / "cf", sft_fraction=1.0)


def test_registry_limit_and_unknown(tmp_path: Path, cache: Path) -> None:
    assert {"aime25", "gpqa_diamond", "livecodebench", "longbench_v2", "synthetic_math", "synthetic_mcq"} <= set(
        BENCHMARKS
    )
    hub.write_aime25(tmp_path / "aime25", n=5)
    assert len(load_benchmark("aime25", tmp_path / "aime25", limit=2, cache_dir=cache)) == 2
    with pytest.raises(PIPOError, match="unknown benchmark 'nope'"):
        load_benchmark("nope", tmp_path)


def test_synthetic_benchmarks_from_generator_and_file(tmp_path: Path) -> None:
    generated = load_benchmark("synthetic_mcq", None, limit=5, seed=3)
    _check_all(generated)
    assert len(generated) == 5 and {r["benchmark"] for r in generated} == {"synthetic_mcq"}
    write_jsonl(tmp_path / "test.jsonl", generated)
    assert load_benchmark("synthetic_mcq", tmp_path / "test.jsonl", limit=2) == generated[:2]


def test_missing_field_names_row_and_field(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "aime25").mkdir()
    (tmp_path / "aime25" / "test.jsonl").write_text('{"id": "0", "problem": "p", "answer": "1"}\n{"id": "1", "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"row 1: missing field 'problem'"):
        load_benchmark("aime25", tmp_path / "aime25", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="no data files matching"):
        load_benchmark("longbench_v2", tmp_path / "aime25", cache_dir=cache)


def test_jsonl_roundtrip_atomic_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "out" / "rows.jsonl"
    write_jsonl(path, [{"a": 1}, {"b": "é"}])
    assert read_jsonl(path) == [{"a": 1}, {"b": "é"}]
    assert [p.name for p in path.parent.iterdir()] == ["rows.jsonl"]  # no temp file left behind
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: invalid JSON"):
        read_jsonl(path)
    path.write_text('{"id": "x", "benchmark": "b", "prompt": "p", "answer": null, "tests": null, "metadata": {"grader": "math"}}\n')
    with pytest.raises(ValueError, match=r"record 1: a math record needs a string 'answer'"):
        read_records(path)


def test_hub_ids_go_through_load_dataset_or_snapshot(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub ids: datasets.load_dataset(repo, config, split, revision), whose rows are mapped like
    a local copy's; the script-based LCB repo is fetched as files (its release_v6 JSONLs)."""
    import datasets

    from pipo.data import problems

    hub.write_gpqa_diamond(tmp_path / "gpqa")
    local = load_benchmark("gpqa_diamond", tmp_path / "gpqa", seed=3, cache_dir=cache)
    hub_rows = datasets.Dataset.from_pandas(pd.read_csv(tmp_path / "gpqa" / "gpqa_diamond.csv"))
    calls: list[tuple] = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: calls.append((a, kw)) or hub_rows)
    assert load_benchmark("gpqa_diamond", revision="abc", seed=3) == local
    assert calls[-1][0] == ("Idavidrein/gpqa", "gpqa_diamond")
    assert (calls[-1][1]["split"], calls[-1][1]["revision"]) == ("train", "abc")

    monkeypatch.undo()
    hub.block_network(monkeypatch)
    hub.write_livecodebench(tmp_path / "snap")
    fetched: list[tuple] = []
    monkeypatch.setattr(problems, "snapshot", lambda repo, patterns, revision=None: fetched.append((repo, patterns)) or tmp_path / "snap")
    assert len(load_benchmark("livecodebench", cache_dir=cache)) == 3
    assert fetched == [("livecodebench/code_generation_lite", tuple(f"test{i}.jsonl" for i in ["", 2, 3, 4, 5, 6]))]


def _gated_refusal(repo: str) -> Exception:
    """What huggingface_hub raises for a gated repo without an accepted-terms token."""
    import httpx
    from huggingface_hub.errors import GatedRepoError

    request = httpx.Request("GET", f"https://huggingface.co/api/datasets/{repo}")
    return GatedRepoError(f"403 Client Error. Cannot access gated repo {repo}", response=httpx.Response(403, request=request))


def test_gated_dataset_error_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPQA is gated: datasets' wrapped refusal and a bare GatedRepoError (snapshot path) both
    become one line naming the repo, the terms page and the token; other errors pass through."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    from pipo.data import problems
    from pipo.data.problems import GatedDatasetError

    def refuse(*args, **kwargs):
        try:
            raise _gated_refusal("Idavidrein/gpqa")
        except Exception as exc:
            raise DatasetNotFoundError("Dataset 'Idavidrein/gpqa' is a gated dataset on the Hub.") from exc

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(GatedDatasetError) as info:
        load_benchmark("gpqa_diamond")
    message = str(info.value)
    assert "\n" not in message and "Idavidrein/gpqa is a gated dataset" in message
    assert "https://huggingface.co/datasets/Idavidrein/gpqa" in message and "HF_TOKEN" in message

    def refuse_snapshot(repo, patterns, revision=None):
        raise _gated_refusal(repo)

    monkeypatch.setattr(problems, "snapshot", refuse_snapshot)
    with pytest.raises(GatedDatasetError, match="livecodebench/code_generation_lite is a gated dataset"):
        load_benchmark("livecodebench")

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: (_ for _ in ()).throw(ConnectionError("offline")))
    with pytest.raises(ConnectionError, match="offline"):
        load_benchmark("aime25")


def test_generate_rule_fits_longbench_prompts_with_the_models_tokenizer(tmp_path: Path, cache: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The workflow's generate step hands `generate_jsonl` prompts fitted to the eval section's
    budget (`prompt_budget` over max_seq_len - max_new_tokens), measured with the model folder's tokenizer."""
    import shutil

    from pipo import workflow
    from pipo.engine.options import GenerateOptions
    from pipo.model.tiny import default_corpus, train_tokenizer

    train_tokenizer(default_corpus(200)).save_pretrained(tmp_path / "model")
    hub.write_longbench_v2(tmp_path / "lb", [hub.longbench_row(i, context=_words(2000)) for i in (0, 2)])
    write_jsonl(tmp_path / "bench.jsonl", load_benchmark("longbench_v2", tmp_path / "lb", cache_dir=cache))
    handed: list[list[dict]] = []

    def fake_generate(model, method, given, output, options, *, overwrite) -> None:
        handed.append(read_jsonl(given))
        shutil.copy(given, output)

    monkeypatch.setattr(workflow, "generate_jsonl", fake_generate)
    options = GenerateOptions(max_seq_len=1000, max_new_tokens=600)
    workflow.generate_shard(tmp_path / "bench.jsonl", tmp_path / "model", "regular", tmp_path / "0.jsonl", options,
                            prompt_budget=None, shard=0, shards=1)
    assert [r["metadata"]["prompt_tokens"]["budget"] for r in handed[0]] == [400, 400]
    assert all(r["metadata"]["prompt_tokens"]["kept"] <= 400 < r["metadata"]["prompt_tokens"]["original"] for r in handed[0])
    workflow.generate_shard(tmp_path / "bench.jsonl", tmp_path / "model", "regular", tmp_path / "1.jsonl", options,
                            prompt_budget=250, shard=1, shards=2)
    assert [r["metadata"]["prompt_tokens"]["budget"] for r in handed[1]] == [250]


def test_prompt_budget_leaves_pipo_room_for_a_pad_per_new_token() -> None:
    from pipo.eval.truncation import prompt_budget, section_budget

    section = {"max_seq_len": 1000, "max_new_tokens": 300, "prompt_budget": None}
    assert section_budget(section) == 700 and section_budget(section, "eagle") == 700
    assert section_budget(section, "pipo") == 400  # rejected drafts leave a PAD in the cache
    assert section_budget({**section, "prompt_budget": 250}, "pipo") == 250
    with pytest.raises(PIPOError, match="x2 cache entries"):
        prompt_budget(1000, 600, cache_per_token=2)
