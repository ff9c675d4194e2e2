"""The server under load, on 127.0.0.1: throughput, latency, malformed requests, and cartridge vs icl.

One run, one server (`cartridges serve` in its own process, the embedded model):
1. load: the same requests sent one at a time, then by `--concurrency` clients at once, all
   streamed (time to first token, end-to-end latency, generated tokens/s); none may fail;
2. fuzz: `--fuzz` malformed bodies (random JSON, wrong types, huge numbers, bad UTF-8): all 4xx,
   the server still answers;
3. cost: a question with the cartridge vs with the whole article in the prompt (icl), at 1 and
   at `--concurrency` clients: time to first token and decode tokens/s, and KV memory per session.
Writes results.json, results.md and PNG plots under --out.

    python bench/serve_load.py --corpus-id "squad2-Sky_(United_Kingdom)" --requests 256 --concurrency 16
"""

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import httpx
import openai

from cartridges.bench.run_record import record_header, settings_of
from cartridges.errors import run_script
from cartridges.qa import find_corpus

QA_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "qa" / "encyclopedic_squad2.json"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def publish_cartridge(corpus, tokens: int, registry: Path) -> str:
    """The untrained cartridge of the article's first tokens (cost does not depend on training)."""
    from cartridges.models import load_model
    from cartridges.registry.store import Registry
    from cartridges.stages.distillation.init.first_tokens import init_cartridge
    from cartridges.stages.ingest import Corpus, Document

    loaded = load_model()
    document = Document(path=f"{corpus.id}.txt", title=corpus.title, text=corpus.text, sha256="-")
    with tempfile.TemporaryDirectory() as scratch:
        init_cartridge(loaded, Corpus(Path(scratch), [document], []), tokens, "bench", Path(scratch) / "bench")
        return Registry(registry).publish(Path(scratch) / "bench", "bench").label


async def one(client, model: str, messages: list[dict], max_tokens: int, extra_body: dict | None = None) -> dict:
    started = time.perf_counter()
    first, tokens = None, 0
    stream = await client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra_body,
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - started
    return {"ttft": first if first is not None else total, "seconds": total, "tokens": tokens}


async def run_all(url: str, jobs: list[tuple[str, list[dict]]], concurrency: int, max_tokens: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=1800) as client:

        async def job(model, messages):
            async with gate:
                try:
                    return await one(client, model, messages, max_tokens)
                except Exception as exc:  # counted, not raised: a lost request is a result
                    return {"error": f"{type(exc).__name__}: {exc}"}

        async with httpx.AsyncClient(timeout=10) as http:
            before = await health(http, url)
            started = time.perf_counter()
            watching = asyncio.create_task(watch_memory(http, url, samples := []))
            results = await asyncio.gather(*(job(m, q) for m, q in jobs))
            watching.cancel()
            wall = time.perf_counter() - started
            after = await health(http, url)
    done = [r for r in results if "error" not in r]
    busiest = max(samples, default={"running": 0, "kv_bytes": 0}, key=lambda s: (s["running"], s["kv_bytes"]))
    return {
        "decoder_steps": after.get("steps", 0) - before.get("steps", 0),
        "decoder_busy_seconds": after.get("step_seconds", 0) - before.get("step_seconds", 0),
        "kv_bytes_at_most_rows": busiest["kv_bytes"],
        "rows_at_most": busiest["running"],
        "concurrency": concurrency,
        "requests": len(jobs),
        "failed": len(jobs) - len(done),
        "errors": sorted({r["error"] for r in results if "error" in r})[:5],
        "wall_seconds": wall,
        "generated_tokens": sum(r["tokens"] for r in done),
        "tokens_per_second": sum(r["tokens"] for r in done) / wall,
        "ttft_p50": percentile([r["ttft"] for r in done], 50),
        "ttft_p95": percentile([r["ttft"] for r in done], 95),
        "latency_p50": percentile([r["seconds"] for r in done], 50),
        "latency_p95": percentile([r["seconds"] for r in done], 95),
        "decode_tokens_per_second_per_request": statistics.mean(
            (r["tokens"] - 1) / (r["seconds"] - r["ttft"]) for r in done if r["tokens"] > 1 and r["seconds"] > r["ttft"]
        )
        if done
        else 0.0,
    }


async def health(http: httpx.AsyncClient, url: str) -> dict:
    return (await http.get(url.removesuffix("/v1") + "/health")).json()


async def watch_memory(http: httpx.AsyncClient, url: str, samples: list[dict]) -> None:
    """The server's running rows and the keys and values they hold (its /health), every 0.25 s."""
    while True:
        try:
            state = await health(http, url)
            samples.append({"running": state["running"], "kv_bytes": state.get("kv_bytes", 0)})
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.25)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


