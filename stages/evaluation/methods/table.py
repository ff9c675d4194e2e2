"""The evaluation methods by name, in one table: how each one's context block is made. `cartridges eval
--method`, its help and the benchmarks read it. Each baseline that needs more than a few lines (KV
selection, reconstruction, presses, retrieval, prompt compression, parallel encoding) is a module of its
own beside this one; they import `contexts` and are imported only here, so no two of them import
each other. A new method is one module and one row.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from cartridges.errors import CartridgeError
from cartridges.kv_layout import kv_shape
from cartridges.models import LoadedModel
from cartridges.stages.evaluation.contexts import Context, ContextSource, FixedContext, corpus_kv
from cartridges.stages.evaluation.methods.ape import documents_of, parallel_context
from cartridges.stages.evaluation.methods.kvzip import kvzip_context
from cartridges.stages.evaluation.methods.layerwise import layerwise_prefix
from cartridges.stages.evaluation.methods.lingua import compressed_context
from cartridges.stages.evaluation.methods.matched import matched_block, matched_prefix
from cartridges.stages.evaluation.methods.presses import PRESSES, compress
from cartridges.stages.evaluation.methods.rag import RetrievedContext
from cartridges.stages.evaluation.methods.select import selected_prefix
from cartridges.stages.evaluation.methods.snapkv import QuestionSelectedContext

# What fixes the block's size: a KV budget B (`--budget`), the whole corpus, or a given cartridge.
Size = Literal["budget", "whole", "given"]


@dataclass(frozen=True)
class Method:
    size: Size
    # (model, corpus text, budget or None, cartridge prefix or None) -> the method's context source
    source: Callable[[LoadedModel, str, int | None, torch.Tensor | None], ContextSource]


def _fixed(block: Callable[[LoadedModel, str, int | None], Context]) -> Callable[..., ContextSource]:
    """A method whose block is the same before every question."""
    return lambda loaded, text, budget, cartridge: FixedContext(block(loaded, text, budget))


def _given(loaded: LoadedModel, text: str, budget: int | None, cartridge: torch.Tensor | None) -> ContextSource:
    if cartridge is None:
        raise CartridgeError("method 'cartridge' needs a cartridge: pass --cartridge NAME[@VERSION]")
    return FixedContext(Context(cartridge))


def _matched(
    loaded: LoadedModel, text: str, budget: int | None, biases: bool, key_choice: str = "attention"
) -> Context:
    """A `matched` block with or without per-key attention-mass biases (which the project's runtime applies
    and a PEFT prefix cannot); keys by attention (`select`'s) or by matching pursuit on the mass fit."""
    block = matched_block(loaded, text, budget, biases=biases, key_choice=key_choice)
    return Context(block.prefix, key_bias=block.key_bias)


def _press(name: str) -> Method:
    return Method(
        "budget",
        _fixed(
            lambda loaded, text, budget: compress(corpus_kv(loaded, text), kv_shape(loaded.model.config), budget, name)
        ),
    )


TABLE: dict[str, Method] = {
    "none": Method("whole", _fixed(lambda loaded, text, budget: Context(None))),
    "icl": Method("whole", _fixed(lambda loaded, text, budget: Context(corpus_kv(loaded, text)))),
    "truncated": Method("budget", _fixed(lambda loaded, text, budget: Context(corpus_kv(loaded, text, budget)))),
    "select": Method("budget", _fixed(lambda loaded, text, budget: Context(selected_prefix(loaded, text, budget)))),
    "matched": Method("budget", _fixed(lambda loaded, text, budget: Context(matched_prefix(loaded, text, budget)))),
    "matched-bias": Method("budget", _fixed(lambda loaded, text, budget: _matched(loaded, text, budget, True))),
    "matched-omp": Method("budget", _fixed(lambda loaded, text, budget: _matched(loaded, text, budget, False, "omp"))),
    "matched-omp-bias": Method(
        "budget", _fixed(lambda loaded, text, budget: _matched(loaded, text, budget, True, "omp"))
    ),
    "matched-layerwise": Method(
        "budget", _fixed(lambda loaded, text, budget: Context(layerwise_prefix(loaded, text, budget)))
    ),
    "matched-omp-layerwise": Method(
        "budget", _fixed(lambda loaded, text, budget: Context(layerwise_prefix(loaded, text, budget, "omp")))
    ),
    "kvzip": Method("budget", _fixed(kvzip_context)),
    "rag": Method("budget", lambda loaded, text, budget, cartridge: RetrievedContext(loaded, text, budget)),
    **{name: _press(name) for name in PRESSES},
    "snapkv": Method("budget", lambda loaded, text, budget, cartridge: QuestionSelectedContext(loaded, text, budget)),
    "lingua": Method("budget", _fixed(compressed_context)),
    "ape": Method("whole", _fixed(lambda loaded, text, budget: parallel_context(loaded, documents_of(text)))),
    "cartridge": Method("given", _given),
}
METHODS = tuple(TABLE)
BUDGET_METHODS = tuple(name for name, method in TABLE.items() if method.size == "budget")
WHOLE_CORPUS_METHODS = ("icl", "ape")  # no KV budget: every corpus token is in the block


def context_source(
    loaded: LoadedModel, method: str, text: str, budget: int | None, cartridge: torch.Tensor | None = None
) -> ContextSource:
    """The context source of `method` over corpus `text` at a KV budget of `budget` tokens."""
    if method not in TABLE:
        raise CartridgeError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if TABLE[method].size == "budget" and (budget is None or budget < 2):
        raise CartridgeError(f"method {method!r} needs a KV budget of at least 2 tokens (--budget)")
    return TABLE[method].source(loaded, text, budget, cartridge)
