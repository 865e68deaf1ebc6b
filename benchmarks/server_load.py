"""Server load test: locust against diffpo-serve, side by side with the offline batched decoder.

In one invocation, on the same model and prompts from the same generators (the locustfile's: half
sudoku, half countdown;
eb sampler, gamma 0.3, block_length 4, 16 tokens, greedy: the locustfile's defaults):
  1. the offline batched decoder (``generate``) at the server's batch size: output tokens/s;
  2. ``diffpo-serve --max-batch-size B`` under ``locust -u USERS`` for SECONDS: req/s, output
     tokens/s, latency and TTFT percentiles, failures (its decoder process pinned to the server's
     cores, its HTTP process to the load generator's);
  3. the same server with ``--max-batch-size 1`` (one request at a time) under the same load;
  4. the offline decoder at batch 1 (what batching gains the offline decoder on this machine);
  5. the server's Batcher and decoding thread fed in-process by USERS closed-loop clients (the server
     minus HTTP);
  6. ``diffpo-serve --no-decoder-process`` under the same load: the decoding loop a thread of the
     server process, all of it on the server's cores;
each ``--repeats`` times, interleaved; ratios are taken within a repeat (side by side).
Output tokens are completion tokens up to and including EOS, as the server's usage counts them.
Writes docs/results/server/server_load.{md,json}. Needs locust (``pip install -e .[load]``).

The load generator must not eat the system under test's CPU (in production the clients are on other
machines), so by default locust is pinned to the last core and the server, like the offline decoder
it is compared with, to the others, with as many torch threads as it has cores (``--no-isolate``
runs everything on every core).

    python -m benchmarks.server_load [--users 32] [--seconds 60] [--batch-size 32] [--repeats 2] [--wait 0]
                                      [--dtype bfloat16] [--compile] [--device cuda] [--no-isolate]

It also counts the prompts whose greedy output depends on the batch (offline, batched vs alone).
Other ``--users``, a ``--dtype`` or ``--compile`` write docs/results/server/server_load_64users.md,
..._bfloat16.md, ..._compiled.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from benchmarks.common import batch_dependent, machine, markdown_table, load_model, save
from diffpo_serve.batcher import BatchFailure, Batcher, RowRequest, RowUpdate

from diffpo_serve.dllm.sampler import SamplingParams, generate

ROOT = Path(__file__).resolve().parents[1]
# the locustfile's defaults: entropy-bounded sampler, gamma 0.3, blocks of 4, 16 tokens, greedy
PARAMS = SamplingParams("eb", 16, block_length=4, threshold=0.3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cores: set[int] | None):
    """A preexec_fn that pins a child process to ``cores`` (None: no pinning)."""
    return None if cores is None else (lambda: os.sched_setaffinity(0, cores))


def thread_env(cores: set[int] | None) -> dict:
    env = dict(os.environ)
    if cores is not None:
        env["OMP_NUM_THREADS"] = str(len(cores))
    return env


@contextlib.contextmanager
def server(max_batch_size: int, cores: set[int] | None = None, decoder_process: bool = False,
           decoder_cores: set[int] | None = None, dtype: str | None = None, device: str = "cpu",
           compile: bool = False):
    """``diffpo-serve`` pinned to ``cores``, optionally with ``--decoder-process`` pinned to ``decoder_cores``."""
    port = free_port()
    cmd = [sys.executable, "-m", "diffpo_serve", "--port", str(port), "--max-batch-size", str(max_batch_size),
           "--max-queue", "4096", "--log-level", "warning"]
    cmd += ["--decoder-process" if decoder_process else "--no-decoder-process"]
    if dtype is not None:
        cmd += ["--dtype", dtype]
    cmd += ["--device", device] + (["--compile"] if compile else [])
    if decoder_cores is not None:
        cmd += ["--decoder-cpus", ",".join(map(str, sorted(decoder_cores)))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pinned(cores),
                            env=thread_env(decoder_cores or cores))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(3000):  # up to 5 minutes: --compile compiles at start-up
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        else:
            raise RuntimeError("the server did not become healthy")
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def decoder_counters(url: str) -> dict:
    """The batcher's step count, summed step seconds and summed rows from the server's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    value = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
    return {"steps": value("diffpo_batch_step_seconds_count"), "step_s": value("diffpo_batch_step_seconds_sum"),
            "rows": value("diffpo_batch_row_steps_total"), "time": time.perf_counter()}


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) used so far by each thread of process ``pid`` (Linux /proc); the
    threads of its child processes (the decoder process) are keyed by the negated child pid."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            fields = (task / "stat").read_text().rpartition(")")[2].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
            children += [int(c) for c in (task / "children").read_text().split()]
    for child in children:
        with contextlib.suppress(OSError):
            out[-child] = sum(thread_cpu(child).values())
    return out


