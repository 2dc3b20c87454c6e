"""Regeneration against fake OpenAI-compatible servers started in the test (http.server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from specforge.regenerate import ServerPool, api_base, regenerate, regenerate_async


class FakeServer:
    """/v1/models and /v1/chat/completions; the answer names the server and echoes the last user message.

    fail_first: answer the first N chat requests with `fail_status`. drop: close the connection on every chat request
    without answering (a crashed server). stall_after: after N answers, hold every
    further request until `release` is set (an interrupted run). reasoning: also return reasoning_content.
    """

    def __init__(self, name, fail_first=0, fail_status=500, stall_after=None, reasoning=False, drop=False):
        self.name = name
        self.drop = drop
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.stall_after = stall_after
        self.reasoning = reasoning
        self.release = threading.Event()
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.answered = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, payload):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    n = len(server.requests)
                    stall = server.stall_after is not None and server.answered >= server.stall_after
                if server.drop:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return None
                if n <= server.fail_first:
                    return self._send(server.fail_status, {"error": {"message": "boom", "type": "server_error"}})
                if stall:
                    server.release.wait(10)
                    return self._send(503, {"error": {"message": "shutting down"}})
                question = body["messages"][-1]["content"]
                message = {"role": "assistant", "content": f"[{server.name}] re: {question}"}
                if server.reasoning:
                    message["reasoning_content"] = f"thinking about {question}"
                with server.lock:
                    server.answered += 1
                self._send(200, {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def turns(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def write_input(path, n=6):
    rows = [
        {
            "id": f"c{i}",
            "conversations": turns(("user", f"q{i}a"), ("assistant", "old"), ("user", f"q{i}b"), ("assistant", "old")),
        }
        for i in range(n)
    ]
    rows[0]["conversations"].insert(0, {"role": "system", "content": "Be terse."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_rows(path):
    return {r["id"]: r for r in map(json.loads, open(path))}


def test_replays_user_turns_and_replaces_every_assistant_turn_across_two_servers(tmp_path):
    src = write_input(tmp_path / "in.jsonl")
    with open(src, "a") as f:
        f.write('{"id": "bad", "conversations": [{"role": "assistant", "content": "x"}]}\n')
        f.write('{"id": "c1", "conversations": [{"role": "user", "content": "dup"}]}\n')
        f.write('{"id": 7, "conversations": [{"role": "user", "content": "numeric id"}]}\n')
    out = tmp_path / "out.jsonl"
    with FakeServer("s1") as s1, FakeServer("s2") as s2:
        summary = regenerate(src, str(out), [s1.url, s2.url + "/v1/"], "fake-model", concurrency=2, max_tokens=32)
        rows = read_rows(out)
        assert sorted(rows) == ["7"] + [f"c{i}" for i in range(6)]
        for i in range(6):
            conv = rows[f"c{i}"]["conversations"]
            if i == 0:
                assert conv[0] == {"role": "system", "content": "Be terse."}
                conv = conv[1:]
            assert [m["role"] for m in conv] == ["user", "assistant", "user", "assistant"]
            assert conv[0]["content"] == f"q{i}a" and conv[2]["content"] == f"q{i}b"
            assert conv[1]["content"].endswith(f"] re: q{i}a") and conv[3]["content"].endswith(f"] re: q{i}b")
        # The second turn is asked with the regenerated first answer in the history, not the original one.
        second = [r for r in s1.requests + s2.requests if r["messages"][-1]["content"] == "q3b"][0]
        assert second["messages"][:2] == [{"role": "user", "content": "q3a"}, rows["c3"]["conversations"][1]]
        assert all(
            r["model"] == "fake-model" and r["max_tokens"] == 32 and r["temperature"] == 0.0 for r in s1.requests
        )
        assert len(s1.requests) > 0 and len(s2.requests) > 0 and len(s1.requests) + len(s2.requests) == 13
    assert (summary.read, summary.written, summary.skipped, summary.failed) == (9, 7, 2, 0)
    assert summary.skipped_by_reason == {"bad role order": 1, "duplicate id": 1}
    assert summary.requests == 13 and sum(summary.requests_per_server.values()) == 13


def test_max_turns_keeps_the_first_user_turns_only(tmp_path):
    src = write_input(tmp_path / "in.jsonl", n=3)
    out = tmp_path / "out.jsonl"
    with FakeServer("s1") as s1:
        summary = regenerate(src, str(out), [s1.url], None, concurrency=2, max_tokens=8, max_turns=1)
        assert len(s1.requests) == 3
    rows = read_rows(out)
    for i in range(3):
        conv = [m for m in rows[f"c{i}"]["conversations"] if m["role"] != "system"]
        assert [m["role"] for m in conv] == ["user", "assistant"]
        assert conv[0]["content"] == f"q{i}a" and conv[1]["content"] == f"[s1] re: q{i}a"
    assert summary.written == 3 and summary.requests == 3
    with pytest.raises(ValueError, match="max_turns"):
        regenerate(src, str(tmp_path / "x.jsonl"), [s1.url], None, max_turns=0)


def test_resumes_after_an_interruption_without_redoing_finished_rows(tmp_path):
    src = write_input(tmp_path / "in.jsonl", n=8)
    out = tmp_path / "out.jsonl"

    async def interrupted_run(url):
        task = asyncio.create_task(regenerate_async(src, str(out), [url], "fake-model", concurrency=1))
        while not out.exists() or out.read_text().count("\n") < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with FakeServer("first", stall_after=6) as first:
        asyncio.run(interrupted_run(first.url))
    done_first = set(read_rows(out))
    assert len(done_first) == 3
    with open(out, "a") as f:
        f.write('{"id": "c7", "conversations": [{"role": "us')  # killed mid-write

    with FakeServer("second") as second:
        summary = regenerate(src, str(out), [second.url], "fake-model", concurrency=2, limit=2)
        assert (summary.already_done, summary.written) == (3, 2)
        summary = regenerate(src, str(out), [second.url], "fake-model", concurrency=2)
        asked = {r["messages"][-1]["content"] for r in second.requests}
    lines = out.read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert sorted(r["id"] for r in rows) == [f"c{i}" for i in range(8)]  # each id exactly once, every line valid
    assert summary.already_done == 5 and summary.written == 3
    assert not any(f"q{cid[1:]}a" in asked for cid in done_first)
    for r in rows:
        who = "first" if r["id"] in done_first else "second"
        assert r["conversations"][-1]["content"].startswith(f"[{who}]")


def test_server_errors_are_retried_then_counted(tmp_path):
    src = write_input(tmp_path / "in.jsonl", n=2)
    out = tmp_path / "out.jsonl"
    with FakeServer("flaky", fail_first=2) as flaky:
        summary = regenerate(src, str(out), [flaky.url], "fake-model", concurrency=1, retry_backoff=0.01)
    assert summary.written == 2 and summary.retries == 2 and summary.failed == 0

    out2 = tmp_path / "out2.jsonl"
    with FakeServer("broken", fail_first=100) as broken:
        summary = regenerate(src, str(out2), [broken.url], "m", concurrency=1, max_retries=1, retry_backoff=0.01)
    assert summary.written == 0 and summary.failed == 2 and summary.failed_by_reason == {"HTTP 500": 2}
    assert out2.read_text() == ""

    # A 400 (bad request) fails the same way on a retry: not retried.
    out3 = tmp_path / "out3.jsonl"
    with FakeServer("strict", fail_first=100, fail_status=400) as strict:
        summary = regenerate(src, str(out3), [strict.url], "m", concurrency=1, retry_backoff=0.01)
    assert summary.failed == 2 and summary.retries == 0 and len(strict.requests) == 2


def test_unreachable_server_is_left_out_and_model_api_key_reasoning(tmp_path):
    src = write_input(tmp_path / "in.jsonl", n=2)
    out = tmp_path / "out.jsonl"
    with FakeServer("ok", reasoning=True) as ok:
        dead = "http://127.0.0.1:9"  # discard port: connection refused
        summary = regenerate(
            src, str(out), [dead, ok.url], None, api_key="sk-test", retry_backoff=0.01, enable_thinking=True
        )
        assert {r["model"] for r in ok.requests} == {"fake-model"}  # taken from GET /v1/models
        assert all(r["chat_template_kwargs"] == {"enable_thinking": True} for r in ok.requests)
        assert {h["Authorization"] for h in ok.headers} == {"Bearer sk-test"}
    assert summary.written == 2 and list(summary.requests_per_server) == [ok.url + "/v1"]
    answer = read_rows(out)["c1"]["conversations"][1]["content"]
    assert answer == "<think>\nthinking about q1a\n</think>\n\n[ok] re: q1a"
    with pytest.raises(ConnectionError, match="no server answered"):
        regenerate(src, str(out), [dead], "m")


def test_a_server_that_drops_connections_is_benched_and_the_others_take_over(tmp_path):
    src = write_input(tmp_path / "in.jsonl", n=6)
    out = tmp_path / "out.jsonl"
    with FakeServer("crashed", drop=True) as crashed, FakeServer("ok") as ok:
        summary = regenerate(src, str(out), [crashed.url, ok.url], "m", concurrency=1, retry_backoff=0.01)
        assert len(crashed.requests) <= 2  # the first failures (at most one per worker), then benched
        assert len(ok.requests) == 12
    assert summary.written == 6 and summary.failed == 0
    assert summary.retries == len(crashed.requests)


def test_server_pool_prefers_the_least_loaded_and_rotates_ties():
    pool = ServerPool(["a:1", "http://b:2/", "http://c:3/v1"])
    assert pool.urls == ["http://a:1/v1", "http://b:2/v1", "http://c:3/v1"]
    assert [pool.acquire() for _ in range(3)] == [0, 1, 2]
    pool.release(1)
    assert pool.acquire() == 1  # the only one with a free slot
    pool.release(0)
    pool.release(2)
    assert pool.acquire(avoid=0) == 2
    pool.bench(0)
    pool.release(1)
    pool.release(2)
    assert pool.in_flight == [0, 0, 0]
    assert [pool.acquire() for _ in range(3)] == [1, 2, 1]  # 0 sits out its cooldown
    pool.release(1)
    pool.release(2)
    pool.release(1)
    assert pool.acquire(avoid=1) == 2 and pool.acquire(avoid=2) == 1
    single = ServerPool(["a:1"])
    single.bench(0)
    assert single.acquire(avoid=0) == 0  # benched and avoided, but the only one
    assert api_base("localhost:30000") == "http://localhost:30000/v1"
