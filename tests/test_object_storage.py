"""Registries on an object store: an S3-compatible server on 127.0.0.1 and the real s3fs client (issue 18)."""

import os
import subprocess
import sys
from pathlib import Path

from cartridges.registry import Registry

QUESTION = "How many days notice must a landlord give?"


def ask_in_fresh_process(home: Path, registry: str, model: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cartridges.pipeline.cli", "ask", "legal@1", QUESTION, "--model", str(model)]
    command += ["--registry", registry, "--max-new-tokens", "12"]
    env = os.environ | {"CARTRIDGES_HOME": str(home)}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_ask_from_a_fresh_process_reads_the_cartridge_from_s3(cli, s3_bucket, corpus_dir, lively_model_dir, tmp_path):
    """Published to s3:// by one process, answered by another whose home holds nothing: the answer is the
    one the same artifact gives from a local registry, and the fresh home now caches it by digest."""
    remote = f"{s3_bucket}/registry"
    code, _, err = cli("init", "--corpus", str(corpus_dir), "--model", str(lively_model_dir), "--tokens", "16")
    assert code == 0, err
    code, _, err = cli(
        "init", "--corpus", str(corpus_dir), "--model", str(lively_model_dir), "--tokens", "16", "--registry", remote
    )
    assert code == 0, err
    local = str(Path(os.environ["CARTRIDGES_HOME"]) / "registry")
    assert Registry(remote).show("legal@1").files == Registry(local).show("legal@1").files

    fresh_home = tmp_path / "fresh-home"
    from_s3 = ask_in_fresh_process(fresh_home, remote, lively_model_dir)
    from_folder = ask_in_fresh_process(tmp_path / "other-home", local, lively_model_dir)
    assert from_s3.returncode == 0, from_s3.stderr
    assert from_s3.stdout.strip() and from_s3.stdout == from_folder.stdout
    assert not (fresh_home / "registry").exists()
    [cached] = (fresh_home / "cache" / "artifacts").iterdir()
    assert (cached / "manifest.json").read_bytes() == Registry(remote).manifest_bytes("legal", 1)
