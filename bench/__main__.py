"""`python -m cartridges.bench COMMAND [ARGS]`: run one benchmark (`--help` after a command for its flags)."""

import importlib
import sys

from cartridges.errors import run_script

COMMANDS = {
    "methods": "every method at every KV budget on every QA corpus, side by side",
    "methods-report": "tables and plots of methods runs, several merged into one",
    "grid-report": "issue 19's grid as one report, from bench/results/grid-parts.json",
    "distill-sweep": "distillation settings (seed mix, lr, steps, P, init) against each other",
    "trials-table": "trials of several distill-sweep runs side by side, paired per question",
    "samples-curve": "gold NLL against the number of distinct samples, from earlier sweeps",
    "headroom": "no context against the whole corpus in context, per QA corpus",
    "synthesis-engines": "self-study synthesis with the HF and vLLM engines",
    "teacher-scoring": "the teacher's scoring pass, padded against packed batches",
    "train-speed": "tokens/s of the training loop alone",
    "serve-load": "the server under load on 127.0.0.1: throughput, latency, malformed requests",
    "prefill-fairness": "a long prompt's effect on a short request's time to first token",
    "decoder-speed": "the server's batch decoder without HTTP",
    "kv-storage": "prefill against loading a corpus's stored KV at fp32/fp16/int8",
    "corpus-memory": "peak memory of reading a long one-line corpus file",
    "library": "a library of per-document cartridges routed per question, against retrieval and the oracles",
    "library-report": "several library runs of one suite as one table and plots (recovery, cost against quality)",
    "library-composition": "a library's units made and composed four ways (sinks, in-document KV), paired",
    "library-serving": "time to first token served: the library in cartridges serve, rag in vLLM's OpenAI server",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        listing = "\n".join(f"  {name:<{width}}  {what}" for name, what in COMMANDS.items())
        print(f"usage: python -m cartridges.bench COMMAND [ARGS]\n\ncommands:\n{listing}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command = argv[0]
    module = importlib.import_module(f"cartridges.bench.{command.replace('-', '_')}")
    sys.argv = [f"python -m cartridges.bench {command}", *argv[1:]]
    run_script(module.main)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
