"""The command line end to end on the tiny model; user mistakes exit 2 with one line and write nothing."""

import json
import shutil

import pytest

from cartridges.artifact.folder import load_artifact
from cartridges.artifact.manifest import ADAPTER_WEIGHTS_FILE, MANIFEST_FILE
from cartridges.models import load_model
from cartridges.runtime import CartridgeRuntime


@pytest.fixture
def published(cli, tiny_model_dir, corpus_dir):
    code, out, err = cli(
        "init", "--corpus", str(corpus_dir), "--tokens", "24", "--name", "legal", "--model", str(tiny_model_dir)
    )
    assert code == 0, err
    assert "published legal@1 (24 tokens" in out
    return "legal@1"


def test_init_ls_show_verify_alias(cli, published, cartridges_home):
    code, out, _ = cli("ls")
    assert code == 0 and "legal@1" in out and "init" in out
    code, out, _ = cli("show", "legal")
    manifest = json.loads(out)
    assert manifest["version"] == 1 and manifest["num_tokens"] == 24
    assert (cartridges_home / "registry" / "legal" / "1" / MANIFEST_FILE).is_file()
    assert cli("verify", "legal@1")[1].startswith("legal@1: OK")
    assert cli("alias", "legal@1", "stable")[0] == 0
    assert json.loads(cli("show", "legal@stable")[1])["version"] == 1
    code, _, err = cli("rm", "legal@1")
    assert code == 2 and "aliased as stable" in err


def test_ask_answers_and_composes(cli, published, tiny_model_dir, second_corpus_dir, cartridges_home):
    code, out, err = cli("ask", "legal@latest", "How many days?", "--max-new-tokens", "4")
    assert code == 0, err
    runtime = CartridgeRuntime(
        load_model(str(tiny_model_dir)), [load_artifact(cartridges_home / "registry" / "legal" / "1")]
    )
    assert out == runtime.generate([{"role": "user", "content": "How many days?"}], max_new_tokens=4) + "\n"
    assert (
        cli(
            "init", "--corpus", str(second_corpus_dir), "--tokens", "8", "--name", "tax", "--model", str(tiny_model_dir)
        )[0]
        == 0
    )
    code, out, err = cli("compose", "legal@1", "tax@1", "--name", "legal-tax")
    assert code == 0, err
    assert "legal-tax@1 (32 tokens)" in out
    manifest = json.loads(cli("show", "legal-tax")[1])
    assert manifest["method"] == "composed" and manifest["parent"] == "legal@1+tax@1" and len(manifest["corpus"]) == 2
    assert cli("ask", "legal@1", "Tax?", "--also", "tax@1", "--max-new-tokens", "3")[0] == 0


def test_chat_session_reset_and_exit(cli, published, monkeypatch):
    lines = iter(["What is notice?", "/reset", "Again?", "/exit"])
    monkeypatch.setattr("rich.console.Console.input", lambda self, prompt="": next(lines))
    code, out, err = cli("chat", "legal@1", "--max-new-tokens", "3")
    assert code == 0, err
    assert "24 cartridge tokens" in out and "KV memory" in out and "(conversation cleared)" in out


