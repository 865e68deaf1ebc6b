"""Load test for diffpo-serve: streaming and non-streaming completions and chats, sudoku and countdown prompts.

    pip install locust
    locust -f clients/locustfile.py --headless -u 32 -r 8 -t 60s --host http://127.0.0.1:8000

Locust's own table reports every request type by name (end-to-end latency: for streams, up to
``[DONE]``) plus a ``TTFT`` row per streaming kind (time to the first text chunk). When the test
ends, a summary prints requests/s, output tokens/s (the ``usage.completion_tokens`` of every
successful response, summed, over the test's wall time), end-to-end p50/p90/p99, TTFT p50/p90/p99
and the failure count. Run it as one process: with ``--processes`` or workers, each process prints
its own token count.

Environment: ``DIFFPO_API_KEY`` (sent as a Bearer key), ``DIFFPO_LOCUST_MODEL`` (default: the first
model of ``/v1/models``), ``DIFFPO_LOCUST_MAX_TOKENS`` (default 16), ``DIFFPO_LOCUST_SAMPLER`` (default
``eb``: the entropy-bounded sampler, a few forward passes per block), ``DIFFPO_LOCUST_BLOCK_LENGTH``
(default 4: streams then get their text block by block, so TTFT measures something),
``DIFFPO_LOCUST_WAIT`` (default 0.2: each user waits a uniform 0 to that many seconds between requests;
0 makes a closed loop that keeps the server saturated, as a throughput measurement wants).
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import FastHttpUser, between, events, task
from locust.stats import StatsEntry

from prompts import countdown_prompt, sudoku_prompt  # clients/prompts.py (locust puts this directory on sys.path)

TTFT = "TTFT"
TOTALS = {"completion_tokens": 0}


class DiffpoUser(FastHttpUser):
    wait_time = between(0.0, float(os.environ.get("DIFFPO_LOCUST_WAIT", "0.2")))

    def on_start(self) -> None:
        self.rng = random.Random()
        key = os.environ.get("DIFFPO_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.max_tokens = int(os.environ.get("DIFFPO_LOCUST_MAX_TOKENS", "16"))
        self.sampler = os.environ.get("DIFFPO_LOCUST_SAMPLER", "eb")
        self.block_length = int(os.environ.get("DIFFPO_LOCUST_BLOCK_LENGTH", "4"))
        self.model = os.environ.get("DIFFPO_LOCUST_MODEL")
        if not self.model:
            with self.client.get("/v1/models", headers=self.headers, name="/v1/models", catch_response=True) as r:
                self.model = r.json()["data"][0]["id"] if r.status_code == 200 else "unknown"

    def prompt(self) -> str:
        return sudoku_prompt(self.rng) if self.rng.random() < 0.5 else countdown_prompt(self.rng)

    def body(self, chat: bool, stream: bool) -> dict:
        body = {"model": self.model, "max_tokens": self.max_tokens, "sampler": self.sampler,
                "block_length": self.block_length}
        if chat:
            body["messages"] = [{"role": "user", "content": self.prompt()}]
        else:
            body["prompt"] = self.prompt()
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return body

    @task(3)
    def completion(self) -> None:
        self.whole("/v1/completions", "completion", self.body(chat=False, stream=False))

    @task(3)
    def completion_stream(self) -> None:
        self.streamed("/v1/completions", "completion (stream)", self.body(chat=False, stream=True))

    @task(2)
    def chat(self) -> None:
        self.whole("/v1/chat/completions", "chat", self.body(chat=True, stream=False))

    @task(2)
    def chat_stream(self) -> None:
        self.streamed("/v1/chat/completions", "chat (stream)", self.body(chat=True, stream=True))

    def whole(self, path: str, name: str, body: dict) -> None:
        with self.client.post(path, json=body, headers=self.headers, name=name, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            TOTALS["completion_tokens"] += r.json()["usage"]["completion_tokens"]

    def streamed(self, path: str, name: str, body: dict) -> None:
        start = time.perf_counter()
        with self.client.post(path, json=body, headers=self.headers, name=name, stream=True,
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}")
                return
            first, usage, size, buffer, error = None, None, 0, "", None
            for chunk in r.iter_content(chunk_size=4096):
                chunk = chunk.decode() if isinstance(chunk, bytes) else chunk
                size += len(chunk)
                buffer += chunk
                while "\n\n" in buffer:
                    event, buffer = buffer.split("\n\n", 1)
                    data = event.removeprefix("data: ")
                    if data == "[DONE]":
                        continue
                    payload = json.loads(data)
                    if "error" in payload:
                        error = payload["error"]["message"]
                    elif payload.get("usage"):
                        usage = payload["usage"]
                    elif first is None and any(c.get("text") or c.get("delta", {}).get("content")
                                               for c in payload["choices"]):
                        first = time.perf_counter() - start
                        events.request.fire(request_type=TTFT, name=name, response_time=first * 1000,
                                            response_length=0, exception=None, context={})
            r.request_meta["response_time"] = (time.perf_counter() - start) * 1000  # end to end
            r.request_meta["response_length"] = size
            if error or usage is None:
                r.failure(error or "stream ended without a usage chunk")
                return
            TOTALS["completion_tokens"] += usage["completion_tokens"]
            r.success()


def _merged(stats, ttft: bool) -> StatsEntry:
    merged = StatsEntry(stats, "TTFT" if ttft else "end-to-end", "")
    for entry in stats.entries.values():
        if (entry.method == TTFT) == ttft and entry.name != "/v1/models":
            merged.extend(entry)
    return merged


@events.quitting.add_listener
def print_summary(environment, **_kw) -> None:
    stats = environment.stats
    if stats.total.last_request_timestamp is None:
        return
    elapsed = max(stats.total.last_request_timestamp - stats.total.start_time, 1e-9)
    e2e, ttft = _merged(stats, ttft=False), _merged(stats, ttft=True)
    pct = lambda entry, q: entry.get_response_time_percentile(q) if entry.num_requests else 0  # noqa: E731
    lines = [
        "diffpo summary",
        f"  requests            {e2e.num_requests} in {elapsed:.1f}s ({e2e.num_failures} failed)",
        f"  requests/s          {e2e.num_requests / elapsed:.2f}",
        f"  output tokens/s     {TOTALS['completion_tokens'] / elapsed:.1f} "
        f"({TOTALS['completion_tokens']} completion tokens)",
        f"  latency p50/p90/p99 {pct(e2e, 0.5):.0f} / {pct(e2e, 0.9):.0f} / {pct(e2e, 0.99):.0f} ms",
        f"  TTFT p50/p90/p99    {pct(ttft, 0.5):.0f} / {pct(ttft, 0.9):.0f} / {pct(ttft, 0.99):.0f} ms (streams)",
        f"  failures            {e2e.num_failures}",
    ]
    print("\n".join(lines))
