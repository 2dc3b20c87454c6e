"""Regenerate training conversations with the target model through OpenAI-compatible servers.

Each conversation's user turns are replayed in order and every assistant turn is replaced by the target's own answer,
so the draft head learns the distribution it will have to predict at serving time. Works against any server with
`/v1/chat/completions` (specserve, SGLang, vLLM), several at once: every request goes to the least-loaded server.

The output is normalized JSONL, appended and flushed one finished conversation at a time; a rerun skips the ids
already there, so an interrupted run resumes where it stopped. Requests that fail are retried (on another server when
there is one); conversations that still fail are counted and left out, so the next run retries them.
When a server returns `reasoning_content` (SGLang/vLLM with a reasoning parser), the answer is stored as
`<think>\\n{reasoning}\\n</think>\\n\\n{content}`, the form Qwen3-style chat templates split back apart.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

from specforge.data.formats import RowError, fold_reasoning, read_normalized


@dataclass
class RegenerateSummary:
    read: int = 0
    already_done: int = 0
    written: int = 0
    skipped: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    # Answers cut off by max_tokens (finish_reason "length"); they are kept.
    truncated_answers: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    requests_per_server: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)

    def _count(self, table: dict[str, int], reason: str, example: str) -> None:
        table[reason] = table.get(reason, 0) + 1
        self.examples.setdefault(reason, example)

    def format(self) -> str:
        lines = [
            f"read {self.read} conversations: {self.written} written, {self.already_done} already done, "
            f"{self.skipped} skipped, {self.failed} failed; {self.requests} requests ({self.retries} retries), "
            f"{self.truncated_answers} answers cut at max_tokens"
        ]
        for title, table in (("skipped", self.skipped_by_reason), ("failed", self.failed_by_reason)):
            for reason, count in sorted(table.items(), key=lambda kv: -kv[1]):
                lines.append(f"  {title} {count:>7}  {reason}  (first: {self.examples[reason]})")
        for url, count in self.requests_per_server.items():
            lines.append(f"  {count:>9} requests  {url}")
        return "\n".join(lines)


class RequestFailed(RuntimeError):
    def __init__(self, reason: str, detail: str, retryable: bool = True):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.retryable = retryable


def api_base(url: str) -> str:
    """'localhost:30000', 'http://h:8000' or 'http://h:8000/v1' -> 'http://h:8000/v1'."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url if url.endswith("/v1") else url + "/v1"


class ServerPool:
    """Picks the server with the fewest requests in flight; ties rotate, so equal servers get equal shares.

    A server that refused a connection is benched for `cooldown` seconds: failing fast, it would otherwise look
    like the least loaded one and draw every new request.
    """

    def __init__(self, urls: list[str], cooldown: float = 30.0):
        if not urls:
            raise ValueError("at least one server URL is needed")
        self.urls = [api_base(u) for u in urls]
        self.in_flight = [0] * len(self.urls)
        self.benched_until = [0.0] * len(self.urls)
        self.cooldown = cooldown
        self._next = 0

    def acquire(self, avoid: int | None = None) -> int:
        now = time.monotonic()
        n = len(self.urls)
        candidates = [i for i in range(n) if i != avoid and self.benched_until[i] <= now]
        if not candidates:
            candidates = [i for i in range(n) if i != avoid] or list(range(n))
        best = min(candidates, key=lambda i: (self.in_flight[i], (i - self._next) % n))
        self._next = (best + 1) % n
        self.in_flight[best] += 1
        return best

    def release(self, i: int) -> None:
        self.in_flight[i] -= 1

    def bench(self, i: int) -> None:
        self.benched_until[i] = time.monotonic() + self.cooldown


@dataclass
class _Settings:
    model: str
    max_tokens: int
    temperature: float
    headers: dict
    max_retries: int
    retry_backoff: float
    enable_thinking: bool | None
    max_turns: int | None = None


