"""Gold-answer likelihood: mean NLL per answer token of an answer after the shared chat layout.

Every method (no context, corpus text, cartridge, trained prefix) is a `forward` function from
right-padded token ids to logits; the context block lives inside it. So the same questions and
answers are scored in exactly the same way for all of them.
"""

from collections.abc import Callable, Sequence

import torch

from cartridges.layout import chat_token_ids
from cartridges.serving.batching import pad_batch

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def answer_token_ids(tokenizer, answer: str) -> list[int]:
    return tokenizer(answer, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def mean_answer_nll(
    forward: Forward, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 8, pad_token_id: int = 0
) -> list[float]:
    """For each (question, answer): mean NLL per token of the answer given the chat with the question."""
    sequences = []
    for question, answer in pairs:
        prompt = chat_token_ids(tokenizer, [{"role": "user", "content": question}])
        sequences.append((prompt, answer_token_ids(tokenizer, answer)))
    results: list[float] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        ids, mask = pad_batch([prompt + answer for prompt, answer in chunk], pad_token_id)
        logprobs = torch.log_softmax(forward(ids, mask).float(), dim=-1)
        for row, (prompt, answer) in enumerate(chunk):
            predicted = logprobs[row, len(prompt) - 1 : len(prompt) + len(answer) - 1]
            token_lp = predicted.gather(-1, torch.tensor(answer, device=predicted.device).unsqueeze(-1)).squeeze(-1)
            results.append(-token_lp.mean().item())
    return results
