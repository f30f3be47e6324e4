"""`pipo serve` through the official `openai` client on loopback: a real uvicorn server over the engine."""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

# the serving stack (installed with the project; a bare GPU machine running `pytest -m gpu` may lack it)
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
OpenAI = pytest.importorskip("openai").OpenAI
pytest.importorskip("fastapi")

from pipo import PIPOForCausalLM  # noqa: E402
from pipo.engine import Engine  # noqa: E402
from pipo.model.sampling import GREEDY  # noqa: E402
from pipo.serve.app import create_app  # noqa: E402
from pipo.serve.protocol import GenerationRequest, RequestError, parse_request  # noqa: E402
from pipo.serve.runner import EngineRunner  # noqa: E402
from pipo.serve.stream import TextStream, split_reasoning  # noqa: E402

MODEL = "tiny-pipo"
PROMPTS = ["1 + 2 =", "7 * 3 =", "the answer is", "5 - 4 =", "2 + 2 + 2 ="]


@pytest.fixture(scope="module")
def checkpoint(backbone_dir, tmp_path_factory):
    """A tiny PIPO checkpoint folder (qwen3_5 backbone with native MTP weights) with its tokenizer; this seed's
    random weights write varied greedy text (other seeds repeat one token), partial UTF-8 included."""
    from transformers import AutoTokenizer

    source = backbone_dir("qwen3_5", with_mtp=True, seed=1)
    out = tmp_path_factory.mktemp("pipo_ckpt")
    torch.manual_seed(0)
    PIPOForCausalLM.from_backbone(str(source)).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(out)
    return out


def _engine(checkpoint) -> Engine:
    return Engine(checkpoint, "pipo", max_batch_size=8, max_seq_len=256, conf_threshold=0.5, dtype=torch.float32)


@pytest.fixture(scope="module")
def server(checkpoint):
    """Base URL of a server on a free loopback port, its runner, and the engine behind it."""
    engine = _engine(checkpoint)
    runner = EngineRunner(engine)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(runner, MODEL), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", runner, engine
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def expected(checkpoint):
    """Greedy chat completions of `PROMPTS` from a separate engine (what `pipo generate` writes)."""
    engine = _engine(checkpoint)
    results = engine.generate([[{"role": "user", "content": p}] for p in PROMPTS], GREEDY, max_new_tokens=12)
    return [r[0].text for r in results]


def chat(client, prompt, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=kw.pop("max_tokens", 12), **kw)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"


def test_chat_greedy_matches_generate_and_reports_pipo_usage(client, expected):
    out = chat(client, PROMPTS[0], temperature=0)
    assert out.choices[0].message.content == expected[0]
    assert out.choices[0].finish_reason in ("stop", "length")
    usage = out.model_dump()["usage"]
    assert usage["completion_tokens"] > 0 and usage["pipo"]["forward_passes"] > 0
    assert usage["pipo"]["tokens_per_forward"] == pytest.approx(
        usage["completion_tokens"] / usage["pipo"]["forward_passes"], abs=1e-3)


def test_chat_stream_equals_whole_response_and_ends_with_usage(client, expected):
    chunks = list(chat(client, PROMPTS[1], temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected[1]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_completions_stream_and_not(client, server):
    engine = server[2]
    whole = client.completions.create(model=MODEL, prompt="1 + 2 =", max_tokens=10, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="1 + 2 =", max_tokens=10, temperature=0, stream=True))
    assert whole.choices[0].text == streamed
    ids = engine.tokenizer("1 + 2 =", add_special_tokens=False)["input_ids"]
    assert whole.usage.prompt_tokens == len(ids)


def test_n_samples_and_seed_reproducibility(client):
    a = chat(client, PROMPTS[2], temperature=1.0, n=3, seed=7, max_tokens=16)
    b = chat(client, PROMPTS[2], temperature=1.0, n=3, seed=7, max_tokens=16)
    assert len(a.choices) == 3 and sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


def test_stop_string_cuts_the_text(client, expected):
    full = expected[1]
    stop = full[9:11]
    assert stop and full.find(stop) > 0
    out = chat(client, PROMPTS[1], temperature=0, stop=[stop])
    assert out.choices[0].message.content == full[: full.find(stop)]
    assert out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       chat(client, PROMPTS[1], temperature=0, stop=[stop], stream=True) if c.choices)
    assert streamed == full[: full.find(stop)]


