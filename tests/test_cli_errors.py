"""Every command against a table of bad inputs: exit 2, one `error:` line on stderr naming the problem,
no traceback, and nothing written (the registry, run folders and scratch folders are as before)."""

import importlib.util
import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import STATUTE, build_tiny_model

from cartridges.artifact.folder import load_artifact
from cartridges.models import load_model
from cartridges.registry.store import Registry
from cartridges.stages.distillation.init.first_tokens import init_cartridge
from cartridges.stages.ingest import read_corpus

# (command line with {placeholders}, fragment of the one error line)
BAD_INPUTS = [
    ("init --corpus {missing} --model {tiny}", "does not exist"),
    ("init --corpus {empty} --model {tiny}", "has no readable text"),
    (
        "init --corpus {binary} --model {tiny}",
        "no readable text (.htm, .html, .json, .jsonl, .markdown, .md, .pdf, .rst, .txt); skipped: scan.pdf",
    ),
    ("init --corpus {corpus} --name ../up --model {tiny}", "invalid cartridge name '../up'"),
    ("init --corpus {corpus} --tokens 10000 --model {tiny}", "--tokens 10000 does not fit"),
    ("init --corpus {corpus} --model {tiny} --registry memory://reg", "lives only inside this process"),
    ("init --corpus {corpus} --model {tiny} --registry foo://bucket/reg", "unknown storage scheme 'foo://'"),
    ("init --corpus {corpus} --model {tiny} --registry {readonly}", "cannot publish legal in the registry"),
    ("init --corpus {corpus} --model ./no/such/model", "no such folder"),
    ("init --corpus {corpus} --model {garbage}", "cannot load the model in"),
    ("ls --registry foo://bucket/reg", "unknown storage scheme"),
    ("show nope", "no cartridge named 'nope'"),
    ("show legal@9", "legal has no version 9 (versions: 1)"),
    ("show Legal", "invalid cartridge name 'Legal'"),
    ("show legal@dangling", "alias legal@dangling points at legal@9, which no longer exists"),
    ("show tax@stable", "aliases.json is damaged"),
    ("show ./no-such-folder", "is not a cartridge"),
    ("verify legal@9", "no version 9"),
    ("verify ./no-such-folder", "is not a cartridge"),
    ("alias legal@1 latest", "alias 'latest' is reserved"),
    ("alias legal@1 Bad", "invalid cartridge alias 'Bad'"),
    ("alias legal@1 prod --registry {readonly}", "cannot set alias legal@prod in the registry"),
    ("alias legal prod --remove", "legal has no alias 'prod'"),
    ("alias legal@1 prod --registry memory://reg", "lives only inside this process"),
    ("rm legal@1", "legal@1 is aliased as stable: move the alias first or pass --force"),
    ("rm legal@7", "legal has no version 7"),
    ("rm legal@1 --force --registry {readonly}", "in the registry"),
    ("compose legal@1 --name one", "compose needs at least two cartridges"),
    ("compose legal@1 nope@1 --name two", "no cartridge named 'nope'"),
    ("compose legal@1 legal@1 --name two --registry memory://reg", "lives only inside this process"),
    ("chat nope", "no cartridge named 'nope'"),
    ("chat legal@1 --model {other}", "was built for model"),
    ("ask legal@1 {long_question} --model {tiny}", "past the model's window of 1024"),
    ("ask ./legal question", "is not a cartridge folder"),
    ("ask legal@1 question --also ./missing", "is not a cartridge folder"),
    (
        "synthesize {corpus} --out {out} --set synthesis.samples=0 --model {tiny}",
        "invalid setting 'synthesis.samples': Input should be greater than or equal to 1 (got 0)",
    ),
    ("synthesize {corpus} --out {out} --set synthesis.kinds.poetry=1 --model {tiny}", "unknown seed kind"),
    ("synthesize {corpus} --out {out} --config nope --model {tiny}", "config 'nope' is neither a YAML file"),
    ("synthesize {missing} --out {out} --model {tiny}", "does not exist"),
    ("distill {empty} --name x --model {tiny}", "has no synthesis shards"),
    (
        "distill {empty} --name x --set distill.lr=5 --model {tiny}",
        "invalid setting 'distill.lr': Input should be less than or equal to 1",
    ),
    ("distill {empty} --name x --registry memory://reg", "lives only inside this process"),
    (
        "build {corpus} --config tiny --set distill.steps=true --set model={tiny}",
        "invalid setting 'distill.steps': Input should be a valid integer (got True)",
    ),
    ("build {corpus} --config tiny --set distill.steps=[ --set model={tiny}", "is not valid YAML"),
    (
        "build {corpus} --config tiny --set distill.lr=.inf --set model={tiny}",
        "invalid setting 'distill.lr': Input should be a finite number",
    ),
    (
        "build {corpus} --config tiny --set distill.num_tokens=1000 --set model={tiny}",
        "more than the model's window of 1024",
    ),
    ("build {corpus} --config {latin1_config}", "not UTF-8 text"),
    ("build {corpus} --config no-such-config", "neither a YAML file nor a shipped config"),
    ("build {corpus} --config tiny --set model={tiny} --registry memory://reg", "lives only inside this process"),
    ("build {corpus} --config tiny --set model={tiny} --qa {missing}", "--qa needs --qa-corpus"),
    ("eval --method magic", "--method 'magic' is not a method"),
    ("eval --method none --qa {missing} --corpus-id x", "does not exist"),
    ("schedule add {missing} --name legal", "does not exist"),
    ("schedule add {corpus} --name legal --cron often", "is not a cron expression"),
    ("schedule add {corpus} --name legal --registry memory://reg", "lives only inside this process"),
    ("schedule remove nope", "no schedule named 'nope'"),
    ("schedule run-now nope", "no schedule named 'nope'"),
    ("gc --older-than soon", "--older-than 'soon': expected a number"),
    # issue 36: references with digits of other scripts, usage mistakes, reserved names, stores, files in the way
    ("show legal@²", "invalid reference 'legal@²'"),
    ("show legal@١", "invalid reference 'legal@١'"),  # an Arabic-Indic one: not version 1
    ("verify legal@𝟏", "invalid reference"),
    ("rm legal", "rm needs the version to delete: legal@N (or legal --latest"),
    ("init --corpus {corpus} --name default --model {tiny}", "the cartridge name 'default' is reserved"),
    ("init --corpus {corpus} --tokens 1 --model {tiny}", "Invalid value for '--tokens'"),
    ("show", "Missing argument 'ref'"),
    ("ls --bogus", "No such option: --bogus"),
    ("build {corpus} --config {bomb_config}", "aliases (*name) are not allowed in a config"),
    ("build {corpus} --config tiny --set model={tiny} --set distill.steps=[&a,*a]", "aliases (*name) are not allowed"),
    ("synthesize {corpus} --out {a_file} --model {tiny}", "is a file, not a folder"),
    ("synthesize {corpus} --out {a_file}/run --model {tiny}", "is a file, not a folder"),
    ("build {corpus} --config tiny --set model={tiny} --set runs_root={a_file}/runs", "runs root"),
    ("ls --registry ftp://127.0.0.1:1/x", "cannot connect (Connection refused)"),
    ("serve --port {busy_port} --model {tiny}", "cannot serve on 127.0.0.1:"),
]
if importlib.util.find_spec("s3fs") is None:
    BAD_INPUTS.append(("init --corpus {corpus} --model {tiny} --registry s3://bucket/reg", "Install s3fs to access S3"))


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, other_tiny_model_dir) -> dict:
    """A registry (legal@1 with aliases stable and dangling -> 9, tax@1 with a damaged aliases.json) and bad inputs."""
    root = tmp_path_factory.mktemp("world")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "statute.txt").write_text(STATUTE * 2)
    tiny = load_model(str(tiny_model_dir))
    registry = Registry(root / "registry")
    for name, tokens in (("legal", 24), ("tax", 8)):
        init_cartridge(tiny, read_corpus(corpus), tokens, name, root / f"art-{name}")
        registry.publish(root / f"art-{name}", name)
    registry.set_alias("legal@1", "stable")
    (root / "registry" / "legal" / "aliases").mkdir(exist_ok=True)
    (root / "registry" / "legal" / "aliases" / "dangling.json").write_text(json.dumps({"version": 9}))
    (root / "registry" / "tax" / "aliases.json").write_text("{broken")
    (root / "empty").mkdir()
    (root / "binary").mkdir()
    (root / "binary" / "scan.pdf").write_bytes(b"%PDF\x00binary")
    garbage = build_tiny_model(root / "garbage-model")
    (garbage / "model.safetensors").write_bytes(b"not weights")
    (root / "latin1.yaml").write_bytes("distill:\n  steps: 2  # préavis\n".encode("latin-1"))
    laughs = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    laughs += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
    (root / "bomb.yaml").write_text("\n".join(laughs) + "\n")  # 9^9 values once expanded
    (root / "a-file").write_text("not a folder")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    assert load_artifact(root / "registry" / "legal" / "1").manifest.version == 1
    return {
        "root": root,
        "corpus": corpus,
        "missing": root / "missing",
        "empty": root / "empty",
        "binary": root / "binary",
        "tiny": tiny_model_dir,
        "other": other_tiny_model_dir,
        "garbage": garbage,
        "latin1_config": root / "latin1.yaml",
        "bomb_config": root / "bomb.yaml",
        "a_file": root / "a-file",
        "busy_port": busy.getsockname()[1],
        "busy_socket": busy,
        "long_question": "notice " * 3000,
    }


