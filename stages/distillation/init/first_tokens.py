"""Init: an untrained cartridge, by default the model's own cache of the first N corpus tokens.

That is the starting point of distillation and the "truncated context" baseline: loaded as a
prefix it reproduces the logits of the model with those tokens in context. `select` and `matched`
publish a closed-form block of the corpus instead (minutes, no training).
"""

from pathlib import Path

from cartridges.artifact.folder import describe_model, save_artifact
from cartridges.artifact.manifest import CorpusInfo, Manifest
from cartridges.errors import CartridgeError
from cartridges.kv_layout import NUM_FROZEN_TOKENS, cartridge_peft_config
from cartridges.kv_prefix import kv_prefix_of_tokens
from cartridges.layout import context_token_ids
from cartridges.models import LoadedModel
from cartridges.stages.distillation.init.prefix import closed_form_prefix
from cartridges.stages.ingest import Corpus
from cartridges.tokenizing import count_tokens


def corpus_info(loaded: LoadedModel, corpus: Corpus, corpus_token_count: int) -> CorpusInfo:
    return CorpusInfo(
        fingerprint=corpus.fingerprint(loaded.tokenizer_fingerprint),
        num_documents=len(corpus.documents),
        num_tokens=corpus_token_count,
        source=str(corpus.root),
    )


SOURCES = {
    "first_tokens": "first corpus tokens",
    "select": "the corpus tokens reconstruction attends to most, per layer and KV head (select)",
    "matched": "select's keys with values fitted to the whole corpus's attention output (matched)",
    "matched_omp": "keys chosen by matching pursuit on the corpus's attention mass, values fitted (matched-omp)",
}


def init_source(method: str) -> str:
    """What an init cartridge of `method` is made from (its manifest says so); an unknown method is one line."""
    if method not in SOURCES:
        raise CartridgeError(f"unknown init method {method!r}: use one of {', '.join(SOURCES)}")
    return SOURCES[method]


def init_cartridge(
    loaded: LoadedModel,
    corpus: Corpus,
    num_tokens: int,
    name: str,
    destination: Path,
    method: str = "first_tokens",
    max_tokens: int | None = None,
) -> Manifest:
    """Build an untrained (`init`) cartridge of `num_tokens` tokens (fewer if the corpus is shorter): the
    first corpus tokens' KV, or a closed-form block of the corpus (`select`, `matched`; a corpus longer
    than the model's window is read in segments, about `max_tokens` of its tokens)."""
    source = init_source(method)
    if num_tokens < NUM_FROZEN_TOKENS + 1:
        raise CartridgeError(f"--tokens must be at least {NUM_FROZEN_TOKENS + 1}, got {num_tokens}")
    window = loaded.model.config.max_position_embeddings
    if num_tokens >= window:
        raise CartridgeError(
            f"--tokens {num_tokens} does not fit {loaded.model_id}, which reads at most {window} positions "
            f"(cartridge and chat together): use --tokens {window // 2} or fewer"
        )
    text = corpus.text
    token_ids = context_token_ids(loaded.tokenizer, text, num_tokens)  # only the beginning is tokenized
    corpus_tokens = len(context_token_ids(loaded.tokenizer, "")) + count_tokens(loaded.tokenizer, text)
    if len(token_ids) < NUM_FROZEN_TOKENS + 1:
        raise CartridgeError(f"corpus {corpus.root} has only {len(token_ids)} token(s): add text")
    if method == "first_tokens":
        embeddings = kv_prefix_of_tokens(loaded.model, token_ids)
    else:
        embeddings = closed_form_prefix(loaded, text, method, num_tokens, max_tokens)
    manifest = Manifest(
        name=name,
        **describe_model(loaded),
        num_tokens=embeddings.shape[0],
        num_frozen_tokens=NUM_FROZEN_TOKENS,
        dtype=str(embeddings.dtype).removeprefix("torch."),
        corpus=[corpus_info(loaded, corpus, corpus_tokens)],
        method="init",
        method_config={"requested_tokens": num_tokens, "source": source, "init": method},
    )
    config = cartridge_peft_config(loaded.model.config, embeddings.shape[0], NUM_FROZEN_TOKENS)
    return save_artifact(destination, embeddings, config, manifest)
