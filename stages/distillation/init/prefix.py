"""The prefix training starts from, by `distill.init`: one place that knows every initialisation."""

from collections.abc import Sequence

import pyarrow.parquet as pq
import torch
from safetensors import safe_open

from cartridges.kv_layout import kv_shape
from cartridges.kv_prefix import kv_prefix_of_tokens
from cartridges.layout import context_token_ids
from cartridges.stages.distillation.config import FITTED_STARTS, DistillConfig
from cartridges.stages.distillation.init.sampled import sampled_token_ids
from cartridges.stages.distillation.init.summary import summary_token_ids
from cartridges.stages.ingest import DOCUMENT_SEPARATOR, read_chunks
from cartridges.stages.run_dir import RunDir

CLOSED_FORM = ("select", "matched", "matched_omp")  # blocks of the corpus's own KV, read at positions 0..P-1
OMP_MAX_TOKENS = 256  # `auto` pursues keys (matched_omp) up to this block size, fits select's keys (matched) above
INIT_METADATA_KEY = "cartridges.init"  # the initial prefix file names the init that made it (`auto` resolved)


def init_used(run: RunDir) -> str | None:
    """The init that made the run's initial prefix (`distill.init: auto` resolved; `warm_start` for a warm
    start); None for a run whose initial prefix predates the record."""
    with safe_open(str(run.init_prefix), framework="pt") as prefix_file:
        return (prefix_file.metadata() or {}).get(INIT_METADATA_KEY)


def resolved_init(loaded, text: str, init: str, num_tokens: int = 256) -> str:
    """`init` itself, or for `auto`: for a corpus that fits one window of the model (one repeat pass reads it
    whole), `matched_omp` for a block of at most OMP_MAX_TOKENS tokens (1-3 minutes for a 3.5-5.7k-token
    article on the 2-core box) and `matched` for a larger one (the pursuit took 57 s a head at 1,024 keys on
    Sky, about 86 minutes for 90 heads, against 1 s at 256; `matched` trained from at 1,024 reached the whole
    article in context on four articles, BENCHMARKS.md); `first_tokens` for a longer corpus (reading 206k
    tokens would take longer than the whole 15-minute build)."""
    if init != "auto":
        return init
    from cartridges.stages.evaluation.methods.repeat_pass import segment_capacity

    capacity = segment_capacity(loaded)  # only the beginning is tokenized: a 206k-token corpus costs nothing here
    if len(context_token_ids(loaded.tokenizer, text, capacity + 1)) > capacity:
        return "first_tokens"
    return "matched_omp" if num_tokens <= OMP_MAX_TOKENS else "matched"


def closed_form_prefix(
    loaded,
    text: str,
    method: str,
    num_tokens: int,
    max_tokens: int | None,
    probe_source: str = "repeat",
    conversations: Sequence[list[int]] = (),
) -> torch.Tensor:
    """The `select`, `matched` or `matched_omp` block of `num_tokens` tokens (the whole corpus's KV if it is
    shorter), reading about `max_tokens` corpus tokens of a longer corpus (`matched_omp`: one window); a
    fitted block matches the queries `probe_source` names (the self-study `conversations`' for samples)."""
    if method in FITTED_STARTS:
        from cartridges.stages.evaluation.methods.matched import matched_block

        key_choice = "omp" if method == "matched_omp" else "attention"
        return matched_block(
            loaded,
            text,
            num_tokens,
            max_tokens,
            key_choice=key_choice,
            conversations=conversations,
            probe_source=probe_source,
        ).prefix
    from cartridges.stages.evaluation.methods.select import selected_prefix

    return selected_prefix(loaded, text, num_tokens, max_tokens)


def sample_conversations(loaded, run: RunDir, config: DistillConfig) -> list[list[int]]:
    """The chat and answer tokens (as the student reads them) of `init_probe_samples` training samples,
    evenly spaced by sample id; the samples held out for KL to the teacher are never among them."""
    from cartridges.stages.distillation.train import split_examples
    from cartridges.stages.distillation.training_data import load_examples
    from cartridges.stages.evaluation.methods.select import evenly_spaced

    examples = load_examples(run.shards, loaded.tokenizer, config.max_length)
    train, _ = split_examples(examples, config.eval_samples, config.seed)
    return [train[i].prompt_ids + train[i].answer_ids for i in evenly_spaced(len(train), config.init_probe_samples)]


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
    init = resolved_init(loaded, text, config.init, config.num_tokens)
    if init in CLOSED_FORM:
        on_policy = init in FITTED_STARTS and config.init_probes != "repeat"
        conversations = sample_conversations(loaded, run, config) if on_policy else []
        prefix = closed_form_prefix(
            loaded, text, init, config.num_tokens, config.select_max_tokens, config.init_probes, conversations
        )
        return prefix, init
    if init == "sampled":
        ids = sampled_token_ids(loaded.tokenizer, text, config.num_tokens, config.sample_span_tokens, config.seed)
    elif init == "summary":
        chunks = [chunk.text for chunk in read_chunks(run)]
        ids = summary_token_ids(loaded, chunks, config.num_tokens, config.summary_tokens)
    else:
        ids = context_token_ids(loaded.tokenizer, text, config.num_tokens)
    return kv_prefix_of_tokens(loaded.model, ids), init
