"""Progress: a bar on a terminal, plain lines (stage, done/total, rate, ETA) anywhere else."""

import io
import json
import os
import subprocess
import sys
import time

from rich.console import Console

from cartridges.progress import ThroughputProgress


def test_plain_lines_when_the_output_is_not_a_terminal(monkeypatch):
    monkeypatch.setenv("CARTRIDGES_PROGRESS_SECONDS", "0")
    out = io.StringIO()
    with ThroughputProgress("synthesize", total=4, console=Console(file=out, force_terminal=False)) as progress:
        for _ in range(4):
            progress.advance(1, tokens=10)
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "synthesize: 1/4 samples (25%)",
        "synthesize: 2/4 samples (50%)",
        "synthesize: 3/4 samples (75%)",
        "synthesize: 4/4 samples (100%)",
    ]
    assert all(" samples/s, " in line and " tok/s, elapsed " in line and ", ETA " in line for line in lines)
    assert lines[-1].endswith("ETA 0:00:00")


def test_the_eta_follows_the_rate_after_the_first_unit_not_the_start_up(monkeypatch):
    """Start-up 90 s, then 10 s per item: after 3 of 10 items the remaining 7 take 70 s, where the
    average over the whole elapsed time (3 items in 120 s) would say 280 s."""
    now = [0.0]
    monkeypatch.setattr("cartridges.progress.time.perf_counter", lambda: now[0])
    monkeypatch.setenv("CARTRIDGES_PROGRESS_SECONDS", "3600")
    progress = ThroughputProgress("synthesize", total=10, console=Console(file=io.StringIO(), force_terminal=False))
    for finished_at in (100.0, 110.0, 120.0):
        now[0] = finished_at
        progress.advance(1)
    line = progress.plain_line()
    assert line.endswith("elapsed 0:02:00, ETA 0:01:10"), line


def test_plain_lines_come_at_the_interval_not_at_every_step(monkeypatch):
    monkeypatch.setenv("CARTRIDGES_PROGRESS_SECONDS", "3600")
    out = io.StringIO()
    with ThroughputProgress(
        "distill", total=100, unit="steps", console=Console(file=out, force_terminal=False)
    ) as progress:
        for _ in range(100):
            progress.advance(1)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]
    assert out.getvalue().startswith("distill: 100/100 steps (100%)")


def test_a_terminal_gets_the_bar_and_no_plain_lines(monkeypatch):
    monkeypatch.setenv("CARTRIDGES_PROGRESS_SECONDS", "0")
    out = io.StringIO()
    with ThroughputProgress(
        "distill", total=3, unit="steps", console=Console(file=out, force_terminal=True)
    ) as progress:
        for _ in range(3):
            progress.advance(1)
    assert "distill: 1/3 steps" not in out.getvalue() and "3/3" in out.getvalue()


def test_ray_training_progress_follows_the_workers_metrics_file(tmp_path, monkeypatch):
    from cartridges.stages.distillation.run import following_metrics

    monkeypatch.setenv("CARTRIDGES_PROGRESS_SECONDS", "0")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "tokens": 5}) + "\n")  # a step of an earlier, resumed run: not counted
    out = io.StringIO()
    with ThroughputProgress(
        "distill", total=3, unit="steps", console=Console(file=out, force_terminal=False)
    ) as progress:
        with following_metrics(metrics, progress, poll_seconds=0.05):
            with metrics.open("a") as log:
                for step in (2, 3):
                    log.write(json.dumps({"step": step, "tokens": 7}) + "\n")
                    log.flush()
                    time.sleep(0.2)
                log.write('{"step": 4, "tok')  # a line still being written is not read
        assert (progress.items, progress.tokens) == (2, 14)


def test_a_tiny_build_logged_to_a_file_shows_progress_lines_and_no_errors(
    tiny_model_dir, long_corpus, cartridges_home, tmp_path
):
    log = tmp_path / "build.log"
    env = os.environ | {"CARTRIDGES_HOME": str(cartridges_home), "CARTRIDGES_PROGRESS_SECONDS": "0"}
    command = [
        sys.executable,
        "-m",
        "cartridges.pipeline.cli",
        "build",
        str(long_corpus),
        "--name",
        "legal",
        "--config",
        "tiny",
    ]
    with log.open("w") as handle:
        done = subprocess.run(
            [*command, "--set", f"model={tiny_model_dir}"], stdout=handle, stderr=subprocess.STDOUT, env=env
        )
    text = log.read_text()
    assert done.returncode == 0, text
    assert (
        "synthesize: 4/4 samples (100%)" in text and "distill: 2/2 steps (100%)" in text and "published legal@1" in text
    )
    assert "Traceback" not in text and " E " not in text and "ERROR" not in text and "━" not in text
