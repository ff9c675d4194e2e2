"""`library`: per question, the units a library's router picks within the KV budget, composed as the
library composes them (`Library.placed`).

`gold_source` makes the control: the same router with the question's gold document's units taken
out, so the block is the best-scoring wrong units (what a routing miss costs, and whether a block of
the corpus's style alone helps). `order` and `positions` measure other compositions than the library's.
"""

import torch

from cartridges.library.index import Order, Positions
from cartridges.library.library import Library, RoutedUnit
from cartridges.qa import Question
from cartridges.stages.evaluation.contexts import Context


class RoutedContext:
    def __init__(
        self,
        library: Library,
        budget: int | None,
        model,
        gold_source=None,
        order: Order | None = None,
        positions: Positions | None = None,
    ):
        """`gold_source(question)`: the document a question is about; given, its units are never routed."""
        self.library, self.budget, self.model, self.gold_source = library, budget, model, gold_source
        self.order, self.positions = order, positions
        self.routes: dict[str, list[RoutedUnit]] = {}

    def context(self, question: Question) -> Context:
        if question.id not in self.routes:
            exclude = frozenset() if self.gold_source is None else frozenset({self.gold_source(question)})
            self.routes[question.id] = self.library.route(
                question.question, self.budget, exclude=exclude, order=self.order
            )
        parts = self.library.placed(self.routes[question.id], self.model, positions=self.positions)
        return Context(torch.cat(parts))
