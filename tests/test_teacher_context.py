"""The teacher's context: its chunk, or a window of the corpus (the whole corpus when it fits)."""

import pyarrow.parquet as pq
import pytest
import torch
from test_synthesize import CORPUS_KINDS, SMALL, run_synthesis

from cartridges.errors import CartridgeError
from cartridges.layout import chat_token_ids, context_token_ids
from cartridges.stages.ingest import DOCUMENT_SEPARATOR, ingest, read_chunks, read_corpus, read_titles
from cartridges.stages.run_dir import RunDir
from cartridges.stages.synthesis.config import SynthesisConfig, check_fits_window, teacher_context_tokens
from cartridges.stages.synthesis.sample_reuse import incompatibility
from cartridges.stages.synthesis.teacher_context import block_text, teacher_blocks

TINY_WINDOW = 1024  # tests/conftest.py's tiny model


def _ingested(tiny, corpus, folder):
    run = RunDir(folder)
    ingest(
        corpus, run, tiny.tokenizer, tiny.tokenizer_fingerprint, SMALL["chunk_min_tokens"], SMALL["chunk_max_tokens"]
    )
    return read_chunks(run), read_titles(run)


def _rows(folder) -> list[dict]:
    return pq.read_table(RunDir(folder).shards).to_pylist()


def test_a_corpus_that_fits_is_one_block_holding_every_document_whole(tiny, corpus_dir, tmp_path):
    chunks, titles = _ingested(tiny, corpus_dir, tmp_path / "run")
    documents = read_corpus(corpus_dir).documents
    assert len(documents) == 2 and len(chunks) > 4

    (block,) = teacher_blocks(chunks, titles, tiny.tokenizer, 10_000)

    assert block.chunk_ids == tuple(range(len(chunks)))
    assert block.text == DOCUMENT_SEPARATOR.join(f"{doc.title}\n\n{doc.text}" for doc in documents)


def test_a_longer_corpus_is_cut_into_full_blocks_of_consecutive_chunks_within_the_budget(tiny, long_corpus, tmp_path):
    chunks, titles = _ingested(tiny, long_corpus, tmp_path / "run")
    budget = 300

    blocks = teacher_blocks(chunks, titles, tiny.tokenizer, budget)

    assert len(blocks) >= 3
    assert [i for block in blocks for i in block.chunk_ids] == list(range(len(chunks)))
    for block in blocks:
        tokens = len(context_token_ids(tiny.tokenizer, block.text))
        assert tokens <= budget
        assert all(chunks[i].text in block.text for i in block.chunk_ids)
    for block in blocks[:-1]:  # greedy: each block but the last is too full to take its next chunk
        assert len(context_token_ids(tiny.tokenizer, block.text)) > budget - SMALL["chunk_max_tokens"] - 8
    joined = block_text([chunks[i] for block in blocks for i in block.chunk_ids], titles)
    assert joined == DOCUMENT_SEPARATOR.join(f"{d.title}\n\n{d.text}" for d in read_corpus(long_corpus).documents)


def test_the_window_teacher_scores_each_answer_with_its_whole_block_in_context(tiny, long_corpus, tmp_path):
    run_synthesis(
        tiny, long_corpus, tmp_path / "w", samples=6, shard_size=6, kinds=CORPUS_KINDS, teacher_context="window"
    )
    chunks, titles = read_chunks(RunDir(tmp_path / "w")), read_titles(RunDir(tmp_path / "w"))
    config = SynthesisConfig(**SMALL, teacher_context="window")
    blocks = teacher_blocks(chunks, titles, tiny.tokenizer, teacher_context_tokens(config, TINY_WINDOW))
    assert len(blocks) >= 2, "the corpus is longer than the tiny model's window"

    rows = _rows(tmp_path / "w")
    assert len(rows) == 6
    for row in rows:
        block = next(b for b in blocks if row["chunk_id"] in b.chunk_ids)
        prompt = context_token_ids(tiny.tokenizer, block.text) + chat_token_ids(tiny.tokenizer, row["messages"][:1])
        answer = row["answer_ids"]
        assert row["teacher_prompt_tokens"] == len(prompt) > 2 * SMALL["chunk_max_tokens"]
        assert len(prompt) + len(answer) <= TINY_WINDOW
        with torch.no_grad():  # the teacher's scores, computed again by one forward pass over the whole prompt
            logits = tiny.model(torch.tensor([prompt + answer])).logits[0]
        expected = torch.log_softmax(logits, -1)[len(prompt) - 1 : len(prompt) + len(answer) - 1]
        top = expected.topk(len(row["topk_ids"][0]), dim=-1)
        assert row["topk_ids"] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(row["topk_logprobs"]), top.values, atol=1e-4, rtol=0)
        torch.testing.assert_close(
            torch.tensor(row["token_logprobs"]), expected[range(len(answer)), answer], atol=1e-4, rtol=0
        )


