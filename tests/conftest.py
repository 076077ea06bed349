"""Shared fixtures: an isolated cache, offline Hugging Face, tiny sources, a real S3 server on loopback."""

import logging
import os
import socket

import pytest

# Nothing in the tests may reach a hub; set before transformers is imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# Ray Data's debug records (operator metrics dumps) would bury a failing test's own message.
logging.getLogger("ray.data").setLevel(logging.WARNING)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Builtin sources are generated once per test session into a fresh cache; runs go to a temp root."""
    path = str(tmp_path_factory.mktemp("t5adapt-cache"))
    saved = {k: os.environ.get(k) for k in ("T5ADAPT_CACHE", "T5ADAPT_ROOT", "MLFLOW_TRACKING_URI")}
    os.environ["T5ADAPT_CACHE"] = path
    os.environ["T5ADAPT_ROOT"] = str(tmp_path_factory.mktemp("t5adapt-root"))  # nothing lands in the repo
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield path
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def builtin_path(name: str) -> str:
    from jobs.core import builtin

    return builtin.materialise(name)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (a real HTTP endpoint); boto3 reaches it via AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