def assert_user_error(result, *fragments):
    code, out, err = result
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    "make_corpus, message",
    [
        (lambda tmp: tmp / "missing", "does not exist"),
        (lambda tmp: tmp, "has no readable text"),
    ],
)
def test_bad_corpus_exits_2_and_writes_nothing(cli, tmp_path, cartridges_home, tiny_model_dir, make_corpus, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    folder = make_corpus(empty)
    assert_user_error(cli("init", "--corpus", str(folder), "--name", "x", "--model", str(tiny_model_dir)), message)
    assert not (cartridges_home / "registry").exists() and not (cartridges_home / "runs").exists()


def test_unreadable_corpus_lists_skipped_files(cli, tmp_path, tiny_model_dir):
    (tmp_path / "scan.pdf").write_bytes(b"%PDF\x00binary")
    assert_user_error(
        cli("init", "--corpus", str(tmp_path), "--model", str(tiny_model_dir)), "no readable text", "scan.pdf"
    )


@pytest.mark.parametrize("name", ["a/b", "../up", "has space"])
def test_bad_name_exits_2(cli, corpus_dir, cartridges_home, tiny_model_dir, name):
    assert_user_error(
        cli("init", "--corpus", str(corpus_dir), "--name", name, "--model", str(tiny_model_dir)),
        "invalid cartridge name",
    )
    assert not cartridges_home.exists() or not (cartridges_home / "registry").exists()


def test_unknown_ref_lists_what_exists(cli, published):
    assert_user_error(cli("show", "nope"), "no cartridge named 'nope'", "available: legal")
    assert_user_error(cli("ask", "legal@9", "q"), "no version 9", "versions: 1")


def test_other_model_is_refused_naming_both(cli, published, tiny_model_dir, other_tiny_model_dir):
    assert_user_error(
        cli("ask", "legal@1", "q", "--model", str(other_tiny_model_dir)),
        str(tiny_model_dir.resolve()),
        str(other_tiny_model_dir.resolve()),
    )


def test_checksum_mismatch_is_refused(cli, published, cartridges_home):
    weights = cartridges_home / "registry" / "legal" / "1" / ADAPTER_WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x01")
    assert_user_error(cli("verify", "legal@1"), "checksum mismatch")
    assert_user_error(cli("ask", "legal@1", "q"), "checksum mismatch")


def test_newer_format_is_refused(cli, published, cartridges_home):
    path = cartridges_home / "registry" / "legal" / "1" / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(manifest | {"format_version": 99}))
    assert_user_error(cli("show", "legal@1"), "format v99 is newer")
    assert_user_error(cli("ask", "legal@1", "q"), "format v99 is newer")


def test_every_command_has_help_with_example(cli):
    for command in ["init", "ls", "show", "verify", "alias", "rm", "compose", "chat", "ask", "model prepare"]:
        code, out, _ = cli(*command.split(), "--help")
        assert code == 0 and "Example: cartridges" in out, command


def synthesis_settings(*more: str) -> list[str]:
    """--set pairs for a seconds-long synthesis on the tiny model, on top of the tiny config."""
    settings = [
        "synthesis.chunk_min_tokens=16",
        "synthesis.chunk_max_tokens=64",
        "synthesis_run.engine=hf",
        "synthesis_run.executor=local",
        *more,
    ]
    return ["--config", "tiny", *[arg for setting in settings for arg in ("--set", setting)]]


def test_synthesize_writes_shards_and_resumes(cli, tiny_model_dir, tmp_path):
    import pyarrow.parquet as pq

    corpus = tmp_path / "statutes"
    corpus.mkdir()
    (corpus / "s.txt").write_text(
        " ".join(f"Section {i}. Rent for unit {i} is due on day {i % 28 + 1}." for i in range(40))
    )
    args = [
        "synthesize",
        str(corpus),
        "--out",
        str(tmp_path / "run"),
        "--model",
        str(tiny_model_dir),
        *synthesis_settings(
            "synthesis.samples=6",
            "synthesis.kinds={continuation: 1, fill_span: 1}",
            "synthesis.max_answer_tokens=16",
            "synthesis.shard_size=4",
        ),
    ]
    code, out, err = cli(*args)
    assert code == 0, err
    assert "6/6 samples" in out and "corpus: 1 documents" in out
    assert pq.read_table(tmp_path / "run" / "synthesis" / "shards").num_rows == 6
    code, out, err = cli(*args)
    assert code == 0 and "6/6 samples" in out


