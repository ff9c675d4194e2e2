"""vLLM's offline `LLM` behind the engines' interface (`engines`): faster where answers are generated
on a GPU; on a small CPU box the HF engine matches it without its minutes of start-up."""

import os

import torch

from cartridges.stages.synthesis.engines import (
    SMALL_MACHINE_CORES,
    Completion,
    SamplingConfig,
    TokenScores,
    _cut_after_stop,
)


def _scores_from_vllm(tokens: list[int], per_position: list[dict], top_k: int) -> TokenScores:
    """vLLM returns top-k entries per position, plus the chosen token when it is outside them."""
    topk_ids, topk_logprobs, token_logprobs = [], [], []
    for token, entries in zip(tokens, per_position):
        ranked = sorted(entries.items(), key=lambda item: -item[1].logprob)[:top_k]
        topk_ids.append([token_id for token_id, _ in ranked])
        topk_logprobs.append([entry.logprob for _, entry in ranked])
        token_logprobs.append(entries[token].logprob)
    return TokenScores(topk_ids, topk_logprobs, token_logprobs)


class VLLMEngine:
    """vLLM's offline `LLM`: one engine per stage run (start-up compiles for minutes on CPU)."""

    name = "vllm"

    def __init__(self, model_path: str, max_model_len: int, top_k: int, seed: int = 0):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        from vllm import LLM

        on_cpu = not torch.cuda.is_available()
        cores = sorted(os.sched_getaffinity(0))
        if on_cpu and len(cores) <= SMALL_MACHINE_CORES and cores == list(range(cores[0], cores[-1] + 1)):
            # vLLM-CPU keeps one core for its front end; on a small box that is half the machine: on
            # 2 cores binding both made synthesis faster (BENCHMARKS.md). VLLM_CPU_OMP_THREADS_BIND overrides.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}-{cores[-1]}")
        # vLLM-CPU 0.32 crashes ("CPU Generator does not use offset") when a request with its own
        # seed has its prefill chunked; on CPU only the engine-level seed is used.
        self.per_request_seeds = not on_cpu
        self.llm = LLM(
            model=model_path,
            dtype="float32" if on_cpu else "auto",
            max_model_len=max_model_len,
            max_logprobs=top_k,
            seed=seed,
        )

    def generate(
        self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int], top_k: int | None = None
    ) -> list[Completion]:
        from vllm import SamplingParams

        params = [
            SamplingParams(
                max_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
                stop_token_ids=list(sampling.stop_token_ids),
                seed=seed if self.per_request_seeds else None,
                logprobs=top_k,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        completions = []
        for output in outputs:
            tokens = _cut_after_stop(list(output.outputs[0].token_ids), sampling.stop_token_ids)
            scores = _scores_from_vllm(tokens, output.outputs[0].logprobs, top_k) if top_k is not None else None
            completions.append(Completion(tokens, scores))
        return completions

    def score(self, prompts: list[list[int]], answers: list[list[int]], top_k: int) -> list[TokenScores]:
        # Prompt log-probabilities bypass vLLM's prefix cache (its default); reading the cache anyway
        # crashed vLLM-CPU 0.32 while detokenizing the cached positions (OverflowError), so every
        # request prefills its whole chunk here, unlike the HF engine.
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k)
        outputs = self.llm.generate(
            [{"prompt_token_ids": p + a} for p, a in zip(prompts, answers)], params, use_tqdm=False
        )
        return [
            _scores_from_vllm(answer, output.prompt_logprobs[len(prompt) : len(prompt) + len(answer)], top_k)
            for prompt, answer, output in zip(prompts, answers, outputs)
        ]

    def close(self) -> None:
        # Without an explicit shutdown the engine core's threads are torn down at interpreter exit,
        # which aborts the process ("terminate called without an active exception") after the work is done.
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None


def vllm_available() -> bool:
    # vLLM logs dozens of INFO lines per start, which bury the stage's progress; set
    # VLLM_LOGGING_LEVEL=INFO to see them. Set before the first import: vLLM reads it then.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm  # noqa: F401
    except Exception:  # vLLM can fail at import for many environment reasons; all mean "not here"
        return False
    return True
