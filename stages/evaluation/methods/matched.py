"""`matched`: `select`'s keys with values fitted in closed form so that the compact block's attention
output matches the whole corpus's (Attention Matching, Zweiger et al., arXiv 2602.16284, step 3).

For each layer and KV head: the reference queries `Q` are the queries of the `select` pass (the model
repeating the corpus after its KV; the query heads of the group pooled), the target is the whole
corpus's attention output `O = softmax(Q K^T / sqrt(d)) V` over the corpus positions, and with the P
kept keys `C_k` fixed where the block is read (moved to positions 0..P-1, each query r tokens after the
block as it was r tokens after the corpus: `Q'`, rotated back by T - P) the values solve the ridge least
squares

    min_{C_v} ||softmax(Q' C_k^T / sqrt(d)) C_v - O||^2 + ridge * ||C_v - V_kept||^2,

whose normal equations are P x P (float64). The ridge pulls towards the kept tokens' own values, so
a block that already reproduces the output keeps them, and P = the corpus length reproduces it
exactly.

`matched` alone does not fit the block's attention *mass*: P keys gather less of a query's attention
than the T corpus keys did, so beside the chat the block is under-attended. `matched-bias` adds the
paper's step 2: per-key biases beta (log weights, NNLS) with sum_j exp(q.c_j / sqrt(d) + beta_j) equal
to the corpus's mass for the reference queries, then the values fitted with them. A PEFT prefix cannot
carry biases: the project's runtime applies them (`Context.key_bias`, `SharedPrefix.bias` in
cartridges/serving/packed_attention.py), an artifact does not. `matched-omp` (and `matched-omp-bias`)
choose the keys by orthogonal matching pursuit on that mass fit instead of by attention (step 1's other
option); the biases the pursuit fits are kept only by `matched-omp-bias`.

The reference queries are the repeat pass's (`repeat_pass`, the same pass that scores `select`'s keys),
the build's self-study conversations' (`sample_probes`, on-policy; one window) or both, the same for
every layer (`layerwise.py` fits each layer to the queries of a pass whose earlier layers read the block
instead). A corpus longer than the model's window is read in segments: each query's target is its own
segment's attention.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cartridges.kv_layout import kv_shape
from cartridges.kv_prefix import kv_prefix_of_tokens
from cartridges.layout import context_token_ids
from cartridges.models import LoadedModel
from cartridges.rotary import move_keys, moved_by
from cartridges.stages.evaluation.contexts import rows_per_head
from cartridges.stages.evaluation.methods.repeat_pass import Probes, one_window_kv, whole_corpus_pass
from cartridges.stages.evaluation.methods.sample_probes import conversation_probes, reference_probes
from cartridges.stages.evaluation.methods.select import Selection, select_tokens

RIDGE = 1e-2  # relative to the mean diagonal of the normal matrix: enough to keep rarely attended keys' values
MAX_QUERIES = 2048  # reference queries per query head (evenly spaced over the corpus)
MIN_LOG_WEIGHT = -20.0  # the bias of a key the mass fit gives no weight
NNLS_ITERATIONS = 10  # scipy's nnls may take this many iterations per key
OMP_STEP = 32  # keys added per matching-pursuit step between NNLS refits


def attention_weights(queries: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """[m, n] in float64: softmax(Q K^T / sqrt(d) + bias), attention over these keys alone."""
    logits = queries.double() @ keys.double().T * keys.shape[-1] ** -0.5
    return torch.softmax(logits if bias is None else logits + bias.double(), dim=-1)


def attention_output(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """[m, D] in float64: the output of attention over these keys alone."""
    return attention_weights(queries, keys) @ values.double()


def fitted_biases(queries: torch.Tensor, keys: torch.Tensor, log_mass: torch.Tensor) -> torch.Tensor:
    """[P]: per-key log weights beta (NNLS on w = exp(beta) >= 0) so that each query's summed
    exp(q.k / sqrt(d) + beta) over the block's `keys` [P, D] matches its `log_mass` [m] over the whole
    segment: the block is then attended as much as the corpus was, beside the chat. A key the fit gives
    no weight gets MIN_LOG_WEIGHT (it keeps a value, attended to almost never)."""
    from scipy.optimize import nnls

    relative = torch.exp(queries.double() @ keys.double().T * keys.shape[-1] ** -0.5 - log_mass.double()[:, None])
    weights, _ = nnls(relative.cpu().numpy(), np.ones(relative.shape[0]), maxiter=NNLS_ITERATIONS * keys.shape[0])
    return torch.from_numpy(weights).log().clamp_min(MIN_LOG_WEIGHT).to(keys.device, keys.dtype)


def fitted_values(
    queries: torch.Tensor,
    keys: torch.Tensor,
    start_values: torch.Tensor,
    target: torch.Tensor,
    ridge: float = RIDGE,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """[P, D]: the values for the block's `keys` [P, D] (and key `bias` [P]) whose attention output for
    `queries` [m, D] best matches `target` [m, D], pulled towards `start_values` (the kept tokens' own values)."""
    weights = attention_weights(queries, keys, bias)  # [m, P]
    normal = weights.T @ weights
    strength = ridge * normal.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(keys.shape[0], dtype=torch.float64, device=normal.device)
    solved = torch.linalg.solve(normal + strength * eye, weights.T @ target.double() + strength * start_values.double())
    return solved.to(start_values.dtype)


@dataclass(frozen=True)
class MatchedBlock:
    prefix: torch.Tensor  # [P, layers*2*kv_heads*head_dim], read at positions 0..P-1
    key_bias: torch.Tensor | None  # [layers, kv_heads, P] with `biases`, else None


def omp_keys(relative: torch.Tensor, budget: int, step: int = OMP_STEP) -> torch.Tensor:
    """[budget] sorted key indices chosen by orthogonal matching pursuit on the attention-mass fit:
    `relative` [m, T] is each reference query's exp(q.k / sqrt(d)) over its whole mass, so a block whose
    non-negative key weights w give relative[:, block] @ w = 1 keeps every query's mass. From the sink,
    the `step` keys most correlated with the residual (columns normalised) join, and w is refitted by NNLS."""
    from scipy.optimize import nnls

    system = relative.double().cpu().numpy()
    norms = np.linalg.norm(system, axis=0).clip(1e-300)
    wanted = np.ones(system.shape[0])
    chosen = [0]  # the attention sink
    weights, _ = nnls(system[:, chosen], wanted)
    while len(chosen) < budget:
        residual = wanted - system[:, chosen] @ weights
        gain = system.T @ residual / norms
        gain[chosen] = -np.inf
        chosen += np.argsort(-gain)[: min(step, budget - len(chosen))].tolist()
        weights, _ = nnls(system[:, chosen], wanted, maxiter=NNLS_ITERATIONS * len(chosen))
    return torch.tensor(sorted(chosen))


def omp_selection(loaded: LoadedModel, kv: torch.Tensor, probes: Probes, budget: int) -> Selection:
    """`budget` keys per layer and KV head of the corpus KV `kv` (one window of the model) chosen by
    `omp_keys` for `probes`."""
    model = loaded.model
    layers, kv_heads, head_dim = kv_shape(model.config)
    at_corpus = moved_by(model, probes.queries, torch.full((1, probes.queries.shape[2]), kv.shape[0]))
    rows = kv.view(kv.shape[0], layers, 2, kv_heads, head_dim)
    group = model.config.num_attention_heads // kv_heads
    keep = torch.empty(budget, layers, kv_heads, dtype=torch.long)
    for layer in range(layers):
        for h in range(kv_heads):
            heads = slice(h * group, (h + 1) * group)
            logits = at_corpus[layer, heads].reshape(-1, head_dim).double() @ rows[:, layer, 0, h].double().T
            relative = torch.exp(logits * head_dim**-0.5 - probes.log_mass[layer, heads].reshape(-1, 1))
            keep[:, layer, h] = omp_keys(relative, budget)
    return Selection(rows_per_head(kv, (layers, kv_heads, head_dim), keep), keep.to(kv.device), probes)


def fitting_selection(
    loaded: LoadedModel,
    text: str,
    ids: list[int],
    num_tokens: int,
    max_tokens: int | None,
    key_choice: str,
    conversations: Sequence[list[int]],
    probe_source: str,
) -> Selection:
    """The kept keys by `key_choice` and the probes (by `probe_source`) the block is fitted to. Probes from
    the `conversations` (self-study samples) and matching pursuit read the corpus as one window."""
    if key_choice == "omp":
        kv, scanned = whole_corpus_pass(loaded, ids, "matched-omp", MAX_QUERIES, instead="matched")
        repeat = scanned.probes
    else:  # select's keys and its repeat pass's probes from one pass; the samples' need the corpus KV too
        kv = one_window_kv(loaded, ids, "matched", "distill.init_probes=repeat") if probe_source != "repeat" else None
        selection = select_tokens(loaded, text, num_tokens, max_tokens, probes=MAX_QUERIES)
        repeat = selection.probes
    samples = conversation_probes(loaded, kv, conversations, MAX_QUERIES) if probe_source != "repeat" else None
    probes = reference_probes(repeat, samples, probe_source)
    if key_choice == "omp":
        return omp_selection(loaded, kv, probes, num_tokens)
    return Selection(selection.prefix, selection.positions, probes)


def matched_block(
    loaded: LoadedModel,
    text: str,
    num_tokens: int,
    max_tokens: int | None = None,
    biases: bool = False,
    key_choice: str = "attention",
    conversations: Sequence[list[int]] = (),
    probe_source: str = "repeat",
) -> MatchedBlock:
    """The `matched` block of `num_tokens` tokens (the whole corpus if shorter); with `biases`, per-key
    biases fitted to the corpus's attention mass first and the values fitted with them (without, the
    values alone, whatever chose the keys). Keys: `select`'s (`key_choice="attention"`) or orthogonal
    matching pursuit on the mass fit (`"omp"`, one window). Fitted to the repeat pass's queries, the
    self-study `conversations`' or both (`probe_source`)."""
    model = loaded.model
    layers, kv_heads, head_dim = kv_shape(model.config)
    ids = context_token_ids(loaded.tokenizer, text)
    if len(ids) <= num_tokens:
        prefix = kv_prefix_of_tokens(model, ids)
        return MatchedBlock(prefix, prefix.new_zeros(layers, kv_heads, len(ids)) if biases else None)
    selection = fitting_selection(loaded, text, ids, num_tokens, max_tokens, key_choice, conversations, probe_source)
    probes = selection.probes
    queries = moved_by(model, probes.queries, torch.full((1, probes.queries.shape[2]), num_tokens))
    target_positions = torch.arange(num_tokens, device=selection.positions.device)[:, None, None]
    block = move_keys(model, selection.prefix, selection.positions, target_positions.expand_as(selection.positions))
    group = model.config.num_attention_heads // kv_heads
    block = block.view(num_tokens, layers, 2, kv_heads, head_dim).clone()
    key_bias = block.new_zeros(layers, kv_heads, num_tokens) if biases else None
    for layer in range(layers):
        for h in range(kv_heads):
            heads = slice(h * group, (h + 1) * group)
            target = probes.outputs[layer, heads].reshape(-1, head_dim)
            q = queries[layer, heads].reshape(-1, head_dim)
            keys = block[:, layer, 0, h]
            bias = None
            if biases:
                bias = key_bias[layer, h] = fitted_biases(q, keys, probes.log_mass[layer, heads].reshape(-1))
            block[:, layer, 1, h] = fitted_values(q, keys, block[:, layer, 1, h], target, bias=bias)
    return MatchedBlock(block.reshape(num_tokens, -1), key_bias)


def matched_prefix(loaded: LoadedModel, text: str, num_tokens: int, max_tokens: int | None = None) -> torch.Tensor:
    """The `matched` prefix (no biases: what a PEFT prefix can carry), read at positions 0..P-1."""
    return matched_block(loaded, text, num_tokens, max_tokens).prefix
