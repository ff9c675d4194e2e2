"""An S3-compatible server on 127.0.0.1 (moto's server mode) for tests that use the real `s3fs` client."""

import logging

from moto.server import ThreadedMotoServer

# Fixed, fake credentials: the server accepts any; they keep botocore from looking for real ones.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def start_s3_server() -> tuple[ThreadedMotoServer, str]:
    """(server, endpoint URL); every process given `S3_ENV` and `AWS_ENDPOINT_URL=<endpoint>` reaches it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # the OS picks a free port
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"
