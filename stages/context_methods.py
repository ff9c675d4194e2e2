"""The evaluation methods by name: how each one's context block is made (`cartridges eval --method`,
the benchmarks). The blocks and the presses are in `contexts`; the baselines that need more (KV
selection, reconstruction, prompt compression, parallel encoding) in modules of their own, which
import `contexts` and are imported only here, so no two of them import each other.
"""

import torch

from cartridges.artifact import kv_shape
from cartridges.errors import CartridgeError
from cartridges.models import LoadedModel
from cartridges.stages.contexts import (
    PRESSES,
    Context,
    ContextSource,
    FixedContext,
    RetrievedContext,
    compress,
    corpus_kv,
)
from cartridges.stages.kv_reconstruction import selected_prefix
from cartridges.stages.kv_selection import QuestionSelectedContext
from cartridges.stages.parallel_encoding import documents_of, parallel_context
from cartridges.stages.prompt_compression import compressed_context

METHODS = ("none", "icl", "truncated", "select", "rag", *PRESSES, "snapkv", "lingua", "ape", "cartridge")
WHOLE_CORPUS_METHODS = ("icl", "ape")  # no KV budget: every corpus token is in the block


def context_source(
    loaded: LoadedModel, method: str, text: str, budget: int | None, cartridge: torch.Tensor | None = None
) -> ContextSource:
    """The context source of `method` over corpus `text` at a KV budget of `budget` tokens."""
    if method not in METHODS:
        raise CartridgeError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if method == "none":
        return FixedContext(Context(None))
    if method == "icl":
        return FixedContext(Context(corpus_kv(loaded, text)))
    if method == "ape":
        return FixedContext(parallel_context(loaded, documents_of(text)))
    if method == "cartridge":
        if cartridge is None:
            raise CartridgeError("method 'cartridge' needs a cartridge: pass --cartridge NAME[@VERSION]")
        return FixedContext(Context(cartridge))
    if budget is None or budget < 2:
        raise CartridgeError(f"method {method!r} needs a KV budget of at least 2 tokens (--budget)")
    if method == "truncated":
        return FixedContext(Context(corpus_kv(loaded, text, budget)))
    if method == "select":
        return FixedContext(Context(selected_prefix(loaded, text, budget)))
    if method == "rag":
        return RetrievedContext(loaded, text, budget)
    if method == "snapkv":
        return QuestionSelectedContext(loaded, text, budget)
    if method == "lingua":
        return FixedContext(compressed_context(loaded, text, budget))
    return FixedContext(compress(corpus_kv(loaded, text), kv_shape(loaded.model.config), budget, method))