@pytest.mark.parametrize(
    "setting, message",
    [
        ("synthesis.kinds={poetry: 1}", "unknown seed kind"),
        ("synthesis_run.engine=tpu", "invalid setting 'synthesis_run.engine': Input should be"),
        ("synthesis.kinds={quote: x}", "invalid setting 'synthesis.kinds.quote': Input should be a valid number"),
    ],
)
def test_synthesize_bad_settings(cli, corpus_dir, tiny_model_dir, tmp_path, setting, message):
    result = cli(
        "synthesize", str(corpus_dir), "--out", str(tmp_path / "run"), "--model", str(tiny_model_dir), "--set", setting
    )
    assert_user_error(result, message)
    assert not (tmp_path / "run").exists()


def test_distill_publishes_a_distilled_cartridge(cli, tiny_model_dir, tmp_path):
    corpus = tmp_path / "statutes"
    corpus.mkdir()
    (corpus / "s.txt").write_text(
        " ".join(f"Section {i}. Rent for unit {i} is due on day {i % 28 + 1}." for i in range(40))
    )
    run = tmp_path / "run"
    code, _, err = cli(
        "synthesize",
        str(corpus),
        "--out",
        str(run),
        "--model",
        str(tiny_model_dir),
        *synthesis_settings("synthesis.samples=6", "synthesis.kinds={continuation: 1}"),
    )
    assert code == 0, err
    code, out, err = cli(
        "distill",
        str(run),
        "--name",
        "legal",
        "--config",
        "tiny",
        "--set",
        "distill.steps=2",
        "--model",
        str(tiny_model_dir),
    )
    assert code == 0, err
    assert "published legal@1 (8 tokens, method distilled)" in out
    manifest = json.loads(cli("show", "legal@1")[1])
    assert manifest["method"] == "distilled" and manifest["method_config"]["steps"] == 2
    distill_again = ["distill", str(run), "--name", "legal", "--config", "tiny", "--model", str(tiny_model_dir)]
    code, out, err = cli(*distill_again, "--set", "distill.steps=2")  # as a build: a published folder is done
    assert code == 0 and f"nothing to do: {run} was published as legal@1" in " ".join(out.split()), err
    listed = cli("ls")[1]
    assert "legal@1" in listed and "legal@2" not in listed
    second = tmp_path / "run-2"
    shutil.copytree(run, second, ignore=shutil.ignore_patterns("distill", "published.json", "warm_start.json"))
    code, out, err = cli(*distill_again[:1], str(second), *distill_again[2:], "--set", "distill.steps=3")
    assert code == 0 and "published legal@2" in out, err
    assert json.loads(cli("show", "legal@2")[1])["parent"] == "legal@1"  # warm-started, as a build would


def test_distill_without_synthesis_is_a_user_error(cli, tmp_path, tiny_model_dir):
    assert_user_error(
        cli("distill", str(tmp_path), "--name", "x", "--model", str(tiny_model_dir)), "has no synthesis shards"
    )


def test_eval_scores_a_cartridge_like_the_same_tokens_truncated(cli, published, tiny_model_dir, corpus_dir, tmp_path):
    """An init cartridge of 24 tokens is the corpus truncated to 24 tokens: both paths must score the same."""
    from cartridges.stages.ingest import read_corpus

    qa = tmp_path / "qa.json"
    questions = [
        {"id": str(i), "question": q, "answer": a, "answer_type": "duration"}
        for i, (q, a) in enumerate([("Notice?", "three days"), ("Cure?", "ten days")])
    ]
    qa.write_text(
        json.dumps({"corpora": [{"id": "legal", "text": read_corpus(corpus_dir).text, "questions": questions}]})
    )
    code, out, err = cli("eval", "--cartridge", published, "--qa", str(qa), "--out", str(tmp_path / "cartridge.json"))
    assert code == 0, err
    assert "legal" in out and "cartridge" in out
    code, _, err = cli(
        "eval",
        "--method",
        "truncated",
        "--budget",
        "24",
        "--qa",
        str(qa),
        "--model",
        str(tiny_model_dir),
        "--out",
        str(tmp_path / "truncated.json"),
    )
    assert code == 0, err
    cartridge = json.loads((tmp_path / "cartridge.json").read_text())["scores"][0]
    truncated = json.loads((tmp_path / "truncated.json").read_text())["scores"][0]
    assert cartridge["kv_tokens"] == truncated["kv_tokens"] == 24
    assert cartridge["per_question_nll"] == pytest.approx(truncated["per_question_nll"], abs=1e-5)
    assert cartridge["rank_accuracy"] == truncated["rank_accuracy"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "cartridge"], "--method cartridge needs --cartridge"),
        (["--method", "rag", "--cartridge", "legal@1"], "--cartridge is only used with --method cartridge"),
        (["--method", "none", "--qa", "missing.json"], "QA file missing.json does not exist"),
    ],
)
def test_eval_mistakes_exit_2_with_the_fix(cli, args, message):
    code, _, err = cli("eval", *args)
    assert code == 2 and message in err and "Traceback" not in err