async def _chat(client: httpx.AsyncClient, pool: ServerPool, messages: list[dict], cfg: _Settings, summary) -> str:
    body = {
        "model": cfg.model,
        "messages": messages,
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "stream": False,
    }
    if cfg.enable_thinking is not None:
        # Read by SGLang and vLLM (and passed to the chat template) to switch Qwen3-style reasoning on or off.
        body["chat_template_kwargs"] = {"enable_thinking": cfg.enable_thinking}
    avoid = None
    error: RequestFailed | None = None
    for attempt in range(cfg.max_retries + 1):
        if attempt:
            summary.retries += 1
            await asyncio.sleep(cfg.retry_backoff * 2 ** (attempt - 1))
        i = pool.acquire(avoid)
        url = pool.urls[i] + "/chat/completions"
        summary.requests += 1
        summary.requests_per_server[pool.urls[i]] = summary.requests_per_server.get(pool.urls[i], 0) + 1
        try:
            resp = await client.post(url, json=body, headers=cfg.headers)
        except httpx.HTTPError as e:
            if isinstance(e, httpx.TransportError) and not isinstance(e, httpx.TimeoutException):
                pool.bench(i)
            error, avoid = RequestFailed("connection error", f"{url}: {type(e).__name__}: {e}"), i
            continue
        finally:
            pool.release(i)
        if resp.status_code != 200:
            # Other 4xx (context too long, bad model name) would fail the same way again.
            retryable = resp.status_code >= 500 or resp.status_code in (408, 409, 429)
            error, avoid = RequestFailed(f"HTTP {resp.status_code}", f"{url}: {resp.text[:300]}", retryable), i
            if not retryable:
                break
            continue
        try:
            choice = resp.json()["choices"][0]
            message = choice["message"]
            content = message.get("content") or ""
            if not isinstance(content, str):
                raise TypeError(f"content is a {type(content).__name__}")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            error, avoid = RequestFailed("malformed response", f"{url}: {e!r}: {resp.text[:200]}"), i
            continue
        if choice.get("finish_reason") == "length":
            summary.truncated_answers += 1
        return fold_reasoning(content, message.get("reasoning_content") or message.get("reasoning"))
    assert error is not None
    raise error


async def _regenerate_conversation(client, pool, row: dict, cfg: _Settings, summary) -> dict:
    out: list[dict] = []
    turns = 0
    for msg in row["conversations"]:
        if msg["role"] == "assistant":
            continue
        if msg["role"] == "user" and cfg.max_turns is not None and turns >= cfg.max_turns:
            break
        out.append({"role": msg["role"], "content": msg["content"]})
        if msg["role"] == "user":
            answer = await _chat(client, pool, out, cfg, summary)
            out.append({"role": "assistant", "content": answer})
            turns += 1
    return {"id": row["id"], "conversations": out}


def _finished_ids(path: Path) -> set[str]:
    """Ids already in the output; a last line cut off by an interruption is removed so appends stay valid JSONL."""
    done: set[str] = set()
    if not path.exists():
        return done
    with path.open("rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            f.truncate(keep)
    for line in data[:keep].splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("id"), str):
            done.add(row["id"])
    return done


async def _check_servers(client: httpx.AsyncClient, pool: ServerPool, headers: dict) -> list[str | None]:
    """GET /v1/models on each server: its first model id, or None if it is unreachable."""

    async def probe(base: str) -> str | None:
        try:
            resp = await client.get(base + "/models", headers=headers, timeout=10.0)
            resp.raise_for_status()
            data = resp.json().get("data") or [{}]
            return str(data[0].get("id", ""))
        except (httpx.HTTPError, ValueError, AttributeError) as e:
            print(f"regenerate: server {base} is not usable ({type(e).__name__}: {e}); leaving it out")
            return None

    return list(await asyncio.gather(*(probe(u) for u in pool.urls)))