def cores_busy(cores: set[int] | None) -> tuple[float, float]:
    """(busy, total) jiffies so far of the given cores (all cores if None), from /proc/stat."""
    busy = total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and (cores is None or int(name[3:]) in cores):
            ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
            busy, total = busy + sum(ticks) - ticks[3] - ticks[4], total + sum(ticks)
    return busy, total


def run_locust(url: str, pid: int, users: int, seconds: int, cores: set[int] | None = None) -> dict:
    beside = Path(sys.executable).parent / "locust"  # the environment's own, also when it is not activated
    cmd = [str(beside) if beside.exists() else "locust", "-f", str(ROOT / "clients" / "locustfile.py"), "--headless",
           "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--host", url, "--only-summary"]
    before, cpu_before, core_before = decoder_counters(url), thread_cpu(pid), cores_busy(cores)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120,
                         preexec_fn=pinned(cores)).stdout
    after, cpu_after, core_after = decoder_counters(url), thread_cpu(pid), cores_busy(cores)
    wall = after["time"] - before["time"]
    used = {tid: cpu_after[tid] - cpu_before.get(tid, 0.0) for tid in cpu_after}
    steps = after["steps"] - before["steps"]
    grab = lambda pat: re.search(pat, out).groups()  # noqa: E731
    n, _, failed = grab(r"requests\s+(\d+) in ([\d.]+)s \((\d+) failed\)")
    p50, p90, p99 = grab(r"latency p50/p90/p99\s+(\d+) / (\d+) / (\d+) ms")
    t50, t90, t99 = grab(r"TTFT p50/p90/p99\s+(\d+) / (\d+) / (\d+) ms")
    return {"requests": int(n), "req_s": float(grab(r"requests/s\s+([\d.]+)")[0]),
            "output_tok_s": float(grab(r"output tokens/s\s+([\d.]+)")[0]), "p50_ms": int(p50), "p90_ms": int(p90),
            "p99_ms": int(p99), "ttft_p50_ms": int(t50), "ttft_p99_ms": int(t99), "failures": int(failed),
            "mean_batch": (after["rows"] - before["rows"]) / max(steps, 1),
            "decoder_busy": (after["step_s"] - before["step_s"]) / wall,
            # the main thread runs the event loop (HTTP); the decoder is the decoder process if there is one,
            # else the busiest other thread (the decoding thread)
            "event_loop_cpu": used.get(pid, 0.0) / wall,
            "decoder_cpu": (sum(v for tid, v in used.items() if tid < 0)
                            or max((v for tid, v in used.items() if tid != pid), default=0.0)) / wall,
            # how busy the load generator's core(s) were: locust, plus the default server's HTTP process
            "client_core_busy": (core_after[0] - core_before[0]) / max(core_after[1] - core_before[1], 1)}


def batcher_no_http(batch_size: int, n: int, clients: int, dtype: str | None = None, device: str = "cpu",
                    compile: bool = False) -> dict:
    """The server's Batcher and decoding thread fed by ``clients`` closed-loop asyncio clients: no HTTP."""
    loaded = load_model(dtype=dtype, device=device, compile=compile)
    prompts = iter(benchmark_prompts(loaded, n))
    tokens = requests = 0

    async def client(batcher: Batcher) -> None:
        nonlocal tokens, requests
        for prompt in prompts:  # one shared iterator: every prompt is decoded once
            handle = batcher.submit([RowRequest(prompt, PARAMS)])
            while not isinstance(event := await handle.events.get(), RowUpdate) or not event.finished:
                if isinstance(event, BatchFailure):
                    raise RuntimeError(event.message)
            ids = event.ids
            tokens += ids.index(loaded.eos_id) + 1 if loaded.eos_id in ids else len(ids)
            requests += 1

    async def main() -> float:
        batcher = Batcher(loaded, max_batch_size=batch_size, max_queue=n)
        batcher.start()
        t0 = time.perf_counter()
        await asyncio.gather(*(client(batcher) for _ in range(clients)))
        seconds = time.perf_counter() - t0
        batcher.stop()
        return seconds

    seconds = asyncio.run(main())
    return {"requests": requests, "req_s": requests / seconds, "output_tok_s": tokens / seconds}