# ---- issue 14 -----------------------------------------------------------------------------------


def test_ls_lists_what_is_valid_and_reports_the_rest(cli, published, cartridges_home):
    registry = cartridges_home / "registry"
    (registry / "lost+found").mkdir()
    (registry / "legal" / "5").mkdir()
    code, out, err = cli("ls")
    assert code == 0 and "legal@1" in out
    assert (
        "skipped lost+found: not a cartridge name" in err
        and "skipped legal/5: no manifest.json" in err
        and "Traceback" not in err
    )


def test_verify_says_what_it_checked(cli, published):
    code, out, _ = cli("verify", "legal@1")
    assert code == 0 and out.startswith(
        "legal@1: OK (2 files, shapes, manifest bound to the payload, finite values, the model's fingerprints and KV shape)"
    )


def test_a_folder_in_the_current_directory_never_replaces_a_registry_name(
    cli, published, tiny_model_dir, second_corpus_dir, tmp_path, monkeypatch, cartridges_home
):
    """`legal` is always the registry's; a folder is named explicitly (./legal or path:legal), the same in every command."""
    from cartridges.stages.distillation.init.first_tokens import init_cartridge
    from cartridges.stages.ingest import read_corpus

    init_cartridge(
        load_model(str(tiny_model_dir)), read_corpus(second_corpus_dir), 8, "other", tmp_path / "work" / "legal"
    )
    monkeypatch.chdir(tmp_path / "work")
    assert json.loads(cli("show", "legal")[1])["num_tokens"] == 24
    assert json.loads(cli("show", "./legal")[1])["num_tokens"] == 8
    assert json.loads(cli("show", "path:legal")[1])["num_tokens"] == 8
    code, out, _ = cli("verify", "path:legal")
    assert code == 0 and out.startswith("legal: OK")
    registry_answer = cli("ask", "legal", "Notice?", "--max-new-tokens", "3")
    folder_answer = cli("ask", "./legal", "Notice?", "--max-new-tokens", "3")
    runtime = CartridgeRuntime(
        load_model(str(tiny_model_dir)), [load_artifact(cartridges_home / "registry" / "legal" / "1")]
    )
    assert registry_answer[1] == runtime.generate([{"role": "user", "content": "Notice?"}], max_new_tokens=3) + "\n"
    assert folder_answer[0] == 0
    (cartridges_home / "registry" / "legal").rename(cartridges_home / "elsewhere")
    assert_user_error(
        cli("ask", "legal", "q"),
        "no cartridge named 'legal'",
        "a cartridge folder ./legal is here: pass ./legal to use it",
    )


def test_the_model_mismatch_message_suggests_a_model_option_that_works(tiny, tmp_path):
    from registry_helpers import fake_artifact

    from cartridges.artifact.folder import check_compatible
    from cartridges.errors import CartridgeError

    cartridge = load_artifact(fake_artifact(tmp_path / "a"))
    embedded = cartridge.manifest.model_copy(update={"model_id": "embedded:SmolLM2-135M-Instruct"})
    with pytest.raises(CartridgeError, match="load it with --model default$"):
        check_compatible(type(cartridge)(embedded, cartridge.prompt_embeddings, cartridge.path), tiny)