async def regenerate_async(
    input_jsonl: str,
    output_jsonl: str,
    server_urls: list[str],
    model: str | None,
    concurrency: int = 8,
    max_tokens: int = 2048,
    temperature: float = 0.0,
    api_key: str | None = None,
    max_retries: int = 3,
    retry_backoff: float = 1.0,
    timeout: float = 600.0,
    enable_thinking: bool | None = None,
    limit: int | None = None,
    max_turns: int | None = None,
) -> RegenerateSummary:
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_turns is not None and max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    in_path, out_path = Path(input_jsonl), Path(output_jsonl)
    if not in_path.is_file():
        raise FileNotFoundError(f"input {in_path} does not exist")
    if in_path.resolve() == out_path.resolve():
        raise ValueError("input and output must be different files")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    pool = ServerPool(server_urls)
    summary = RegenerateSummary()
    limits = httpx.Limits(max_connections=concurrency * len(pool.urls), max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0), limits=limits) as client:
        served = await _check_servers(client, pool, headers)
        usable = [url for url, m in zip(pool.urls, served) if m is not None]
        if not usable:
            raise ConnectionError(f"no server answered GET /v1/models: {', '.join(pool.urls)}")
        if not model:
            model = next(m for m in served if m)
            print(f"regenerate: using model {model!r} served by {usable[0]}")
        pool = ServerPool(usable)
        cfg = _Settings(model, max_tokens, temperature, headers, max_retries, retry_backoff, enable_thinking, max_turns)

        out_path.parent.mkdir(parents=True, exist_ok=True)
        done = _finished_ids(out_path)
        workers = concurrency * len(pool.urls)
        queue: asyncio.Queue = asyncio.Queue(maxsize=2 * workers)
        with out_path.open("a", encoding="utf-8") as out, tqdm(desc="regenerate", unit="conv", disable=None) as bar:

            async def worker():
                while True:
                    item = await queue.get()
                    if item is None:
                        return
                    where, row = item
                    try:
                        result = await _regenerate_conversation(client, pool, row, cfg, summary)
                    except RequestFailed as e:
                        summary.failed += 1
                        summary._count(summary.failed_by_reason, e.reason, f"{where} id {row['id']!r}: {e.detail}")
                    else:
                        out.write(json.dumps(result, ensure_ascii=False) + "\n")
                        out.flush()
                        summary.written += 1
                    bar.update(1)

            tasks = [asyncio.create_task(worker()) for _ in range(workers)]
            try:
                seen: set[str] = set()
                queued = 0
                for line_no, row in read_normalized(in_path):
                    if limit is not None and queued >= limit:
                        break
                    summary.read += 1
                    where = f"{in_path}:{line_no}"
                    if isinstance(row, RowError):
                        summary.skipped += 1
                        summary._count(summary.skipped_by_reason, row.reason, f"{where}: {row.detail}")
                        continue
                    if row["id"] in seen:
                        summary.skipped += 1
                        summary._count(summary.skipped_by_reason, "duplicate id", f"{where}: id {row['id']!r}")
                        continue
                    seen.add(row["id"])
                    if row["id"] in done:
                        summary.already_done += 1
                        continue
                    await queue.put((where, row))
                    queued += 1
                for _ in tasks:
                    await queue.put(None)
                await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()
    print(f"regenerate -> {out_path}\n{summary.format()}")
    return summary


def regenerate(
    input_jsonl: str,
    output_jsonl: str,
    server_urls: list[str],
    model: str | None,
    concurrency: int = 8,
    max_tokens: int = 2048,
    temperature: float = 0.0,
    api_key: str | None = None,
    max_retries: int = 3,
    retry_backoff: float = 1.0,
    timeout: float = 600.0,
    enable_thinking: bool | None = None,
    limit: int | None = None,
    max_turns: int | None = None,
) -> RegenerateSummary:
    """Rewrite every assistant turn of `input_jsonl` (normalized JSONL) with `model`; see the module docstring.

    `concurrency` is per server (as in SpecForge): up to concurrency x len(server_urls) conversations are in flight.
    `model=None` uses the first model the first server lists. `api_key` defaults to $OPENAI_API_KEY.
    `enable_thinking` (if not None) is sent as `chat_template_kwargs` for Qwen3-style reasoning targets.
    `limit` caps the conversations regenerated by this run (ids already in the output do not count).
    `max_turns` keeps only each conversation's first that many user turns (and their regenerated answers).
    """
    return asyncio.run(
        regenerate_async(
            input_jsonl,
            output_jsonl,
            server_urls,
            model,
            concurrency=concurrency,
            max_tokens=max_tokens,
            temperature=temperature,
            api_key=api_key if api_key is not None else os.environ.get("OPENAI_API_KEY"),
            max_retries=max_retries,
            retry_backoff=retry_backoff,
            timeout=timeout,
            enable_thinking=enable_thinking,
            limit=limit,
            max_turns=max_turns,
        )
    )
