"""On-policy reference queries for `matched`: the queries of a build's self-study conversations (the
student's chat and answer tokens of its synthesized samples), each conversation read alone after the
whole corpus's KV, with their attention output and log mass over the corpus (Attention Matching,
arXiv 2602.16284, fits to self-study queries as well as to a repeat pass's).

Why: a cartridge is read by questions and answers about the corpus, not by the model copying it. The
repeat pass's queries are the copying; fitted to their attention mass, per-key biases made every block
worse on the questions (BENCHMARKS.md, issue 38). The samples' queries are the nearest thing to the
questions a build has, without using any test question.
"""

from collections.abc import Sequence

import torch

from cartridges.errors import CartridgeError
from cartridges.kv_layout import kv_shape
from cartridges.models import LoadedModel
from cartridges.stages.evaluation.methods.repeat_pass import (
    Probes,
    RepeatObserver,
    captured_probes,
    evenly_wanted,
    observe,
)

PROBE_SOURCES = ("repeat", "samples", "both")  # distill.init_probes: which queries a fitted block matches


@torch.no_grad()
def conversation_probes(
    loaded: LoadedModel, kv: torch.Tensor, conversations: Sequence[list[int]], probes: int
) -> Probes:
    """About `probes` queries (all query heads), evenly spaced over the tokens of `conversations` (chat
    token ids), each conversation fed alone right after the corpus KV `kv` and cut where the model's
    window ends."""
    room = loaded.model.config.max_position_embeddings - kv.shape[0]
    windows = [list(c[:room]) for c in conversations if c and room > 0]
    if not windows:
        raise CartridgeError(
            "no self-study conversation fits after the corpus in the model's window: set distill.init_probes=repeat"
        )
    layers, kv_heads, _ = kv_shape(loaded.model.config)
    wanted = evenly_wanted(sum(len(w) for w in windows), probes)
    starts = torch.tensor([0] + [len(w) for w in windows]).cumsum(0).tolist()
    masks = [wanted[start : start + len(w)] for start, w in zip(starts, windows)]
    observer = RepeatObserver(kv.shape[0], kv_heads, layers)
    observe(loaded, kv, list(zip(windows, masks)), observer)
    return captured_probes(loaded, observer, torch.cat([mask.nonzero()[:, 0] for mask in masks]))


def reference_probes(repeat: Probes, samples: Probes | None, source: str) -> Probes:
    """The probes a block is fitted to by `source` (one of PROBE_SOURCES)."""
    if source == "repeat":
        return repeat
    if samples is None:
        raise CartridgeError(
            f"init probes '{source}' need the build's self-study samples: set distill.init_probes=repeat"
        )
    return samples if source == "samples" else Probes.joined([repeat, samples])
