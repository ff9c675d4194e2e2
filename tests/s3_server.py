"""An S3-compatible server on 127.0.0.1 (moto's server mode) for tests that use the real `s3fs` client."""

import logging
import socket

from moto.server import ThreadedMotoServer

# Fixed, fake credentials: the server accepts any; they keep botocore from looking for real ones.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_s3_server() -> tuple[ThreadedMotoServer, str]:
    """(server, endpoint URL); every process given `S3_ENV` and `AWS_ENDPOINT_URL=<endpoint>` reaches it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"
