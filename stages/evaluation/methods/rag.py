"""`rag`: BM25-retrieved corpus passages up to the KV budget, per question."""

from cartridges.errors import CartridgeError
from cartridges.kv_prefix import kv_prefix_of_tokens
from cartridges.layout import context_token_ids
from cartridges.models import LoadedModel
from cartridges.qa import Question
from cartridges.stages.evaluation.contexts import Context


class RetrievedContext:
    """BM25 (`bm25s`) over corpus passages of `passage_tokens`; per question, the best passages in rank order, cut at the budget."""

    def __init__(self, loaded: LoadedModel, text: str, budget: int, passage_tokens: int = 64):
        import bm25s

        self.loaded, self.budget = loaded, budget
        ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        self.passages = [
            loaded.tokenizer.decode(ids[i : i + passage_tokens]) for i in range(0, len(ids), passage_tokens)
        ]
        if not self.passages:
            raise CartridgeError("rag needs a non-empty corpus text")
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(self.passages, stopwords="en", show_progress=False), show_progress=False)
        self._cache: dict[str, Context] = {}

    def ranked_passages(self, query: str) -> list[str]:
        import bm25s

        tokens = bm25s.tokenize([query], stopwords="en", show_progress=False)
        order, _ = self.retriever.retrieve(tokens, k=len(self.passages), show_progress=False)
        return [self.passages[i] for i in order[0]]

    def block_ids(self, query: str) -> list[int]:
        """The token ids of the block for `query`: the best passages joined by newlines, cut at the budget
        (what a rag prompt holds; `bench/library_serving.py` sends their text to a server)."""
        chosen: list[str] = []
        for passage in self.ranked_passages(query):
            chosen.append(passage)
            if len(context_token_ids(self.loaded.tokenizer, "\n".join(chosen))) >= self.budget:
                break  # the last passage is cut at the budget
        return context_token_ids(self.loaded.tokenizer, "\n".join(chosen), self.budget)

    def context(self, question: Question) -> Context:
        if question.id not in self._cache:
            self._cache[question.id] = Context(
                kv_prefix_of_tokens(self.loaded.model, self.block_ids(question.question))
            )
        return self._cache[question.id]
