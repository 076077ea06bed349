"""One storage URI scheme everywhere: a local path or s3://bucket/prefix.

boto3 for our own objects. The endpoint comes from boto3's usual settings (AWS_ENDPOINT_URL,
profiles, instance roles), so a loopback S3 server in tests and AWS itself take the same code path.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from typing import Iterator, List, Tuple


from jobs.core.errors import UserError
from jobs.core.progress import progress


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> Tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix")."""
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise UserError(f"{uri} has no bucket name: write s3://BUCKET/PREFIX")
    return bucket, prefix.strip("/")


# Retries and multipart transfers are botocore's and boto3's own: the "standard" retry mode (backoff
# with jitter on throttling, 5xx and connection errors) with 10 attempts, unless AWS_RETRY_MODE /
# AWS_MAX_ATTEMPTS (or a profile) say otherwise; files above 64 MiB go up and down in 64 MiB parts.
_RETRIES = {"mode": "standard", "total_max_attempts": 10}
_MULTIPART_BYTES = 64 * 2**20
_clients = {}


def _client():
    """One S3 client per process (boto3 clients are thread-safe; a fork gets its own)."""
    if os.getpid() not in _clients:
        import boto3
        from botocore.config import Config

        user_set = any(os.environ.get(k) for k in ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"))
        config = Config(retries=None if user_set else _RETRIES, connect_timeout=10, read_timeout=60)
        _clients.clear()
        _clients[os.getpid()] = boto3.client("s3", config=config)
    return _clients[os.getpid()]


def _transfer():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=_MULTIPART_BYTES, multipart_chunksize=_MULTIPART_BYTES)


def _list_objects(uri: str) -> List[Tuple[str, int, str]]:
    """(key, size, ETag) of every object under an s3:// prefix."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3(uri)
    keys = []
    try:
        pages = _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else "")
        for page in pages:
            keys += [(obj["Key"], obj["Size"], obj.get("ETag", "")) for obj in page.get("Contents", [])]
    except (BotoCoreError, ClientError) as e:
        raise UserError(f"cannot list {uri}: {e} (check the bucket name, credentials and AWS_ENDPOINT_URL)") from None
    if not keys:
        raise UserError(f"nothing found under {uri}: check the prefix (it is a folder, not a file name)")
    return keys


def object_identities(uri: str) -> List[list]:
    """[key, size, ETag] of every object under an s3:// prefix (or the one object `uri` names), sorted:
    what the content there is, for stage keys."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    try:
        head = _client().head_object(Bucket=bucket, Key=key) if key else None
    except (BotoCoreError, ClientError):
        head = None
    if head is not None:
        return [[key, head["ContentLength"], head.get("ETag", "")]]
    return sorted([k, size, etag] for k, size, etag in _list_objects(uri))


def file_identities(path: str) -> List[list]:
    """[relative path, size, mtime_ns] of a local file or of every file under a directory, sorted."""
    if os.path.isfile(path):
        stat = os.stat(path)
        return [[os.path.basename(path), stat.st_size, stat.st_mtime_ns]]
    found = []
    for folder, _, names in os.walk(path):
        for name in names:
            stat = os.stat(os.path.join(folder, name))
            found.append([os.path.relpath(os.path.join(folder, name), path), stat.st_size, stat.st_mtime_ns])
    return sorted(found)


def list_files(uri: str) -> List[str]:
    """Every object under an s3:// prefix, as s3:// URIs, sorted."""
    bucket, _ = split_s3(uri)
    return sorted(f"s3://{bucket}/{key}" for key, _, _ in _list_objects(uri) if not key.endswith("/"))


def download_file(uri: str, local: str) -> None:
    """One s3:// object to a local path (written under a side name, then renamed)."""
    bucket, key = split_s3(uri)
    os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    _client().download_file(bucket, key, local + ".part", Config=_transfer())
    os.replace(local + ".part", local)


def join(base: str, name: str) -> str:
    """A child of a local directory or an s3:// prefix."""
    return f"{base.rstrip('/')}/{name}" if is_s3(base) else os.path.join(base, name)


def exists(uri: str) -> bool:
    """Whether a local file or an s3:// object exists."""
    if not is_s3(uri):
        return os.path.exists(uri)
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        _client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError:
        return False


def read_text(uri: str) -> str:
    if not is_s3(uri):
        with open(uri) as f:
            return f.read()
    bucket, key = split_s3(uri)
    return _client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()


def write_text(uri: str, text: str) -> None:
    if not is_s3(uri):
        with open(uri, "w") as f:
            f.write(text)
        return
    bucket, key = split_s3(uri)
    _client().put_object(Bucket=bucket, Key=key, Body=text.encode())


def upload_file(local: str, uri: str) -> None:
    bucket, key = split_s3(uri)
    _client().upload_file(local, bucket, key, Config=_transfer())