def test_32_concurrent_clients_all_answered_correctly(client, expected):
    jobs = [i % len(PROMPTS) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        outs = list(pool.map(lambda i: chat(client, PROMPTS[i], temperature=0).choices[0].message.content, jobs))
    assert outs == [expected[i] for i in jobs]


@pytest.mark.parametrize("body, status, param", [
    ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 422, "temperature"),
    ({"model": MODEL, "messages": [{"content": "hi"}]}, 422, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x " * 400}]}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, 400, "max_tokens"),
])
def test_bad_requests_get_openai_errors_while_others_are_served(server, client, expected, body, status, param):
    with ThreadPoolExecutor(1) as pool:
        good = pool.submit(lambda: chat(client, PROMPTS[3], temperature=0).choices[0].message.content)
        response = httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=60)
        assert good.result() == expected[3]
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and error["message"]


def test_malformed_json_is_400(server):
    response = httpx.post(server[0] + "/v1/chat/completions", content=b'{"model": ', timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


def test_disconnect_mid_stream_frees_the_sequence(server):
    url, runner, engine = server
    body = {"model": MODEL, "messages": [{"role": "user", "content": "count"}], "max_tokens": 200,
            "temperature": 1.0, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:]).get("choices"):
                break  # the first chunk arrived: the sequence is running; now hang up
    deadline = time.monotonic() + 30
    while runner.live or engine.has_unfinished():
        assert time.monotonic() < deadline, "the aborted sequence was never freed"
        time.sleep(0.05)


def test_parse_request_rejects_nan_and_names_the_field():
    with pytest.raises(RequestError) as err:
        parse_request({"model": MODEL, "prompt": "x", "top_p": float("nan")}, chat=False, model_name=MODEL)
    assert err.value.status == 400 and err.value.param == "top_p"


def test_reasoning_split_and_stream_never_takes_text_back(checkpoint):
    from transformers import AutoTokenizer

    assert split_reasoning("<think>\nplan</think>\n\nanswer", thinking=False) == ("\nplan", "answer")
    assert split_reasoning("plan</think>answer", thinking=True) == ("plan", "answer")
    assert split_reasoning("still planning", thinking=True) == ("still planning", "")
    assert split_reasoning("no thinking", thinking=False) == (None, "no thinking")
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    ids = tokenizer("plan more</think>the answer END tail", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, ("END",), split=True, thinking=True)
    reasoning = content = ""
    for i in range(1, len(ids) + 1):
        if "END" in tokenizer.decode(ids[:i]):
            break  # the engine finishes the sample at the token that completes a stop string
        r, c = stream.push(ids[:i])
        reasoning, content = reasoning + r, content + c
        assert "END"[:2] not in content  # a stop string's start is held back until the engine decides
    r, c = stream.finish("plan more</think>the answer ")
    reasoning, content = reasoning + r, content + c
    assert (reasoning, content) == split_reasoning("plan more</think>the answer ", thinking=True)


@pytest.mark.parametrize("method, fits", [("regular", True), ("pipo", False)])
def test_max_tokens_room_pads_odd_prompts_only_for_pipo(method, fits):
    """A 15-token prompt in a 16-token context leaves one token, except for PIPO, which pads it to pairs."""
    runner = EngineRunner(SimpleNamespace(max_seq_len=16, method=method))
    request = GenerationRequest(chat=False, prompt=list(range(15)), sampling=GREEDY, max_tokens=1)
    if fits:
        assert runner._max_tokens(request, list(range(15))) == 1
    else:
        with pytest.raises(RequestError, match="exceed this server's context of 16 tokens"):
            runner._max_tokens(request, list(range(15)))
