"""The OpenAI-compatible server: the official client, OpenAI error bodies, disconnects, prefix caching."""

import asyncio
import json
import time

import httpx
import pytest
from openai import OpenAI

from serving.config import EngineConfig
from serving.engine import Engine
from tests.serving.conftest import tiny_target
from tests.serving.server_utils import RunningServer


@pytest.fixture(scope="module")
def smol_server(smollm2_target):
    engine = Engine(EngineConfig(max_total_tokens=16384), smollm2_target)
    with RunningServer(engine, api_key="sk-test") as server:
        yield server


def test_openai_client_chat_completions_and_streaming(smol_server):
    client = OpenAI(base_url=smol_server.url + "/v1", api_key="sk-test")
    model = client.models.list().data[0].id
    assert model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    tok = smol_server.engine.tokenizer

    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=16, temperature=0
    )
    text = chat.choices[0].message.content
    assert text and chat.choices[0].finish_reason in ("stop", "length")
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.usage.prompt_tokens == len(tok(rendered, add_special_tokens=False)["input_ids"])
    assert 1 <= chat.usage.completion_tokens <= 16
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    comp = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert comp.usage.completion_tokens == 8 and comp.choices[0].finish_reason == "length"
    assert comp.usage.prompt_tokens == len(tok("The capital of France is")["input_ids"])

    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is 2+2?"}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == text
    assert finish == chat.choices[0].finish_reason
    assert usage.completion_tokens == chat.usage.completion_tokens

    cstream = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in cstream if c.choices) == comp.choices[0].text

    two = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, n=2, temperature=0.8, seed=3
    )
    assert [c.index for c in two.choices] == [0, 1]


