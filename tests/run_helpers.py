"""A small synthesized run on a tiny model (one text ingested, HF synthesis in-process), for tests that
train from its samples or read them."""

from pathlib import Path

from cartridges.stages.ingest import ingest
from cartridges.stages.run_dir import RunDir
from cartridges.stages.synthesis.config import SynthesisConfig, SynthesisRunSettings
from cartridges.stages.synthesis.synthesize import synthesize

SMALL_SYNTHESIS = dict(
    samples=12,
    shard_size=6,
    chunk_min_tokens=16,
    chunk_max_tokens=64,
    max_message_tokens=12,
    max_answer_tokens=12,
    kinds={"continuation": 1.0, "fill_span": 1.0},
    top_k=8,
)


def synthesized_run_of(loaded, text: str, root: Path, **changes) -> RunDir:
    """`root`/run: `text` (as `root`/corpus/s.txt) ingested in chunks of 16-64 tokens and SMALL_SYNTHESIS's
    samples (with `changes`) synthesized by `loaded`."""
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "s.txt").write_text(text)
    run = RunDir(root / "run")
    ingested = ingest(corpus, run, loaded.tokenizer, loaded.tokenizer_fingerprint, 16, 64)
    config = SynthesisConfig(**(SMALL_SYNTHESIS | changes))
    synthesize(run, ingested, loaded.ref, config, SynthesisRunSettings(engine="hf", executor="local"))
    return run
