"""Time to first token of a question about a whole collection, served: the library on `cartridges serve`
against BM25 rag with its passages in the prompt, on vLLM's own OpenAI server (prefix caching on, the
engine a user would serve rag with) and on `cartridges serve` (the plain model), at 1 and N clients.

One run, one server at a time on 127.0.0.1, the same questions (`bench/library.py`'s collection) and the
same system prompt everywhere, streamed through the openai client with a few answer tokens. rag's
passages are the evaluation's (`RetrievedContext.block_ids`: BM25 over 64-token passages, cut at the
budget); retrieving them runs in this process before a request is sent, and is reported beside the
servers' times (the library routes inside the server, so its time to first token includes routing).
Writes results.json and results.md under --out.

    python bench/library_serving.py --qa ../shared/data/qa/legal_housingqa.json --suite legal-all \
        --registry /tmp/libruns/out/legal-all/registry --library legal-all@1 --budget 1024
"""

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import openai

from cartridges.bench.library import collection
from cartridges.bench.run_record import record_header
from cartridges.bench.serve_load import free_port, one, percentile, wait_for
from cartridges.bench.synthesis_engines import engine_env
from cartridges.errors import run_script
from cartridges.layout import DEFAULT_SYSTEM_PROMPT
from cartridges.models import load_model, resolve_model_path
from cartridges.qa import load_qa_files
from cartridges.stages.evaluation.methods.rag import RetrievedContext

WARM_UP = 2  # requests sent first and not counted (a server's first request pays its lazy start-up)


def rag_prompt(passages: str, question: str) -> list[dict]:
    return [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": f"{passages}\n\nQuestion: {question}"},
    ]


def plain_prompt(question: str) -> list[dict]:
    return [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": question}]


async def cell(
    url: str,
    model: str,
    warm_up: list[list[dict]],
    prompts: list[list[dict]],
    clients: int,
    max_tokens: int,
    extra: dict,
) -> dict:
    """The prompts sent by `clients` clients at once, after the warm-up ones one by one: time to first token
    and end to end. No prompt is sent twice in a run, so vLLM's prefix cache holds none of a cell's prompts
    (only what prompts share: the system prompt)."""
    gate = asyncio.Semaphore(clients)
    async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=1800) as client:
        for messages in warm_up:
            await one(client, model, messages, max_tokens, extra or None)

        async def job(messages):
            async with gate:
                return await one(client, model, messages, max_tokens, extra or None)

        started = time.perf_counter()
        results = await asyncio.gather(*(job(m) for m in prompts))
        wall = time.perf_counter() - started
    ttft = [r["ttft"] for r in results]
    return {
        "clients": clients,
        "requests": len(prompts),
        "ttft_mean": statistics.mean(ttft),
        "ttft_p50": percentile(ttft, 50),
        "ttft_p95": percentile(ttft, 95),
        "latency_p50": percentile([r["seconds"] for r in results], 50),
        "wall_seconds": wall,
    }


def started_server(command: list[str], env: dict[str, str], url: str, log: Path) -> subprocess.Popen:
    server = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_for(url, server)
    except BaseException:
        stop(server)
        raise
    return server


def stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qa", type=Path, required=True)
    parser.add_argument("--suite", required=True, help="legal-all or squad-all (as bench/library.py)")
    parser.add_argument("--registry", required=True, help="the registry holding --library")
    parser.add_argument("--library", required=True, help="the library's reference")
    parser.add_argument("--budget", type=int, default=1024, help="KV tokens: the library's units, rag's passages")
    parser.add_argument("--per-corpus", type=int, default=2, help="questions per corpus, evenly spaced")
    parser.add_argument("--requests", type=int, default=16, help="requests per cell (each cell asks new questions)")
    parser.add_argument("--clients", type=int, action="append", default=None, help="concurrent clients (1 and 16)")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--servers", default="cartridges,vllm", help="comma list of the servers to run")
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results") / date.today().isoformat() / "library-serving"
    )
    args = parser.parse_args()
    clients = args.clients or [1, 16]
    out = args.out / args.suite
    out.mkdir(parents=True, exist_ok=True)
    corpora = load_qa_files([args.qa], None)
    questions, _ = collection(corpora, args.per_corpus, args.suite.startswith("legal"))
    asked = [q.question for q in questions.questions]
    needed = WARM_UP + args.requests * len(clients)  # the last questions warm a server up, the cells take the first
    if len(asked) < needed:
        raise SystemExit(f"{len(asked)} questions, {needed} needed: raise --per-corpus or lower --requests")

    loaded = load_model()
    retriever = RetrievedContext(loaded, questions.text, args.budget)
    retrieval, rag = [], []
    for question in asked:
        started = time.perf_counter()
        ids = retriever.block_ids(question)
        retrieval.append(time.perf_counter() - started)
        rag.append(rag_prompt(loaded.tokenizer.decode(ids), question))
    record = {
        **record_header(vars(args)),
        "questions": len(asked),
        "retrieval_seconds_mean": statistics.mean(retrieval),
        "rows": [],
    }
    del loaded, retriever

    def measure(server: str, method: str, url: str, model: str, prompts, extra=None) -> None:
        for index, count in enumerate(clients):
            chosen = prompts[index * args.requests : (index + 1) * args.requests]
            timing = cell(url, model, prompts[-WARM_UP:], chosen, count, args.max_tokens, extra or {})
            row = {"server": server, "method": method, **asyncio.run(timing)}
            record["rows"].append(row)
            print(json.dumps(row), flush=True)
            (out / "results.json").write_text(json.dumps(record, indent=2))

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    if "cartridges" in args.servers:
        command = [sys.executable, "-m", "cartridges.pipeline.cli", "serve", "--port", str(port)]
        command += ["--registry", args.registry, "--max-batch", str(max(clients)), "--no-ui"]
        server = started_server(command, dict(os.environ), url, out / "cartridges-serve.log")
        try:
            library = {"library": {"budget": args.budget}}
            measure("cartridges serve", "library", url, args.library, [plain_prompt(q) for q in asked], library)
            measure("cartridges serve", "rag", url, "default", rag)
            measure("cartridges serve", "none", url, "default", [plain_prompt(q) for q in asked])
        finally:
            stop(server)
    if "vllm" in args.servers:
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(resolve_model_path(None))]
        command += ["--served-model-name", "default", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--dtype", "float32", "--max-model-len", "4096", "--enable-prefix-caching", "--seed", "0"]
        cores = sorted(os.sched_getaffinity(0))
        env = engine_env("vllm") | {"VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}-{cores[-1]}"}
        server = started_server(command, env, url, out / "vllm-serve.log")
        try:
            measure("vllm", "rag", url, "default", rag)
            measure("vllm", "none", url, "default", [plain_prompt(q) for q in asked])
        finally:
            stop(server)
    (out / "results.json").write_text(json.dumps(record, indent=2))
    (out / "results.md").write_text(markdown(record))
    print(markdown(record))


def markdown(record: dict) -> str:
    lines = [
        f"{record['args']['suite']}: {record['questions']} questions, B={record['args']['budget']}; rag's retrieval "
        f"(BM25, in the client) {record['retrieval_seconds_mean']:.3f} s a question, not in the servers' times",
        "",
        "| server | method | clients | TTFT mean s | TTFT p50 s | TTFT p95 s | latency p50 s | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        lines.append(
            f"| {r['server']} | {r['method']} | {r['clients']} | {r['ttft_mean']:.3f} | {r['ttft_p50']:.3f} | "
            f"{r['ttft_p95']:.3f} | {r['latency_p50']:.3f} | {r['wall_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_script(main)
