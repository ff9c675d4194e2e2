"""`snapkv`: query-aware KV selection (SnapKV, arXiv 2404.14469) as a context block.

The whole corpus is prefilled; the question's chat (system instruction, question, assistant header:
the observation window that SnapKV takes from the end of the prompt) attends to it; each corpus
position is scored per layer and KV head by the attention the window pays it (summed over the
window and the query heads of the group, then max-pooled over neighbouring positions so that
phrases stay whole), and the top-B positions are kept with the attention sink. It sees the question,
so in use it costs a prefill of the whole corpus per question (the evaluation caches the corpus KV
and reports that cost instead of paying it).
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from cartridges.kv_layout import kv_shape
from cartridges.layout import chat_token_ids
from cartridges.models import LoadedModel
from cartridges.qa import Question
from cartridges.runtime import prefix_cache
from cartridges.stages.evaluation.contexts import Context, corpus_kv, keep_top_scored

POOL_KERNEL = 7  # SnapKV's default pooling window


@contextmanager
def eager_attention(model):
    """Attention weights are only returned by the eager implementation; the model's own is restored."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def attention_to_prefix(
    loaded: LoadedModel, prefix: torch.Tensor, window: list[int], reduce: str = "sum", first_query: int = 0
) -> torch.Tensor:
    """[tokens, layers, kv_heads]: the attention the `window` tokens (from `first_query` on), placed after
    the prefix KV, pay each prefix position, summed (or maxed) over those queries and over the query heads
    of each KV head."""
    model, shape = loaded.model, kv_shape(loaded.model.config)
    tokens = prefix.shape[0]
    input_ids = torch.tensor([window], device=model.device)
    positions = torch.arange(tokens, tokens + len(window), device=model.device)[None]
    mask = torch.ones(1, tokens + len(window), dtype=torch.long, device=model.device)
    cache = prefix_cache(prefix.to(model.device), *shape, batch_size=1)
    with torch.no_grad(), eager_attention(model):
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            output_attentions=True,
        )
    _, kv_heads, _ = shape
    per_layer = []
    for attention in out.attentions:  # [1, query_heads, window, tokens + window]
        paid = attention[0, :, first_query:, :tokens].float()  # [query_heads, queries, tokens]
        grouped = paid.reshape(kv_heads, -1, tokens)  # query heads grouped by KV head (GQA), queries folded in
        per_layer.append(grouped.sum(dim=1) if reduce == "sum" else grouped.amax(dim=1))
    return torch.stack(per_layer).permute(2, 0, 1)  # [tokens, layers, kv_heads]


def pooled(scores: torch.Tensor, kernel: int = POOL_KERNEL) -> torch.Tensor:
    """Max-pool [tokens, layers, heads] scores over neighbouring tokens."""
    tokens, layers, heads = scores.shape
    flat = scores.permute(1, 2, 0).reshape(layers * heads, 1, tokens)
    out = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    return out.reshape(layers, heads, tokens).permute(2, 0, 1)


class QuestionSelectedContext:
    """Per question, the `budget` corpus positions (per layer and KV head) its chat attends to most."""

    def __init__(self, loaded: LoadedModel, text: str, budget: int):
        self.loaded, self.budget = loaded, budget
        self.corpus = corpus_kv(loaded, text)
        self._cache: dict[str, Context] = {}

    def context(self, question: Question) -> Context:
        if question.id not in self._cache:
            window = chat_token_ids(self.loaded.tokenizer, [{"role": "user", "content": question.question}])
            self._cache[question.id] = keep_top_scored(
                self.corpus,
                kv_shape(self.loaded.model.config),
                self.budget,
                lambda: pooled(attention_to_prefix(self.loaded, self.corpus, window)),
            )
        return self._cache[question.id]