def _two_documents(folder, edited: bool = False):
    folder.mkdir(exist_ok=True)
    (folder / "a_rules.txt").write_text(
        " ".join(f"Rule {i}. Repairs in room {i} are due within {i + 2} days." for i in range(20))
    )
    last = 99 if edited else 19
    sections = [
        f"Section {i}. A tenant in unit {i} must pay {i * 10} dollars before day {i % 28 + 1}." for i in range(19)
    ]
    (folder / "b_sections.txt").write_text(" ".join([*sections, f"Section {last}. The last section."]))
    return folder


def test_a_rebuild_reuses_only_samples_whose_whole_block_is_unchanged(tiny, tmp_path):
    """With the chunk as context a sample of an unchanged chunk is reused; with a window, an edit
    anywhere in the chunk's block changes what its teacher read, so it is made again."""
    config = {"samples": 24, "shard_size": 8, "kinds": CORPUS_KINDS, "teacher_context": "window"}
    run_synthesis(tiny, _two_documents(tmp_path / "corpus"), tmp_path / "first", **config)
    _two_documents(tmp_path / "corpus", edited=True)
    fresh = run_synthesis(tiny, tmp_path / "corpus", tmp_path / "fresh", **config)
    summary = run_synthesis(tiny, tmp_path / "corpus", tmp_path / "second", reuse_from=tmp_path / "first", **config)

    chunks, titles = read_chunks(RunDir(tmp_path / "fresh")), read_titles(RunDir(tmp_path / "fresh"))
    blocks = teacher_blocks(
        chunks, titles, tiny.tokenizer, teacher_context_tokens(SynthesisConfig(**config | SMALL), TINY_WINDOW)
    )
    assert [{chunks[i].doc_id for i in block.chunk_ids} for block in blocks] == [{0}, {1}], "one block per document"
    first_texts = {c.text for c in read_chunks(RunDir(tmp_path / "first"))}
    unchanged_in_edited_block = [c.chunk_id for c in chunks if c.doc_id == 1 and c.text in first_texts]
    assert unchanged_in_edited_block, "the edit leaves some chunks of the second document as they were"

    first, second, expected = (
        {r["sample_id"]: r for r in _rows(tmp_path / run)} for run in ("first", "second", "fresh")
    )
    reused_ids = {r["sample_id"] for r in pq.read_table(RunDir(tmp_path / "second").reused_samples).to_pylist()}
    # The first document's chunks keep their ids; a sample is reusable when it drew the same one of them again.
    same_unedited_chunk = {
        i for i, row in expected.items() if row["doc_id"] == 0 and first[i]["chunk_id"] == row["chunk_id"]
    }
    assert reused_ids and reused_ids == same_unedited_chunk
    assert summary.reused == len(reused_ids) and fresh.reused == 0
    assert any(expected[i]["chunk_id"] in unchanged_in_edited_block for i in expected), "such chunks were drawn"
    for i, row in second.items():
        assert row["answer_ids"] == expected[i]["answer_ids"] and row["topk_ids"] == expected[i]["topk_ids"], i
        torch.testing.assert_close(
            torch.tensor(row["topk_logprobs"]), torch.tensor(expected[i]["topk_logprobs"]), atol=1e-4, rtol=0
        )


def test_runs_recorded_before_the_setting_existed_read_as_chunk_runs():
    chunk_config = SynthesisConfig(**SMALL).model_dump()
    old_record = {"model_fingerprint": "m", "config": {k: v for k, v in chunk_config.items() if k != "teacher_context"}}
    assert incompatibility(old_record, chunk_config, "m") is None
    window_config = chunk_config | {"teacher_context": "window"}
    assert incompatibility(old_record, window_config, "m") == "other settings (teacher_context)"


def test_a_chunk_that_leaves_no_room_for_the_sample_is_refused_in_either_mode():
    for mode in ("chunk", "window"):
        config = SynthesisConfig(chunk_min_tokens=256, chunk_max_tokens=900, max_answer_tokens=64, teacher_context=mode)
        with pytest.raises(CartridgeError, match=r"lower chunk_max_tokens to 608 or less"):
            check_fits_window(config, TINY_WINDOW)
    assert teacher_context_tokens(SynthesisConfig(teacher_context="window"), 8192) == 8192 - 256 - 96 - 192