BAD_FIELDS = [
    ("max_tokens", -1),
    ("max_tokens", 10**40),
    ("max_tokens", "many"),
    ("temperature", 5),
    ("temperature", "hot"),
    ("top_p", 0),
    ("stop", [1, 2]),
    ("stop", ["a", "b", "c", "d", "e"]),
    ("n", 2),
    ("stream", "yes"),
    ("cartridges", {}),
    ("cartridges", [{"id": "bench", "source": "wandb"}]),
    ("seed", -5),
    ("messages", []),
    ("messages", [{"role": "robot", "content": "hi"}]),
    ("model", ""),
    ("model", "../etc/passwd"),
    ("model", "nope@3"),
    ("logprobs", True),
    ("tools", [{"type": "function"}]),
]


def fuzz_bodies(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    values = [None, True, -1, 0, 10**40, 1e308, "", "x" * 5000, [], {}, [1, 2], {"a": 1}, "\ud800"]
    fields = ["model", "messages", "max_tokens", "temperature", "top_p", "stop", "n", "stream", "cartridges", "seed"]
    bodies = []
    for i in range(count):
        kind = i % 4
        if kind == 0:  # random fields with values of the wrong type or range
            body = {rng.choice(fields): rng.choice(values) for _ in range(rng.randint(1, 5))}
            bodies.append(json.dumps(body).encode("utf-8", "surrogatepass"))
        elif kind == 1:  # a valid request but for one field with a value out of type or range
            body = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            field, value = rng.choice(BAD_FIELDS)
            body[field] = value
            bodies.append(json.dumps(body).encode("utf-8", "surrogatepass"))
        elif kind == 2:  # bytes that are not UTF-8 JSON
            bodies.append(bytes(rng.randrange(256) for _ in range(rng.randint(0, 64))))
        else:  # JSON cut short
            text = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hello there"}]})
            bodies.append(text[: rng.randint(0, len(text) - 1)].encode())
    return bodies


JSON = {"content-type": "application/json"}


def fuzz(url: str, count: int, seed: int) -> dict:
    statuses: dict[str, int] = {}
    with httpx.Client(timeout=60) as http:
        for body in fuzz_bodies(count, seed):
            try:
                code = str(http.post(url + "/chat/completions", content=body, headers=JSON).status_code)
            except httpx.HTTPError as exc:  # counted: a fuzz request must not hang or drop the connection
                code = type(exc).__name__
            statuses[code] = statuses.get(code, 0) + 1
        alive = http.get(url.removesuffix("/v1") + "/health").status_code == 200
    all_4xx = all(code.isdigit() and 400 <= int(code) < 500 for code in statuses)
    return {"requests": count, "statuses": statuses, "all_4xx": all_4xx, "alive": alive}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-id", default="squad2-Sky_(United_Kingdom)")
    parser.add_argument("--tokens", type=int, default=256, help="cartridge length")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--fuzz", type=int, default=1000)
    parser.add_argument("--cost-requests", type=int, default=16, help="requests per cost cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="the server's torch threads (`cartridges serve --threads`)")
    parser.add_argument("--phase", action="append", default=[], help="only these phases (fuzz, concurrent, ...)")
    parser.add_argument("--out", type=Path, default=Path("bench/results") / date.today().isoformat() / "serve")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = find_corpus(QA_FILE, args.corpus_id)
    home = Path(tempfile.mkdtemp(prefix="cartridges-serve-bench-"))
    label = publish_cartridge(corpus, args.tokens, home / "registry")
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cartridges.pipeline.cli",
            "serve",
            "--port",
            str(port),
            "--registry",
            str(home / "registry"),
        ]
        + ["--max-batch", str(args.concurrency)]
        + ([] if args.threads is None else ["--threads", str(args.threads)]),
        env=os.environ | {"CARTRIDGES_HOME": os.environ.get("CARTRIDGES_HOME", str(Path.home() / ".cache/cartridges"))},
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_for(url, server)
        questions = [q.question for q in corpus.questions]
        jobs = [("bench", [{"role": "user", "content": questions[i % len(questions)]}]) for i in range(args.requests)]
        results = {"cartridge": label, "corpus": corpus.id, **record_header(vars(args))}
        phases = {
            "fuzz": lambda: fuzz(url, args.fuzz, args.seed),
            "concurrent": lambda: asyncio.run(run_all(url, jobs, args.concurrency, args.max_tokens)),
            "sequential": lambda: asyncio.run(run_all(url, jobs, 1, args.max_tokens)),
            "cost": lambda: cost(url, corpus, questions, settings_of(args, CostSettings)),
            "kv_bytes_per_session": lambda: kv_bytes(corpus, args.tokens),
        }
        previous = args.out / "results.json"
        if args.phase and previous.is_file():  # measure some phases again, keep the others
            results = json.loads(previous.read_text()) | {k: results[k] for k in ("args", "machine")}
        for phase, measure in phases.items():  # saved after each phase: a cut-off run keeps what it measured
            if args.phase and phase not in args.phase:
                continue
            started = time.perf_counter()
            results[phase] = measure()
            print(f"{phase}: {time.perf_counter() - started:.0f} s", flush=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=2))
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, args.out)
    print((args.out / "results.md").read_text())


