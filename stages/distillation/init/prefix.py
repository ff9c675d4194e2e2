"""The prefix training starts from, by `distill.init`: one place that knows every initialisation."""

import pyarrow.parquet as pq
import torch
from safetensors import safe_open

from cartridges.kv_layout import kv_shape
from cartridges.kv_prefix import kv_prefix_of_tokens
from cartridges.layout import context_token_ids
from cartridges.stages.distillation.config import DistillConfig
from cartridges.stages.distillation.init.sampled import sampled_token_ids
from cartridges.stages.distillation.init.summary import summary_token_ids
from cartridges.stages.ingest import DOCUMENT_SEPARATOR, read_chunks
from cartridges.stages.run_dir import RunDir

CLOSED_FORM = ("select", "matched", "matched_omp")  # blocks of the corpus's own KV, read at positions 0..P-1
INIT_METADATA_KEY = "cartridges.init"  # the initial prefix file names the init that made it (`auto` resolved)


def init_used(run: RunDir) -> str | None:
    """The init that made the run's initial prefix (`distill.init: auto` resolved; `warm_start` for a warm
    start); None for a run whose initial prefix predates the record."""
    with safe_open(str(run.init_prefix), framework="pt") as prefix_file:
        return (prefix_file.metadata() or {}).get(INIT_METADATA_KEY)


def resolved_init(loaded, text: str, init: str) -> str:
    """`init` itself, or for `auto`: `matched_omp` when the corpus fits one window of the model (one repeat
    pass reads it whole: 1-3 minutes for a 3.5-5.7k-token article on the 2-core box), `first_tokens` for
    a longer corpus (reading 206k tokens would take longer than the whole 15-minute build; BENCHMARKS.md)."""
    if init != "auto":
        return init
    from cartridges.stages.evaluation.methods.repeat_pass import segment_capacity

    capacity = segment_capacity(loaded)  # only the beginning is tokenized: a 206k-token corpus costs nothing here
    fits = len(context_token_ids(loaded.tokenizer, text, capacity + 1)) <= capacity
    return "matched_omp" if fits else "first_tokens"


def closed_form_prefix(loaded, text: str, method: str, num_tokens: int, max_tokens: int | None) -> torch.Tensor:
    """The `select`, `matched` or `matched_omp` block of `num_tokens` tokens (the whole corpus's KV if it is
    shorter), reading about `max_tokens` corpus tokens of a longer corpus (`matched_omp`: one window)."""
    if method in ("matched", "matched_omp"):
        from cartridges.stages.evaluation.methods.matched import matched_block

        key_choice = "omp" if method == "matched_omp" else "attention"
        return matched_block(loaded, text, num_tokens, max_tokens, key_choice=key_choice).prefix
    from cartridges.stages.evaluation.methods.select import selected_prefix

    return selected_prefix(loaded, text, num_tokens, max_tokens)


def initial_prefix(loaded, run: RunDir, config: DistillConfig) -> tuple[torch.Tensor, str]:
    """The prefix training starts from and the init that made it (`auto` resolved): KV of the first corpus
    tokens, a closed-form block of the corpus's KV, of spans sampled across the corpus, of the model's
    summaries of chunks across it, or random."""
    if config.init == "random":
        num_layers, num_kv_heads, head_dim = kv_shape(loaded.model.config)
        generator = torch.Generator().manual_seed(config.seed)
        shape = (config.num_tokens, num_layers * 2 * num_kv_heads * head_dim)
        return torch.randn(*shape, generator=generator), "random"
    text = DOCUMENT_SEPARATOR.join(pq.read_table(run.documents, columns=["text"]).column("text").to_pylist())
    init = resolved_init(loaded, text, config.init)
    if init in CLOSED_FORM:
        return closed_form_prefix(loaded, text, init, config.num_tokens, config.select_max_tokens), init
    if init == "sampled":
        ids = sampled_token_ids(loaded.tokenizer, text, config.num_tokens, config.sample_span_tokens, config.seed)
    elif init == "summary":
        chunks = [chunk.text for chunk in read_chunks(run)]
        ids = summary_token_ids(loaded, chunks, config.num_tokens, config.summary_tokens)
    else:
        ids = context_token_ids(loaded.tokenizer, text, config.num_tokens)
    return kv_prefix_of_tokens(loaded.model, ids), init