def test_api_key_is_required(smol_server):
    r = httpx.get(smol_server.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "body,param",
    [
        (b"{not json", None),
        ({"model": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "prompt"),
        ({"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "prompt": "x", "temperature": -1}, "temperature"),
        ({"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "prompt": "x", "top_p": 1.01}, "top_p"),
        ({"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "prompt": "x", "max_tokens": "ten"}, "max_tokens"),
        ({"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "prompt": "x", "n": 1000}, "n"),
        ({"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "prompt": "x", "max_tokens": 9000}, "max_tokens"),
        ({"model": "no-such-model", "prompt": "x"}, "model"),
        ({"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "prompt": 5}, "prompt"),
    ],
)
def test_invalid_requests_get_openai_400(smol_server, body, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(
        smol_server.url + "/v1/completions",
        content=content,
        headers={"content-type": "application/json", "authorization": "Bearer sk-test"},
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] is not None and err["param"].split(".")[0] == param
    ok = httpx.get(smol_server.url + "/health")
    assert ok.status_code == 200


def test_chat_errors_name_the_field(smol_server):
    headers = {"authorization": "Bearer sk-test"}
    model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    r = httpx.post(smol_server.url + "/v1/chat/completions", json={"model": model, "messages": []}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(
        smol_server.url + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "wizard", "content": "x"}]},
        headers=headers,
    )
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")


def test_shared_prefix_is_cached_and_faster(smol_server):
    client = OpenAI(base_url=smol_server.url + "/v1", api_key="sk-test")
    model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    tok = smol_server.engine.tokenizer
    words = " ".join(f"item{i}" for i in range(600))
    prefix = tok(words)["input_ids"][:1000]
    assert len(prefix) == 1000

    def ttft(prompt):
        start = time.perf_counter()
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0, stream=True)
        first = None
        usage = None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - start
            if chunk.usage:
                usage = chunk.usage
        return first if first is not None else time.perf_counter() - start, usage

    cold, cold_usage = ttft(prefix + tok(" first question")["input_ids"])
    warm, warm_usage = ttft(prefix + tok(" second one")["input_ids"])
    assert cold_usage.prompt_tokens_details.cached_tokens == 0
    assert warm_usage.prompt_tokens_details.cached_tokens >= 1000
    assert warm < cold


def _assert_aborted_and_freed(server, aborted: int, start_free: int, wait_s: float):
    """The engine goes idle within wait_s, `aborted` requests ended as aborts, and flushing the prefix cache gives
    every KV slot back."""
    engine = server.engine
    deadline = time.time() + wait_s
    while time.time() < deadline and not engine.is_idle():
        time.sleep(0.05)
    assert engine.is_idle()
    metrics = httpx.get(server.url + "/metrics").text
    lines = [line for line in metrics.splitlines() if line.startswith('requests_total{finish_reason="abort"}')]
    assert lines and float(lines[0].split()[-1]) == aborted
    r = httpx.post(server.url + "/flush_cache")
    assert r.status_code == 200
    assert engine.allocator.num_free == start_free


def test_disconnects_free_their_kv():
    _, target = tiny_target()
    engine = Engine(EngineConfig(max_total_tokens=8192, max_running_requests=32), target)
    with RunningServer(engine) as server:
        start_free = engine.allocator.num_free

        async def one(i, client):
            body = {
                "model": engine.model_name,
                "prompt": [1 + i % 50, 2, 3],
                "max_tokens": 64,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            }
            chunks = 0
            async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        chunks += 1
                        if i % 10 < 3 and chunks == 5:
                            return "dropped"  # leaving the block closes the connection mid-stream
            return "done"

        async def main():
            async with httpx.AsyncClient(timeout=120) as client:
                sem = asyncio.Semaphore(20)

                async def guarded(i):
                    async with sem:
                        return await one(i, client)

                return await asyncio.gather(*(guarded(i) for i in range(100)))

        results = asyncio.run(main())
        assert results.count("dropped") == 30 and results.count("done") == 70
        # the dropped streams were cut short, not finished
        _assert_aborted_and_freed(server, aborted=30, start_free=start_free, wait_s=30)
        assert httpx.get(server.url + "/health").json() == {"status": "ok"}


@pytest.mark.parametrize("api_key", [None, "sk-test"])
def test_non_streaming_disconnects_abort_their_requests(api_key):
    """A client that gives up on a non-streaming request (a timeout, a killed process) stops its generation, with or
    without the API-key check in front of the routes."""
    _, target = tiny_target()
    engine = Engine(EngineConfig(max_total_tokens=16384, max_running_requests=8), target)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with RunningServer(engine, api_key=api_key) as server:
        start_free = engine.allocator.num_free
        body = {"model": engine.model_name, "max_tokens": 1000, "temperature": 0, "ignore_eos": True}

        async def one(i, client):
            req = {**body, "prompt": [1 + i, 2, 3]}
            try:
                r = await asyncio.wait_for(client.post(server.url + "/v1/completions", json=req, headers=headers), 0.5)
            except asyncio.TimeoutError:
                return "dropped"
            return r.status_code

        async def main():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(one(i, client) for i in range(4)))

        assert asyncio.run(main()) == ["dropped"] * 4
        # 1,000 tokens take a lone request about 4 s here: ended early or not, idle within 10 s
        _assert_aborted_and_freed(server, aborted=4, start_free=start_free, wait_s=10)


def test_stopping_server_aborts_open_streams_after_the_graceful_timeout():
    """A server told to stop (as on SIGTERM) with a stream still open waits timeout_graceful_shutdown seconds, then
    cancels it: the generation is aborted, its KV freed, and the server and engine threads exit, long before the
    stream would have ended."""
    _, target = tiny_target()
    engine = Engine(EngineConfig(max_total_tokens=8192, max_running_requests=4), target)
    step = engine.step
    engine.step = lambda: time.sleep(0.01) or step()  # >= 10 s for the 1,000 tokens below, on any machine
    server = RunningServer(engine, timeout_graceful_shutdown=0.5)
    with server:
        start_free = engine.allocator.num_free
        body = {"model": engine.model_name, "prompt": [1, 2, 3], "max_tokens": 1000, "temperature": 0,
                "ignore_eos": True, "stream": True}  # fmt: skip
        chunks = 0
        with httpx.Client(timeout=60) as client, client.stream("POST", server.url + "/v1/completions", json=body) as r:
            with pytest.raises(httpx.RemoteProtocolError):  # the stream is cut, without its final chunks
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        chunks += 1
                        if chunks == 3:
                            stopped_at = time.monotonic()
                            server.server.should_exit = True
            finished = time.monotonic() - stopped_at
        server.thread.join(timeout=10)
        assert not server.thread.is_alive()
        assert finished < 5 and chunks < 500  # cut off after about 0.5 s, not run to the end
        assert engine._thread is None  # the lifespan stopped the engine
        assert engine.is_idle()
        assert engine.metrics.registry.get_sample_value("requests_total", {"finish_reason": "abort"}) == 1
        assert engine.flush_cache() and engine.allocator.num_free == start_free
