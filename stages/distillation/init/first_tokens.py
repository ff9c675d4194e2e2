"""Init: a cartridge whose KV prefix is the model's own cache of the first N corpus tokens.

This is the starting point of distillation and the "truncated context" baseline: loaded as a
prefix it reproduces the logits of the model with those tokens in context.
"""

from pathlib import Path

from cartridges.artifact.folder import describe_model, save_artifact
from cartridges.artifact.manifest import CorpusInfo, Manifest
from cartridges.errors import CartridgeError
from cartridges.kv_layout import NUM_FROZEN_TOKENS, cartridge_peft_config
from cartridges.kv_prefix import kv_prefix_of_tokens
from cartridges.layout import context_token_ids
from cartridges.models import LoadedModel
from cartridges.stages.ingest import Corpus
from cartridges.tokenizing import count_tokens


def corpus_info(loaded: LoadedModel, corpus: Corpus, corpus_token_count: int) -> CorpusInfo:
    return CorpusInfo(
        fingerprint=corpus.fingerprint(loaded.tokenizer_fingerprint),
        num_documents=len(corpus.documents),
        num_tokens=corpus_token_count,
        source=str(corpus.root),
    )


def init_cartridge(loaded: LoadedModel, corpus: Corpus, num_tokens: int, name: str, destination: Path) -> Manifest:
    """Build an `init` cartridge of the first `num_tokens` corpus tokens (fewer if the corpus is shorter)."""
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
    embeddings = kv_prefix_of_tokens(loaded.model, token_ids)
    manifest = Manifest(
        name=name,
        **describe_model(loaded),
        num_tokens=len(token_ids),
        num_frozen_tokens=NUM_FROZEN_TOKENS,
        dtype=str(embeddings.dtype).removeprefix("torch."),
        corpus=[corpus_info(loaded, corpus, corpus_tokens)],
        method="init",
        method_config={"requested_tokens": num_tokens, "source": "first corpus tokens"},
    )
    config = cartridge_peft_config(loaded.model.config, len(token_ids), NUM_FROZEN_TOKENS)
    return save_artifact(destination, embeddings, config, manifest)