def delete_prefix(uri: str) -> None:
    """Remove every object under an s3:// prefix (an interrupted or replaced output)."""
    bucket, prefix = split_s3(uri)
    client = _client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def cache_dir() -> str:
    """Where downloaded and generated sources live: $T5ADAPT_CACHE or ~/.cache/t5adapt."""
    return os.environ.get("T5ADAPT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "t5adapt"))


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Hold an exclusive lock on one cache entry across processes (ranks, actors, CLI runs on one
    node): the first builds it, the others wait and then find it done."""
    folder = os.path.join(cache_dir(), "locks")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, hashlib.sha256(name.encode()).hexdigest()[:16] + ".lock")
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def download_prefix(uri: str) -> str:
    """Copy every object under an s3:// prefix into the local cache, one file at a time.

    Returns the local directory. Files already present with the same ETag (recorded beside the
    directory) are not fetched again; an object rewritten in place, even at the same size, is.
    """
    with cache_lock(uri):
        return _download_prefix(uri)


def _download_prefix(uri: str) -> str:
    bucket, prefix = split_s3(uri)
    objects = _list_objects(uri)
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    local = os.path.join(cache_dir(), "s3", bucket, (prefix.replace("/", "_") or "root") + "-" + digest)
    client = _client()
    etags_path = local + ".etags.json"
    etags = json.load(open(etags_path)) if os.path.isfile(etags_path) else {}
    total = sum(size for _, size, _ in objects)
    with progress(total=total, unit="B", unit_scale=True, desc=f"download {uri}") as bar:
        for key, size, etag in objects:
            rel = key[len(prefix):].lstrip("/") if prefix else key
            path = os.path.join(local, rel)
            if os.path.isfile(path) and os.path.getsize(path) == size and etag and etags.get(rel) == etag:
                bar.update(size)
                continue
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # Download to a side name and rename, so an interrupted copy is never taken as whole.
            client.download_file(bucket, key, path + ".part", Callback=bar.update, Config=_transfer())
            os.replace(path + ".part", path)
            etags[rel] = etag
            with open(etags_path, "w") as f:
                json.dump(etags, f)
    return local


def upload_dir(local: str, uri: str, skip: Tuple[str, ...] = ()) -> None:
    """Copy a local directory tree under an s3:// prefix (object keys mirror relative paths), leaving
    out files whose relative path is in `skip`."""
    bucket, prefix = split_s3(uri)
    client = _client()
    files = [os.path.join(d, f) for d, _, names in os.walk(local) for f in names]
    files = [f for f in files if os.path.relpath(f, local).replace(os.sep, "/") not in skip]
    for path in progress(files, desc=f"upload {uri}", unit="file"):
        key = "/".join(filter(None, [prefix, os.path.relpath(path, local).replace(os.sep, "/")]))
        client.upload_file(path, bucket, key, Config=_transfer())


def put_file(local: str, uri: str) -> None:
    """Copy one local file to a local path or an s3:// key (a local copy goes through a side name)."""
    if is_s3(uri):
        upload_file(local, uri)
        return
    os.makedirs(os.path.dirname(uri) or ".", exist_ok=True)
    shutil.copyfile(local, uri + ".part")
    os.replace(uri + ".part", uri)


def list_children(uri: str) -> List[str]:
    """Names of the entries directly under a local directory or an s3:// prefix, sorted ([] if none)."""
    if not is_s3(uri):
        return sorted(os.listdir(uri)) if os.path.isdir(uri) else []
    bucket, prefix = split_s3(uri)
    names = set()
    pages = _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/", Delimiter="/")
    for page in pages:
        names.update(p["Prefix"][len(prefix) + 1:].rstrip("/") for p in page.get("CommonPrefixes", []))
        names.update(obj["Key"][len(prefix) + 1:] for obj in page.get("Contents", []))
    return sorted(n for n in names if n)


def delete_tree(uri: str) -> None:
    """Remove a local directory or every object under an s3:// prefix; nothing there is fine."""
    if is_s3(uri):
        delete_prefix(uri)
    else:
        shutil.rmtree(uri, ignore_errors=True)


def local_copy(uri: str) -> str:
    """A local path holding `uri`'s tree: the directory itself, or an s3:// prefix's cached download."""
    return download_prefix(uri) if is_s3(uri) else uri


def arrow_filesystem(uri: str):
    """(pyarrow filesystem or None, path) for readers that take one (Ray Data, Ray Train storage).

    s3:// gets an S3FileSystem on boto3's endpoint setting (AWS_ENDPOINT_URL), so a loopback server
    in tests and AWS take the same path; local paths need no filesystem object.
    """
    if not is_s3(uri):
        return None, os.path.abspath(uri)
    from pyarrow import fs

    bucket, prefix = split_s3(uri)
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    kwargs = {"endpoint_override": endpoint} if endpoint else {}
    if region:
        kwargs["region"] = region
    return fs.S3FileSystem(**kwargs), f"{bucket}/{prefix}".rstrip("/")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def delete_file(uri: str) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _client().delete_object(Bucket=bucket, Key=key)
    elif os.path.exists(uri):
        os.remove(uri)
