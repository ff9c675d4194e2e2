"""The Makefile passes user values to the CLI as single arguments, whatever characters they hold."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def last_command(*make_args: str) -> list[str]:
    """The arguments /bin/sh passes to the program of the final recipe line of `make -n ...`."""
    outer_make = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")  # set when the tests run under `make test`
    env = {key: value for key, value in os.environ.items() if key not in outer_make}
    command = ["make", "--no-print-directory", "-n", *make_args]
    recipes = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    _program, _, arguments = recipes.replace("\\\n", " ").strip().splitlines()[-1].partition(" ")
    shell = subprocess.run(["sh", "-c", f"printf '%s\\0' {arguments}"], capture_output=True, text=True)
    assert shell.returncode == 0, f"the shell cannot parse the recipe: {shell.stderr}"
    return shell.stdout.split("\0")[:-1]


def test_cartridge_target_quotes_corpus_ids_with_shell_characters():
    args = last_command(
        "cartridge", "CORPUS=my corpus/", "NAME=sky", "QA=qa files/squad.json", "QA_CORPUS=squad2-Sky_(United_Kingdom)"
    )
    assert args == [
        "build",
        "my corpus/",
        "--name",
        "sky",
        "--config",
        "default",
        "--qa",
        "qa files/squad.json",
        "--qa-corpus",
        "squad2-Sky_(United_Kingdom)",
    ]


def test_cartridge_target_without_corpus_builds_the_default_corpus():
    assert last_command("cartridge") == ["build", "--name", "legal", "--config", "default"]


def test_bench_quick_passes_each_cartridge_as_one_argument():
    args = last_command("bench-quick", "CARTRIDGES=squad2-Sky_(United_Kingdom)=sky@1 squad2-Normans=normans@1")
    assert args[-4:] == ["--cartridge", "squad2-Sky_(United_Kingdom)=sky@1", "--cartridge", "squad2-Normans=normans@1"]


def test_nightly_without_corpus_passes_no_empty_path():
    # An empty argument would be Path("") == ".", scheduling the current folder; without one the CLI says it is missing.
    assert last_command("nightly") == ["schedule", "add", "--name", "legal", "--cron", "0 2 * * *"]
    assert last_command("nightly", "CORPUS=legal texts/")[:3] == ["schedule", "add", "legal texts/"]