def wait_for(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("the server exited before answering")
        try:
            if httpx.get(url.removesuffix("/v1") + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.5)
    raise SystemExit("the server did not answer within 300 s")


def icl_messages(corpus, question: str) -> list[dict]:
    return [{"role": "user", "content": f"{corpus.text}\n\nQuestion: {question}"}]


@dataclass(frozen=True)
class CostSettings:
    concurrency: int
    cost_requests: int
    max_tokens: int


def cost(url: str, corpus, questions: list[str], settings: CostSettings) -> list[dict]:
    rows = []
    for method in ("cartridge", "icl"):
        for clients in (1, settings.concurrency):
            jobs = [
                ("bench", [{"role": "user", "content": q}])
                if method == "cartridge"
                else ("default", icl_messages(corpus, q))
                for q in questions[: settings.cost_requests]
            ]
            rows.append({"method": method, **asyncio.run(run_all(url, jobs, clients, settings.max_tokens))})
    return rows


def kv_bytes(corpus, tokens: int) -> dict:
    """KV bytes of the context: the cartridge's P tokens (one copy, shared by its sessions) vs the article's tokens
    (icl, a copy per session), fp32."""
    from cartridges.kv_layout import kv_shape
    from cartridges.models import load_model

    loaded = load_model()
    layers, heads, dim = kv_shape(loaded.model.config)
    per_token = layers * 2 * heads * dim * 4
    article = len(loaded.tokenizer(corpus.text)["input_ids"])
    return {"per_token": per_token, "cartridge": tokens * per_token, "icl": article * per_token, "icl_tokens": article}


def write_report(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "sequential" not in results or "concurrent" not in results:  # a run of other phases only
        (out / "results.md").write_text(json.dumps(results, indent=2) + "\n")
        return
    seq, con = results["sequential"], results["concurrent"]
    lines = [
        f"# Server load, {results['corpus']}, cartridge {results['cartridge']}",
        "",
        "| clients | requests | failed | wall s | gen tok/s | TTFT p50 / p95 s | latency p50 / p95 s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in (seq, con):
        lines.append(
            f"| {row['concurrency']} | {row['requests']} | {row['failed']} | {row['wall_seconds']:.1f} | "
            f"{row['tokens_per_second']:.1f} | {row['ttft_p50']:.2f} / {row['ttft_p95']:.2f} | "
            f"{row['latency_p50']:.2f} / {row['latency_p95']:.2f} |"
        )
    lines += [
        "",
        f"Aggregate throughput, concurrent / sequential: {con['tokens_per_second'] / seq['tokens_per_second']:.2f}x",
        "",
    ]
    f = results.get("fuzz")
    if f is not None:
        lines += [
            f"Fuzz: {f['requests']} malformed requests, statuses {f['statuses']}, all 4xx: {f['all_4xx']}, "
            f"alive: {f['alive']}",
            "",
        ]
    if "cost" not in results:  # a run cut off before the cost phase
        (out / "results.md").write_text("\n".join(lines) + "\n")
        return
    lines += [
        "| method | clients | TTFT p50 s | decode tok/s per request | gen tok/s | KV held at most rows | per row |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["cost"]:
        rows_at_most = row.get("rows_at_most", 0)
        held = row.get("kv_bytes_at_most_rows", 0) / 2**20
        lines.append(
            f"| {row['method']} | {row['concurrency']} | {row['ttft_p50']:.2f} | "
            f"{row['decode_tokens_per_second_per_request']:.1f} | {row['tokens_per_second']:.1f} | "
            f"{held:.1f} MiB, {rows_at_most} rows | {held / max(rows_at_most, 1):.1f} MiB |"
        )
    kv = results["kv_bytes_per_session"]
    lines += [
        "",
        f"KV of the context: the cartridge {kv['cartridge'] / 2**20:.1f} MiB (one copy for all its sessions), "
        f"the article {kv['icl'] / 2**20:.1f} MiB ({kv['icl_tokens']} tokens, a copy per icl session)",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    cells = results["cost"]
    names = [f"{r['method']}\n{r['concurrency']} client(s)" for r in cells]
    axes[0].bar(names, [r["ttft_p50"] for r in cells])
    axes[0].set_ylabel("time to first token, p50 (s)")
    axes[1].bar(names, [r["tokens_per_second"] for r in cells])
    axes[1].set_ylabel("generated tokens/s (all clients)")
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    run_script(main)
