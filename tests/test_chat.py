"""Chat and ask under failure: generation errors reach the user as one line, Ctrl-C stops an answer
and keeps the session, and window budgets are checked before anything runs."""

import os
import select
import signal
import subprocess
import sys
import threading
import time

import pytest
from rich.console import Console

from cartridges.artifact.folder import load_artifact
from cartridges.chat import chat_session
from cartridges.errors import CartridgeError
from cartridges.runtime import CartridgeRuntime
from cartridges.stages.distillation.init.first_tokens import init_cartridge
from cartridges.stages.ingest import read_corpus


@pytest.fixture
def runtime(tiny, corpus_dir, tmp_path) -> CartridgeRuntime:
    init_cartridge(tiny, read_corpus(corpus_dir), 24, "legal", tmp_path / "legal")
    return CartridgeRuntime(tiny, [load_artifact(tmp_path / "legal")])


def worker_threads() -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t is not threading.main_thread() and t.daemon and t.is_alive() and "work" in t.name
    ]


def lines(*items: str):
    remaining = list(items)

    def read() -> str:
        if not remaining:
            raise EOFError
        return remaining.pop(0)

    return read


def test_a_failing_generation_is_raised_not_lost(runtime, monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("index out of range in self")

    monkeypatch.setattr(runtime.loaded.model, "generate", broken)
    started = time.monotonic()
    with pytest.raises(CartridgeError, match="generation failed: RuntimeError: index out of range in self"):
        list(runtime.stream([{"role": "user", "content": "Notice?"}], max_new_tokens=4))
    assert time.monotonic() - started < 10 and worker_threads() == []


def test_chat_reports_a_failed_turn_in_one_line_and_goes_on(runtime, monkeypatch):
    real_generate, calls = runtime.loaded.model.generate, []

    def fails_once(**kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real_generate(**kwargs)

    monkeypatch.setattr(runtime.loaded.model, "generate", fails_once)
    console = Console(record=True, width=200)
    chat_session(runtime, lines("First?", "Second?", "/exit"), console, max_new_tokens=3)
    text = console.export_text()
    assert "error: generation failed: RuntimeError: boom" in text and len(calls) == 2
    assert "Traceback" not in text


def test_ctrl_c_stops_the_answer_keeps_the_conversation_and_leaves_no_thread(runtime, monkeypatch):
    """Ctrl-C arrives while the answer prints: the answer stops, the worker thread is joined, the next turn runs."""
    seen: list[list[dict]] = []
    real_stream = runtime.stream

    def recording_stream(messages, **kwargs):
        seen.append([dict(m) for m in messages])
        return real_stream(messages, **kwargs)

    monkeypatch.setattr(runtime, "stream", recording_stream)
    console = Console(record=True, width=200)
    printed = []
    real_print = console.print

    def print_then_interrupt(*args, **kwargs):
        real_print(*args, **kwargs)
        if kwargs.get("end") == "":  # a piece of the first answer
            printed.append(args[0])
            if len(printed) == 1:
                raise KeyboardInterrupt

    monkeypatch.setattr(console, "print", print_then_interrupt)
    chat_session(runtime, lines("First?", "Second?", "/exit"), console, max_new_tokens=200)
    assert "(stopped)" in console.export_text()
    assert worker_threads() == []
    # the second turn saw the first question and the part of its answer that was shown
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"]
    assert seen[1][1]["content"] == printed[0].strip()


def test_ctrl_c_at_the_prompt_or_end_of_input_exits_cleanly(runtime):
    def interrupted() -> str:
        raise KeyboardInterrupt

    chat_session(runtime, interrupted, Console(record=True), max_new_tokens=3)
    chat_session(runtime, lines(), Console(record=True), max_new_tokens=3)


def test_a_question_past_the_window_is_refused_up_front_with_the_numbers(runtime):
    long_question = [{"role": "user", "content": "notice " * 2000}]
    with pytest.raises(
        CartridgeError,
        match=r"the chat is \d+ tokens; with the cartridge's 24 that is \d+, past the model's window of 1024",
    ):
        runtime.generate(long_question, max_new_tokens=4)


def test_an_answer_stops_at_the_window(runtime):
    """max_new_tokens beyond the window is cut to what fits instead of running past the positions."""
    kwargs = runtime._generate_kwargs([{"role": "user", "content": "Notice?"}], max_new_tokens=10_000, temperature=0.0)
    assert kwargs["input_ids"].shape[1] + kwargs["max_new_tokens"] == runtime.window


def test_cartridges_longer_than_the_window_are_refused(tiny, corpus_dir, tmp_path):
    init_cartridge(tiny, read_corpus(corpus_dir), 24, "legal", tmp_path / "legal")
    cartridge = load_artifact(tmp_path / "legal")
    with pytest.raises(CartridgeError, match=r"the cartridges hold 1032 tokens, but .* reads at most 1024 positions"):
        CartridgeRuntime(tiny, [cartridge] * 43)


def test_init_refuses_a_cartridge_longer_than_the_window(tiny, corpus_dir, tmp_path):
    with pytest.raises(CartridgeError, match=r"--tokens 10000 does not fit .* which reads at most 1024 positions"):
        init_cartridge(tiny, read_corpus(corpus_dir), 10_000, "legal", tmp_path / "legal")
    assert not (tmp_path / "legal").exists()


CHAT_SCRIPT = """
import sys
from cartridges.pipeline.cli import main
sys.argv = ["cartridges", "chat", "legal@1", "--max-new-tokens", "1000", "--temperature", "1.5"]
main()
"""


class Pipe:
    """Reads a child's stdout with a deadline, so that a test can wait for text without hanging."""

    def __init__(self, process: subprocess.Popen, seconds: float = 60):
        self.process, self.deadline, self.text = process, time.monotonic() + seconds, b""

    def until(self, done) -> bytes:
        while not done(self.text):
            remaining = self.deadline - time.monotonic()
            ready, _, _ = select.select([self.process.stdout], [], [], max(remaining, 0))
            if not ready:
                raise AssertionError(f"timed out; the chat printed: {self.text[-500:]!r}")
            chunk = os.read(self.process.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"the chat exited early; it printed: {self.text[-500:]!r}")
            self.text += chunk
        return self.text


def test_a_real_ctrl_c_during_an_answer_returns_to_the_prompt(cli, tiny_model_dir, corpus_dir, cartridges_home):
    """SIGINT to a real chat process while it streams: no SIGABRT, the prompt comes back, /exit exits 0."""
    assert (
        cli("init", "--corpus", str(corpus_dir), "--tokens", "24", "--name", "legal", "--model", str(tiny_model_dir))[0]
        == 0
    )
    env = os.environ | {"CARTRIDGES_HOME": str(cartridges_home), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    chat = subprocess.Popen(
        [sys.executable, "-c", CHAT_SCRIPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        pipe = Pipe(chat, seconds=180)  # five tries of a streamed answer on a loaded CI box
        pipe.until(lambda text: text.count(b"you> ") == 1)  # model loaded, first prompt shown
        for _ in range(5):  # a sampled answer may end on its own before the signal: ask again
            chat.stdin.write(b"Tell me about notice\n")
            chat.stdin.flush()
            prompts, shown = pipe.text.count(b"you> "), len(pipe.text)
            pipe.until(
                lambda text, shown=shown, prompts=prompts: len(text) >= shown + 20 or text.count(b"you> ") > prompts
            )
            if pipe.text.count(b"you> ") == prompts:  # still answering
                chat.send_signal(signal.SIGINT)
                pipe.until(lambda text, prompts=prompts: b"(stopped)" in text and text.count(b"you> ") > prompts)
                break
        chat.stdin.write(b"/exit\n")
        chat.stdin.flush()
        rest, err = chat.communicate(timeout=60)
    finally:
        chat.kill()
    assert chat.returncode == 0, err.decode()
    assert b"(stopped)" in pipe.text and b"Traceback" not in err
