"""Training batches for distillation: the student's chat tokens and the teacher's top-k targets.

The student sees the conversation *without* the chunk: the same chat tokens the teacher saw after
its context block (see `cartridges.layout`), followed by the answer tokens.
"""

from dataclasses import dataclass, fields
from pathlib import Path

import pyarrow.parquet as pq
import torch

from cartridges.errors import CartridgeError
from cartridges.hashing import sha256_bytes, sha256_of_named_hashes
from cartridges.layout import chat_token_ids
from cartridges.serving.batching import pad_batch

COLUMNS = ["sample_id", "messages", "answer_ids", "topk_ids", "topk_logprobs", "token_logprobs"]


@dataclass(frozen=True)
class Example:
    sample_id: int
    prompt_ids: list[int]
    answer_ids: list[int]
    topk_ids: list[list[int]]
    topk_logprobs: list[list[float]]


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, T], right-padded
    attention_mask: torch.Tensor  # [B, T]
    answer_positions: torch.Tensor  # [B, A]: index of the logit that predicts answer token j (0 where padded)
    answer_mask: torch.Tensor  # [B, A] bool
    answer_ids: torch.Tensor  # [B, A]
    topk_ids: torch.Tensor  # [B, A, k]
    topk_logprobs: torch.Tensor  # [B, A, k]

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(getattr(self, f.name).to(device) for f in fields(self)))


def shard_files(samples_dir: Path) -> list[Path]:
    files = sorted(samples_dir.glob("*.parquet"))
    if not files:
        raise CartridgeError(f"no synthesis shards in {samples_dir}: run `cartridges synthesize` first")
    return files


def data_fingerprint(samples_dir: Path) -> str:
    """sha256 over the samples themselves: each shard's rows, not its file, whose metadata holds how long
    making it took (the same samples made twice have one fingerprint)."""
    return sha256_of_named_hashes((p.name, _rows_hash(p)) for p in shard_files(samples_dir))


def _rows_hash(shard: Path) -> str:
    import pyarrow as pa

    table = pq.read_table(shard).replace_schema_metadata(None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sha256_bytes(sink.getvalue().to_pybytes())


def load_examples(samples_dir: Path, tokenizer, max_length: int) -> list[Example]:
    """Every sample as student tokens + teacher targets, sorted by sample id; long ones are cut."""
    table = pq.read_table(shard_files(samples_dir), columns=COLUMNS).sort_by("sample_id")
    examples = []
    for row in table.to_pylist():
        prompt = chat_token_ids(tokenizer, [{"role": "user", "content": row["messages"][0]["content"]}])
        keep = max(0, max_length - len(prompt))
        if keep == 0:
            continue
        examples.append(
            Example(
                row["sample_id"], prompt, row["answer_ids"][:keep], row["topk_ids"][:keep], row["topk_logprobs"][:keep]
            )
        )
    return examples


def collate(examples: list[Example], pad_token_id: int) -> Batch:
    input_ids, attention_mask = pad_batch([e.prompt_ids + e.answer_ids for e in examples], pad_token_id)
    answer_width = max(len(e.answer_ids) for e in examples)
    k = len(examples[0].topk_ids[0])
    batch = len(examples)
    positions = torch.zeros((batch, answer_width), dtype=torch.long)
    answer_mask = torch.zeros((batch, answer_width), dtype=torch.bool)
    answer_ids = torch.zeros((batch, answer_width), dtype=torch.long)
    topk_ids = torch.zeros((batch, answer_width, k), dtype=torch.long)
    topk_logprobs = torch.zeros((batch, answer_width, k), dtype=torch.float32)
    for row, example in enumerate(examples):
        n_prompt, n_answer = len(example.prompt_ids), len(example.answer_ids)
        positions[row, :n_answer] = torch.arange(n_prompt - 1, n_prompt + n_answer - 1)
        answer_mask[row, :n_answer] = True
        answer_ids[row, :n_answer] = torch.tensor(example.answer_ids)
        topk_ids[row, :n_answer] = torch.tensor(example.topk_ids)
        topk_logprobs[row, :n_answer] = torch.tensor(example.topk_logprobs)
    return Batch(input_ids, attention_mask, positions, answer_mask, answer_ids, topk_ids, topk_logprobs)


def distillation_loss(
    logits: torch.Tensor, batch: Batch, ce_weight: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Top-k distillation `-sum_k p_teacher(k) log q_student(k)` (teacher renormalised over its top-k),
    averaged over each sample's answer tokens, then over samples; plus `ce_weight` x cross-entropy
    of the answer tokens. Also returns the top-k KL to the teacher for logging."""
    index = batch.answer_positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    student = torch.log_softmax(logits.gather(1, index).float(), dim=-1)  # [B, A, V]
    teacher = torch.softmax(batch.topk_logprobs, dim=-1)  # renormalised over the top-k
    student_topk = student.gather(-1, batch.topk_ids)
    mask = batch.answer_mask.float()
    tokens = mask.sum(-1).clamp(min=1)
    per_token_kd = -(teacher * student_topk).sum(-1)
    per_token_kl = (teacher * (torch.log(teacher.clamp(min=1e-12)) - student_topk)).sum(-1)
    per_token_ce = -student.gather(-1, batch.answer_ids.unsqueeze(-1)).squeeze(-1)
    kd = ((per_token_kd * mask).sum(-1) / tokens).mean()
    ce = ((per_token_ce * mask).sum(-1) / tokens).mean()
    kl = ((per_token_kl * mask).sum(-1) / tokens).mean()
    loss = kd + ce_weight * ce
    return loss, {"kd": kd.item(), "ce": ce.item(), "topk_kl": kl.item()}
