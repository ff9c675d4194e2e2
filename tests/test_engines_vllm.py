"""vLLM and HF must write the same teacher signal (slow: vLLM compiles for about two minutes on CPU)."""

import numpy as np
import pytest

from cartridges.layout import chat_token_ids, context_token_ids
from cartridges.stages.synthesis.engines import HFEngine
from cartridges.stages.synthesis.vllm_engine import VLLMEngine, vllm_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (make setup-vllm)"),
]

# Measured on SmolLM2-135M fp32 (2026-11-26): largest log-probability difference 4.3e-5, top-20 overlap 100%.
LOGPROB_ATOL = 1e-3
MIN_TOPK_OVERLAP = 0.95


def test_vllm_and_hf_score_a_fixed_answer_alike(smollm2):
    text = "Section 24.005. A landlord must give a tenant who defaults at least three days' written notice to vacate."
    tokenizer = smollm2.tokenizer
    prompt = context_token_ids(tokenizer, text) + chat_token_ids(
        tokenizer, [{"role": "user", "content": "How much notice?"}]
    )
    answer = tokenizer("At least three days' written notice to vacate.", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    hf = HFEngine(str(smollm2.path), pad_token_id=tokenizer.pad_token_id).score([prompt], [answer], top_k=20)[0]
    vllm = VLLMEngine(str(smollm2.path), max_model_len=1024, top_k=20).score([prompt], [answer], top_k=20)[0]
    np.testing.assert_allclose(vllm.token_logprobs, hf.token_logprobs, atol=LOGPROB_ATOL)
    overlap = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(vllm.topk_ids, hf.topk_ids)])
    assert overlap >= MIN_TOPK_OVERLAP
    assert [ids[0] for ids in vllm.topk_ids] == [ids[0] for ids in hf.topk_ids]
    np.testing.assert_allclose(
        [lp[0] for lp in vllm.topk_logprobs], [lp[0] for lp in hf.topk_logprobs], atol=LOGPROB_ATOL
    )
