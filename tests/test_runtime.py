"""KV equality, PEFT loading, composition and generation on the tiny model."""

import pytest
import torch
from peft import PeftModel

from cartridges.artifact.folder import load_artifact
from cartridges.errors import CartridgeError
from cartridges.layout import chat_token_ids, context_token_ids
from cartridges.models import load_model
from cartridges.runtime import CartridgeRuntime, concat_prefixes
from cartridges.stages.distillation.init.first_tokens import init_cartridge
from cartridges.stages.ingest import read_corpus

QUESTION = [{"role": "user", "content": "How many days notice must a landlord give?"}]


def build(tiny, corpus_dir, tmp_path, tokens=48, name="legal"):
    corpus = read_corpus(corpus_dir)
    init_cartridge(tiny, corpus, tokens, name, tmp_path / name)
    return load_artifact(tmp_path / name), corpus


def in_context_logits(loaded, context_ids, chat_ids):
    """Independent reference: the plain model with the context tokens in the prompt."""
    with torch.no_grad():
        full = loaded.model(torch.tensor([context_ids + chat_ids])).logits
    return full[0, len(context_ids) :]


def test_cartridge_logits_equal_text_in_context(tiny, corpus_dir, tmp_path):
    cartridge, corpus = build(tiny, corpus_dir, tmp_path)
    context_ids = context_token_ids(tiny.tokenizer, corpus.text, 48)
    chat_ids = chat_token_ids(tiny.tokenizer, QUESTION)
    expected = in_context_logits(tiny, context_ids, chat_ids)
    got = CartridgeRuntime(tiny, [cartridge]).logits(torch.tensor([chat_ids]))[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # and the positions matter: the same prefix read from position 0 gives other logits
    with torch.no_grad():
        wrong = tiny.model(torch.tensor([chat_ids])).logits[0]
    assert (wrong - expected).abs().max() > 1e-2


def test_peft_from_pretrained_matches_runtime(tiny, corpus_dir, tmp_path):
    cartridge, corpus = build(tiny, corpus_dir, tmp_path)
    chat_ids = chat_token_ids(tiny.tokenizer, QUESTION)
    expected = in_context_logits(tiny, context_token_ids(tiny.tokenizer, corpus.text, 48), chat_ids)
    peft_model = PeftModel.from_pretrained(load_model(str(tiny.path)).model, str(cartridge.path))
    ids = torch.tensor([chat_ids])
    with torch.no_grad():
        got = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    torch.testing.assert_close(got[-len(chat_ids) :], expected, atol=1e-4, rtol=0)


def test_manifest_describes_the_prefix(tiny, corpus_dir, tmp_path):
    cartridge, corpus = build(tiny, corpus_dir, tmp_path, tokens=40)
    m = cartridge.manifest
    assert (m.num_tokens, m.num_frozen_tokens, m.num_layers, m.num_kv_heads, m.head_dim) == (40, 1, 2, 2, 16)
    assert cartridge.prompt_embeddings.shape == (40, 2 * 2 * 2 * 16)
    assert m.kv_bytes == cartridge.prompt_embeddings.numel() * 4
    assert m.corpus[0].fingerprint == corpus.fingerprint(tiny.tokenizer_fingerprint)
    assert m.corpus[0].num_tokens == len(context_token_ids(tiny.tokenizer, corpus.text))
    assert m.model_fingerprint == tiny.fingerprint and m.method == "init"


def test_short_corpus_uses_all_its_tokens(tiny, tmp_path):
    folder = tmp_path / "short"
    folder.mkdir()
    (folder / "a.txt").write_text("Section 1. Notice.")
    cartridge, corpus = build(tiny, folder, tmp_path, tokens=500)
    assert cartridge.manifest.num_tokens == len(context_token_ids(tiny.tokenizer, corpus.text)) < 500


def test_composition_concatenates_in_order(tiny, corpus_dir, second_corpus_dir, tmp_path):
    a, _ = build(tiny, corpus_dir, tmp_path, tokens=32, name="a")
    b, corpus_b = build(tiny, second_corpus_dir, tmp_path, tokens=24, name="b")
    ab = CartridgeRuntime(tiny, [a, b])
    ba = CartridgeRuntime(tiny, [b, a])
    assert ab.num_tokens == ba.num_tokens == 56
    assert torch.equal(ab.prefix[:32], a.prompt_embeddings) and torch.equal(ab.prefix[32:], b.prompt_embeddings)
    assert torch.equal(ba.prefix[:24], b.prompt_embeddings)
    assert ab.kv_bytes == (a.prompt_embeddings.numel() + b.prompt_embeddings.numel()) * 4
    cache = ab.cache(batch_size=3)
    assert cache.layers[0].keys.shape == (3, 2, 56, 16)
    answer = ab.generate(QUESTION, max_new_tokens=5)
    assert isinstance(answer, str)
    streamed = "".join(ab.stream(QUESTION, max_new_tokens=5))
    assert streamed.strip() == answer


def test_generate_matches_in_context_greedy_decoding(tiny, corpus_dir, tmp_path):
    cartridge, corpus = build(tiny, corpus_dir, tmp_path)
    context_ids = context_token_ids(tiny.tokenizer, corpus.text, 48)
    chat_ids = chat_token_ids(tiny.tokenizer, QUESTION)
    ids = torch.tensor([context_ids + chat_ids])
    reference = tiny.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    expected = tiny.tokenizer.decode(reference[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert CartridgeRuntime(tiny, [cartridge]).generate(QUESTION, max_new_tokens=8) == expected


def test_cartridge_for_other_model_is_refused(tiny, other_tiny_model_dir, corpus_dir, tmp_path):
    cartridge, _ = build(tiny, corpus_dir, tmp_path)
    other = load_model(str(other_tiny_model_dir))
    with pytest.raises(CartridgeError, match=f"built for model {tiny.model_id}.*loaded model is {other.model_id}"):
        CartridgeRuntime(other, [cartridge])
    foreign, _ = build(other, corpus_dir, tmp_path, name="foreign")
    with pytest.raises(CartridgeError, match="different models"):
        concat_prefixes([cartridge, foreign])


def test_cartridge_for_other_tokenizer_is_refused(tiny, corpus_dir, tmp_path):
    cartridge, _ = build(tiny, corpus_dir, tmp_path)
    altered = cartridge.manifest.model_copy(update={"tokenizer_fingerprint": "0" * 64})
    with pytest.raises(CartridgeError, match="built with tokenizer 000000000000"):
        CartridgeRuntime(tiny, [type(cartridge)(altered, cartridge.prompt_embeddings, cartridge.path)])
