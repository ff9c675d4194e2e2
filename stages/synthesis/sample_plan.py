"""The sample plan: which chunk, seed kind and sampling seed each synthesized sample gets.

Kinds and seeds come from one seeded stream, independent of the corpus. Chunks are picked by
rendezvous hashing: sample i takes the chunk whose content key scores lowest under a hash of
(seed, i, key). That is uniform over chunks like a random draw, and stable under edits: adding,
removing or changing a document moves only the samples whose winning chunk appeared or vanished.
So a rebuild of an edited corpus plans the same samples for the untouched chunks, and those can be
taken from the previous run instead of being made again (`sample_reuse`).
"""

import hashlib
import random
from dataclasses import dataclass

import numpy as np

from cartridges.hashing import sha256_bytes
from cartridges.stages.ingest import Chunk, read_chunks, read_titles
from cartridges.stages.run_dir import RunDir

SCORES_PER_BLOCK = 1 << 22  # bounds the memory of the samples x chunks score matrix (32 MiB)


@dataclass(frozen=True)
class PlannedSample:
    sample_id: int
    chunk_id: int
    kind: str
    seed: int


def chunk_key(title: str, chunk: Chunk) -> str:
    """What a sample of this chunk sees: its document title and its text."""
    return sha256_bytes(f"{title}\x00{chunk.text}".encode())


def keys_of(chunks: list[Chunk], titles: list[str]) -> list[str]:
    """The key of every chunk, by chunk id."""
    return [chunk_key(titles[chunk.doc_id], chunk) for chunk in chunks]


def chunk_keys(run: RunDir) -> list[str]:
    """The key of every chunk of an ingested run folder, by chunk id."""
    return keys_of(read_chunks(run), read_titles(run))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective mix of 64-bit integers (numpy wraps uint64 arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def rendezvous_chunks(keys: list[str], seed: int, samples: int) -> np.ndarray:
    """For each sample, the index of the chunk with the lowest hash score."""
    chunk_codes = np.array(
        [int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") for key in keys],
        dtype=np.uint64,
    )
    sample_codes = _mix(np.arange(samples, dtype=np.uint64) ^ _mix(np.array([seed % 2**64], dtype=np.uint64)))
    block = max(1, SCORES_PER_BLOCK // len(keys))
    return np.concatenate(
        [
            _mix(sample_codes[start : start + block, None] ^ chunk_codes[None, :]).argmin(axis=1)
            for start in range(0, samples, block)
        ]
    )


def plan_samples(
    samples: int, seed: int, kinds: dict[str, float], keys: list[str], per_chunk: int = 1
) -> list[PlannedSample]:
    """`per_chunk` consecutive samples share one chunk (group g = i // per_chunk takes the chunk that
    rendezvous hashing gives sample g): the teacher prefills that chunk once for the group, where a
    corpus with more chunks than samples would otherwise cost one chunk prefill per sample."""
    rng = random.Random(seed)
    names = sorted(k for k, w in kinds.items() if w > 0)
    weights = [kinds[k] for k in names]
    chunks = rendezvous_chunks(keys, seed, -(-samples // per_chunk))
    return [
        PlannedSample(i, int(chunks[i // per_chunk]), rng.choices(names, weights)[0], rng.getrandbits(31))
        for i in range(samples)
    ]
