"""A real uvicorn server on 127.0.0.1 in a thread of the test process (the server and page tests)."""

import socket
import threading
import time

import openai
import uvicorn

from cartridges.serving.server import create_app


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Running:
    """A real uvicorn server in a thread of this process, stopped at the end of the test."""

    def __init__(self, server, page: bool = True):
        self.server = server
        self.port = free_port()
        self.uvicorn = uvicorn.Server(
            uvicorn.Config(create_app(server, page), host="127.0.0.1", port=self.port, log_level="error")
        )
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)
        self.server.decoder.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, key: str = "none", cls=openai.OpenAI):
        return cls(base_url=self.url, api_key=key, max_retries=0, timeout=120)