@pytest.fixture
def readonly_registry(world, tmp_path):
    """A copy of the registry that even root cannot write (immutable), else one without write permission."""
    copy = Path(shutil.copytree(world["root"] / "registry", tmp_path / "readonly"))
    if subprocess.run(["chattr", "-R", "+i", str(copy)], capture_output=True).returncode != 0:
        for path in [copy, *copy.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        probe = copy / "probe"
        try:
            probe.mkdir()
        except OSError:
            pass
        else:
            probe.rmdir()
            pytest.skip("no way to make a read-only folder here")
    yield copy
    subprocess.run(["chattr", "-R", "-i", str(copy)], capture_output=True)
    for path in [copy, *copy.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `roots` with its size and modification time (caches of model fingerprints aside)."""
    found = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            if "fingerprints" not in path.parts:
                stat = (
                    path.stat()
                )  # a folder's own time changes when a scratch entry comes and goes: only its presence counts
                found[str(path)] = (stat.st_size, stat.st_mtime_ns) if path.is_file() else (0, 0)
    return found


@pytest.mark.parametrize("command, message", BAD_INPUTS, ids=[c.split(" --")[0][:40] for c, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    cli, world, cartridges_home, tmp_path, monkeypatch, command, message, request
):
    shutil.copytree(world["root"] / "registry", cartridges_home / "registry")
    places = {k: str(v) for k, v in world.items()} | {"out": str(tmp_path / "run")}
    if "{readonly}" in command:
        places["readonly"] = str(request.getfixturevalue("readonly_registry"))
    monkeypatch.chdir(tmp_path)
    watched = [cartridges_home, world["root"], tmp_path]
    before = snapshot(*watched)
    args = [part.format(**places) for part in command.split(" ")]
    code, out, err = cli(*args)
    lines = err.strip().splitlines()
    assert code == 2, (out, err)
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], err
    assert "Traceback" not in err and len([line for line in lines if line.startswith("error:")]) == 1
    assert snapshot(*watched) == before
