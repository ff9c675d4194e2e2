"""Comparing the samples of runs whose engines made the shards in another order (other engines, other
nodes, a resumed run).

An engine extends the KV prefix it computed last instead of recomputing it (`HFEngine._shared_prefix`),
and a prefix computed in two passes differs from one computed in one pass in the last bits of float32.
So a shard's teacher log-probs depend, at that level, on which shard its engine made before: at most
9.5e-7 apart over 128 tiny-model shards made in shuffled order. Everything else, the sampled and
corpus tokens and the top-k ids included, is identical, and is compared exactly."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

LOGPROB_COLUMNS = ("topk_logprobs", "token_logprobs")
LOGPROB_ATOL = 1e-5  # 10x the largest difference measured; a wrong sample or position is off by far more


def _flat(table: pa.Table, column: str) -> np.ndarray:
    values = table.column(column).combine_chunks()
    while pa.types.is_list(values.type):
        values = pc.list_flatten(values)
    return values.to_numpy(zero_copy_only=False)


def assert_same_samples(got: pa.Table, expected: pa.Table) -> None:
    """Every column equal, the teacher's log-probs to within `LOGPROB_ATOL`."""
    exact = [name for name in expected.column_names if name not in LOGPROB_COLUMNS]
    assert got.column_names == expected.column_names
    assert got.select(exact).to_pylist() == expected.select(exact).to_pylist()
    for column in LOGPROB_COLUMNS:  # same shapes: the token and top-k id lists above are equal
        np.testing.assert_allclose(_flat(got, column), _flat(expected, column), atol=LOGPROB_ATOL, rtol=0)
