"""Shared fixtures: an isolated $CARTRIDGES_HOME, a tiny random Llama model, small corpora."""

import json
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
STATUTE = (
    "Section 1. A landlord shall give the tenant written notice to vacate at least three days before filing "
    "an eviction suit, unless the lease provides otherwise. Section 2. The notice must be delivered in person "
    "or by mail to the premises. Section 3. A tenant may cure a default in rent within ten days. "
)


def build_tiny_model(folder: Path, seed: int = 0, num_layers: int = 2, **config_changes) -> Path:
    """A randomly initialised Llama (GQA) with a small trained BPE tokenizer, saved as an HF folder."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([STATUTE * 3, CHATML_TEMPLATE], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<pad>", bos_token=None
    )
    fast.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    config.update(config_changes)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def cartridges_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("CARTRIDGES_HOME", str(home))
    monkeypatch.delenv("CARTRIDGES_REGISTRY", raising=False)
    return home


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3-compatible server on 127.0.0.1 for the whole session (moto's server mode)."""
    from s3_server import start_s3_server

    server, endpoint = start_s3_server()
    yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch) -> str:
    """`s3://<a new bucket>` on the loopback server; this process and its children reach it through the
    environment, as a user's would reach S3 (AWS_ENDPOINT_URL and credentials)."""
    import uuid

    import s3fs
    from s3_server import S3_ENV

    for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def other_tiny_model_dir(tmp_path_factory) -> Path:
    """Same architecture and tokenizer, different weights: a different model fingerprint."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model-other"), seed=1)


@pytest.fixture
def tiny(tiny_model_dir):
    from cartridges.models import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="session")
def lively_model_dir(tmp_path_factory) -> Path:
    """A tiny model whose greedy answers depend on the context: the default one (tied embeddings,
    small weights) repeats the prompt's last token whatever comes before it, so equal answers would
    prove nothing about positions, masks or prefixes."""
    return build_tiny_model(tmp_path_factory.mktemp("lively-model"), tie_word_embeddings=False, initializer_range=0.2)


@pytest.fixture
def lively(lively_model_dir):
    from cartridges.models import load_model

    return load_model(str(lively_model_dir))


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a_statute.txt").write_text(STATUTE * 2)
    (folder / "sub" / "b_notes.md").write_text("# Notes\n\nEviction notes: " + STATUTE)
    return folder


@pytest.fixture
def second_corpus_dir(tmp_path) -> Path:
    folder = tmp_path / "corpus2"
    folder.mkdir()
    (folder / "tax.txt").write_text("Section 9. Tax on rent is due within thirty days of the end of each quarter. " * 3)
    return folder


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def shared_models_dir() -> Path:
    """The user's model cache (where `make setup` prepared the embedded model), read before any test
    points $CARTRIDGES_HOME elsewhere."""
    import os

    from cartridges.home import models_dir

    saved = os.environ.pop("CARTRIDGES_HOME", None)
    try:
        return models_dir()
    finally:
        if saved is not None:
            os.environ["CARTRIDGES_HOME"] = saved


@pytest.fixture
def smollm2(cartridges_home, shared_models_dir):
    """The real embedded SmolLM2-135M-Instruct, prepared once in the user's cache."""
    from cartridges.models import load_model

    cartridges_home.mkdir(parents=True, exist_ok=True)
    shared_models_dir.mkdir(parents=True, exist_ok=True)
    (cartridges_home / "models").symlink_to(shared_models_dir)
    return load_model()


@pytest.fixture
def long_corpus(tmp_path):
    folder = tmp_path / "long-corpus"
    folder.mkdir()
    text = " ".join(
        f"Section {i}. A tenant in unit {i} must pay {i * 10} dollars before day {i % 28 + 1}." for i in range(60)
    )
    (folder / "statute.txt").write_text(text)
    return folder


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run the `cartridges` command line in-process: (exit code, stdout, stderr)."""
    from cartridges.pipeline.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["cartridges", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    return run