def locust_prompt_makers():
    """The load test's own prompt generators (clients/prompts.py, which the locustfile uses), so
    every system here decodes prompts drawn from one distribution: how many passes a prompt needs
    and where its answer ends depend on the prompt, and so do tokens/s."""
    spec = importlib.util.spec_from_file_location("diffpo_load_prompts", ROOT / "clients" / "prompts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sudoku_prompt, module.countdown_prompt


def benchmark_prompts(loaded, n: int, seed: int = 1) -> list[list[int]]:
    """``n`` prompts from the locustfile's generators, half sudoku and half countdown, as token ids
    (shuffled, as the locust users pick them)."""
    sudoku, countdown = locust_prompt_makers()
    rng = random.Random(seed)
    texts = [sudoku(rng) for _ in range(n // 2)] + [countdown(rng) for _ in range(n - n // 2)]
    rng.shuffle(texts)
    return [loaded.encode(t) for t in texts]


def offline(batch_size: int, n: int, dtype: str | None = None, device: str = "cpu", compile: bool = False) -> dict:
    loaded = load_model(dtype=dtype, device=device, compile=compile)
    prompts = benchmark_prompts(loaded, n)
    t0, tokens = time.perf_counter(), 0
    for i in range(0, len(prompts), batch_size):
        out = generate(loaded.model, prompts[i:i + batch_size], PARAMS, mask_id=loaded.mask_id,
                       eos_id=loaded.eos_id, pad_id=loaded.pad_id)
        for seq in out.sequences.tolist():
            tokens += seq.index(loaded.eos_id) + 1 if loaded.eos_id in seq else len(seq)
    seconds = time.perf_counter() - t0
    return {"requests": len(prompts), "req_s": len(prompts) / seconds, "output_tok_s": tokens / seconds}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--offline-prompts", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2, help="measure every system this many times, interleaved")
    ap.add_argument("--wait", type=float, default=0.0,
                    help="each locust user's think time between requests is uniform in [0, WAIT] s; the default 0 "
                         "keeps the server saturated, which a throughput comparison needs")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="decode in this dtype everywhere (default: the checkpoint's, float32); with bfloat16 the "
                         "one-at-a-time server is also measured in float32, its faster dtype at batch 1")
    ap.add_argument("--device", default="cpu", help="torch device of the server and the offline decoder (e.g. cuda)")
    ap.add_argument("--compile", action="store_true",
                    help="every system with torch.compile'd transformer layers (diffpo-serve --compile)")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                    help="pin locust to the last core, the server and the offline decoder to the others")
    args = ap.parse_args(argv)
    os.environ.setdefault("DIFFPO_LOCUST_SAMPLER", "eb")
    os.environ.setdefault("DIFFPO_LOCUST_WAIT", str(args.wait))
    cores = sorted(os.sched_getaffinity(0))
    serve_cores = client_cores = None
    if args.isolate and len(cores) >= 2:
        serve_cores, client_cores = set(cores[:-1]), {cores[-1]}
        os.sched_setaffinity(0, serve_cores)  # the offline decoder runs here, on the server's cores
        torch.set_num_threads(len(serve_cores))
    systems = [f"offline generate(), batch {args.batch_size}",
               # what batching gains the offline decoder on this machine: the same decoder one prompt at a time
               "offline generate(), batch 1",
               # the default: the decoder process on the server's cores, HTTP on the load generator's core
               f"diffpo-serve --max-batch-size {args.batch_size}", "diffpo-serve --max-batch-size 1 (one at a time)",
               # the server minus HTTP: what the batching machinery costs or gains by itself
               f"server's Batcher, {args.users} in-process clients, no HTTP",
               # the decoding loop as a thread of the server process, everything on the server's cores
               f"diffpo-serve --max-batch-size {args.batch_size} --no-decoder-process"]
    dtype = args.dtype
    flags = (f" --dtype {dtype}" if dtype else "") + (" --compile" if args.compile else "")
    systems = [name + flags for name in systems]
    if dtype == "bfloat16":  # the one-at-a-time server at its best: float32 is faster at batch 1 on a CPU
        systems.append("diffpo-serve --max-batch-size 1 --dtype float32" + (" --compile" if args.compile else "")
                       + " (one at a time)")
    model_kw = dict(device=args.device, compile=args.compile)
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    for rep in range(args.repeats):  # interleaved, so slow drifts of the machine hit every system alike
        runs[systems[0]].append(offline(args.batch_size, args.offline_prompts, dtype, **model_kw))
        runs[systems[1]].append(offline(1, args.offline_prompts // 4, dtype, **model_kw))
        servers = [(args.batch_size, systems[2], dtype), (1, systems[3], dtype)]
        servers += [(1, systems[6], "float32")] if len(systems) > 6 else []
        for b, name, server_dtype in servers:
            with server(b, client_cores, True, serve_cores, server_dtype, **model_kw) as (url, pid):
                runs[name].append(run_locust(url, pid, args.users, args.seconds, client_cores))
        runs[systems[4]].append(batcher_no_http(args.batch_size, args.offline_prompts, args.users, dtype, **model_kw))
        with server(args.batch_size, serve_cores, dtype=dtype, **model_kw) as (url, pid):
            runs[systems[5]].append(run_locust(url, pid, args.users, args.seconds, client_cores))
        print(f"repeat {rep + 1}/{args.repeats}:", {k: round(v[-1]["output_tok_s"]) for k, v in runs.items()},
              flush=True)
    rows = []
    for name in systems:
        row = {"system": name, "runs": len(runs[name])}
        for key in runs[name][0]:
            values = [r[key] for r in runs[name]]
            row[key] = sum(values) if key in ("requests", "failures") else statistics.median(values)
            if all(isinstance(v, int) for v in values):
                row[key] = round(row[key])
        row["output_tok_s_range"] = "{:.0f}-{:.0f}".format(*(f([r["output_tok_s"] for r in runs[name]])
                                                           for f in (min, max)))
        rows.append(row)
    tok = {name: [r["output_tok_s"] for r in runs[name]] for name in systems}
    paired = lambda a, b: [x / y for x, y in zip(tok[a], tok[b])]  # noqa: E731 - same repeat, side by side
    vs_offline, vs_single, offline_gain = (paired(systems[2], systems[0]), paired(systems[2], systems[3]),
                                      paired(systems[0], systems[1]))
    span = lambda xs, f: f"{statistics.median(xs):{f}} (range {min(xs):{f}}-{max(xs):{f}})"  # noqa: E731
    loaded = load_model(dtype=dtype, **model_kw)  # greedy decoding is deterministic: counted once
    differ = batch_dependent(loaded, benchmark_prompts(loaded, 256), PARAMS, args.batch_size)
    vs_float32 = (f"; batched / one-at-a-time server in float32 **{span(paired(systems[2], systems[6]), '.1f')}x**"
                  if len(systems) > 6 else "")
    placement = (f"Locust pinned to core {sorted(client_cores)}, the server and the offline decoder to cores "
                 f"{sorted(serve_cores)} with {len(serve_cores)} torch thread(s)" if serve_cores else
                 "Locust runs on the same cores as the server")
    text = (f"# Server load test\n\nBundled model; locust ({args.users} users, {args.seconds} s, "
            f"clients/locustfile.py: mixed sudoku/countdown prompts, completion and chat, streaming and not; eb "
            f"gamma 0.3, block_length 4, 16 tokens; think time uniform in [0, {args.wait:g}] s) vs the offline "
            f"batched decoder on {args.offline_prompts} prompts from the locustfile's generators, same settings. Each system "
            f"measured {args.repeats} times, interleaved, all in one invocation; the table gives medians "
            f"(requests and failures: totals). {placement}. Machine: {machine()}.\n\n"
            + markdown_table(rows, ["system", "runs", "requests", "req_s", "output_tok_s", "output_tok_s_range",
                                    "p50_ms", "p90_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms", "failures",
                                    "mean_batch", "decoder_busy", "decoder_cpu", "event_loop_cpu",
                                    "client_core_busy"])
            + f"\n\nRatios of output tokens/s within each repeat (median and range over {args.repeats}): "
            f"server / offline **{span(vs_offline, '.2f')}**, with `--no-decoder-process` "
            f"{span(paired(systems[5], systems[0]), '.2f')}; batched / one-at-a-time server "
            f"**{span(vs_single, '.1f')}x**{vs_float32}; offline batch {args.batch_size} / offline batch 1, what "
            f"batching gains the offline decoder here: {span(offline_gain, '.1f')}x (continuous batching can gain "
            f"more: offline batches shrink as rows finish). `mean_batch`: rows per denoising step; `decoder_busy`: the "
            f"fraction of wall time the decoding thread spent in denoising steps (both from the server's /metrics); "
            f"`decoder_cpu` / `event_loop_cpu`: CPU seconds per wall second of the server's decoder process (with "
            f"`--no-decoder-process`: its decoding thread) and of its event loop (HTTP), from /proc; "
            f"`client_core_busy`: the busy fraction of the load generator's core (locust and, by default, the "
            f"server's HTTP process), from /proc/stat. By default "
            f"the HTTP process shares the load generator's core and the decoder process has the offline decoder's "
            f"core to itself; with `--no-decoder-process` the whole server is on that core. Batcher / offline: "
            f"{span(paired(systems[4], systems[0]), '.2f')}. Greedy outputs that depend on the batch: {differ} of 256 "
            f"prompts decode differently (tokens or NFE) in offline batches of {args.batch_size} than alone"
            f"{' (' + flags.strip() + ')' if flags else ''}.\n")
    name = "server/server_load" + (f"_{args.users}users" if args.users != 32 else "") + (f"_{dtype}" if dtype else "")
    name += "_compiled" if args.compile else ""
    name += f"_{args.device.split(':')[0]}" if args.device != "cpu" else ""
    print(save(name, text, rows))


if __name__ == "__main__":
    main()
