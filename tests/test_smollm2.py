"""A few end-to-end checks on the real embedded model (SmolLM2-135M-Instruct)."""

import sys

import pytest
import torch
from peft import PeftModel

from cartridges.artifact.folder import load_artifact
from cartridges.default_corpus import gather_license_corpus
from cartridges.layout import chat_token_ids, context_token_ids
from cartridges.models import EMBEDDED_MODEL_NAME
from cartridges.pipeline.cli import main
from cartridges.runtime import CartridgeRuntime
from cartridges.stages.distillation.init.first_tokens import init_cartridge
from cartridges.stages.ingest import read_corpus

# fp32 logits of this model reach |37|; HF's own "prefill then continue from the cache" differs from
# one full forward pass by up to 1.04e-4 here (measured), so allow 1e-5 relative on top of 1e-4.
ATOL, RTOL = 1e-4, 1e-5


def test_embedded_model_answers_a_trivial_question(smollm2):
    assert smollm2.path.name == EMBEDDED_MODEL_NAME
    ids = smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    out = smollm2.model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in smollm2.tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


def test_init_cartridge_reproduces_in_context_logits(smollm2, tmp_path):
    corpus = read_corpus(gather_license_corpus())
    init_cartridge(smollm2, corpus, 256, "legal", tmp_path / "art")
    cartridge = load_artifact(tmp_path / "art")
    context = context_token_ids(smollm2.tokenizer, corpus.text, 256)
    chat = chat_token_ids(smollm2.tokenizer, [{"role": "user", "content": "Which license is this?"}])
    with torch.no_grad():
        expected = smollm2.model(torch.tensor([context + chat])).logits[0, 256:]
    runtime_logits = CartridgeRuntime(smollm2, [cartridge]).logits(torch.tensor([chat]))[0]
    torch.testing.assert_close(runtime_logits, expected, atol=ATOL, rtol=RTOL)
    peft_model = PeftModel.from_pretrained(smollm2.model, str(cartridge.path))
    ids = torch.tensor([chat])
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -len(chat) :]
    torch.testing.assert_close(peft_logits, expected, atol=ATOL, rtol=RTOL)


def test_make_cartridge_then_ask_on_default_corpus(smollm2, monkeypatch, capsys):
    def run(*args):
        monkeypatch.setattr(sys, "argv", ["cartridges", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        return exit_info.value.code, *capsys.readouterr()

    code, out, err = run("init", "--tokens", "128", "--name", "legal")
    assert code == 0, err
    assert "published legal@1 (128 tokens" in out
    code, out, err = run("ask", "legal@latest", "What kind of document is this?", "--max-new-tokens", "24")
    assert code == 0, err
    assert len(out.split()) >= 3
