"""The prepare stage on a real local Ray cluster, on real English text shipped with CPython."""

import filecmp
import json
import os

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.adapt.sources import load_tokenizer
from jobs.data.corpus import list_files
from jobs.data.spans import corrupt_batch, span_counts
from jobs.data.stage import run_prepare
from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.errors import UserError

from .conftest import REPO
from .span_reference import reference_corrupt

TINY = os.path.join(REPO, "configs", "tiny.yaml")


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(s3_endpoint):
    """A real local Ray cluster; started after the S3 endpoint so its workers inherit the settings
    (on a real cluster, workers get their S3 settings from their own environment)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def data_cfg(*overrides):
    return load_config(TINY, list(overrides)).data


def read_examples(out):
    metadata = json.load(open(os.path.join(out, "metadata.json")))
    tables = [pq.read_table(os.path.join(out, f["name"])) for f in metadata["files"]]
    return metadata, pa.concat_tables(tables).to_pydict()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prepared") / "data")
    run_prepare(data_cfg(), "builtin:tiny-gemma3", out)
    return out


def test_fast_span_corruption_matches_reference():
    sentinels = np.arange(1000, 1400, dtype=np.int32)
    cases = 0
    for length in (2, 3, 7, 64, 257, 600):
        for rate, mean_span in ((0.15, 3), (0.15, 8), (0.5, 3), (0.5, 8), (0.15, 64), (0.5, 64)):
            index = np.arange(60, dtype=np.uint64) * 13 + length
            tokens = np.random.default_rng(length).integers(0, 900, (60, length)).astype(np.int32)
            inputs, targets = corrupt_batch(tokens, rate, mean_span, sentinels, 11, index)
            for row in range(60):
                expected = reference_corrupt(tokens[row], rate, mean_span, sentinels, 11, int(index[row]))
                assert np.array_equal(inputs[row], expected[0]) and np.array_equal(targets[row], expected[1])
                cases += 1
    assert cases == 6 * 6 * 60


def reconstruct(inputs, labels, sentinel_ids, mode_ids, eos):
    """Interleave a span-corrupted example back into its original segment."""
    body = inputs[1:-1] if inputs[0] in mode_ids else inputs[:-1]
    targets = labels[:-1]
    spans, current = {}, None
    for token in targets:
        if token in sentinel_ids:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    out = []
    for token in body:
        out.extend(spans[token] if token in sentinel_ids else [token])
    return out


def corpus_pieces(documents_per_piece):
    """The shipped corpus tokenized independently of the pipeline: {piece: token stream}."""
    tokenizer = load_tokenizer("builtin:tiny-gemma3")
    path = list_files(data_cfg().corpus[0], "data.corpus[0]")[0]
    documents = [json.loads(line)["text"] for line in open(path)]
    streams = {}
    for piece in range(0, len(documents), documents_per_piece):
        ids = tokenizer(documents[piece:piece + documents_per_piece], add_special_tokens=False, split_special_tokens=True).input_ids
        streams[piece // documents_per_piece] = [t for doc in ids for t in doc + [tokenizer.eos_token_id]]
    return streams


def test_every_example_reconstructs_its_corpus_segment_exactly(prepared):
    metadata, examples = read_examples(prepared)
    sentinel_ids, mode_ids = set(metadata["sentinel_ids"]), set(metadata["mode_tokens"].values())
    streams = corpus_pieces(data_cfg().documents_per_piece)
    table = metadata["denoisers"]
    row = 0
    for file in metadata["files"]:
        stream, offset = streams[file["piece"]], 0
        for _ in range(file["examples"]):
            inputs, labels = examples["input_ids"][row], examples["labels"][row]
            denoiser = table[examples["denoiser"][row]]
            if denoiser["rate"] is not None:
                segment = reconstruct(inputs, labels, sentinel_ids, mode_ids, metadata["eos_id"])
            else:
                segment = inputs[1:-1] + labels[:-1]
            assert len(segment) == denoiser["raw_length"]
            assert segment == stream[offset:offset + len(segment)], (file["name"], row)
            assert examples["decoder_input_ids"][row] == [metadata["bos_id"]] + labels[:-1]
            assert len(inputs) <= metadata["encoder_length"] and len(labels) <= metadata["decoder_length"]
            offset += len(segment)
            row += 1
    assert row == metadata["num_examples"] > 1000
    assert examples["example_index"] == list(range(metadata["num_examples"]))


def test_sentinels_are_reserved_tokens_that_never_come_from_text(prepared):
    metadata, examples = read_examples(prepared)
    tokenizer = load_tokenizer("builtin:tiny-gemma3")
    assert all(t.startswith("<unused") for t in metadata["sentinel_tokens"])
    assert metadata["sentinel_tokens"] == tokenizer.convert_ids_to_tokens(metadata["sentinel_ids"])
    reserved = set(metadata["sentinel_ids"]) | set(metadata["mode_tokens"].values())
    streams = corpus_pieces(data_cfg().documents_per_piece)
    assert not reserved & {t for stream in streams.values() for t in stream}
    # Text that spells a reserved token is split into ordinary pieces, not turned into it.
    spelled = tokenizer(["see <unused3> here"], add_special_tokens=False, split_special_tokens=True).input_ids[0]
    assert tokenizer.convert_tokens_to_ids("<unused3>") not in spelled


def test_adapted_tokenizer_records_the_same_sentinels(prepared, tmp_path):
    out = str(tmp_path / "adapted")
    assert main(["adapt", TINY, "--out", out]) == 0
    recorded = json.load(open(os.path.join(out, "tokenizer_config.json")))["t5adapt_denoising"]
    metadata = json.load(open(os.path.join(prepared, "metadata.json")))
    for key in ("sentinel_ids", "sentinel_tokens", "mode_tokens", "denoisers"):
        assert recorded[key] == metadata[key], key
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).convert_ids_to_tokens(recorded["sentinel_ids"][:2]) == ["<unused3>", "<unused4>"]


def test_noise_density_and_mean_span_match_the_configuration(tmp_path):
    """Measured over many examples of real text at the quickstart lengths (512/256).

    Tolerances: T5's algorithm rounds noise = round(n * rate) and spans = round(noise / mean_span), so
    the measured density may differ from the rate by at most 0.5 / n per example, and the mean span
    length lies within noise / (noise / mean_span +- 0.5). Both bounds come from the algorithm; the
    test measures the output, not the algorithm's formulas.
    """
    out = str(tmp_path / "data")
    metadata = run_prepare(data_cfg("data.encoder_length=512", "data.decoder_length=256", "data.documents_per_piece=40"),
                           "builtin:tiny-gemma3", out)
    _, examples = read_examples(out)
    sentinel_ids = set(metadata["sentinel_ids"])
    for d, denoiser in enumerate(metadata["denoisers"]):
        rows = [i for i, x in enumerate(examples["denoiser"]) if x == d]
        assert len(rows) >= 5, denoiser
        if denoiser["rate"] is None:
            continue
        n = denoiser["raw_length"]
        noise = spans = 0
        for i in rows:
            targets = examples["labels"][i][:-1]
            spans += sum(t in sentinel_ids for t in targets)
            noise += sum(t not in sentinel_ids for t in targets)
        density, mean_span = noise / (n * len(rows)), noise / spans
        assert abs(density - denoiser["rate"]) <= 0.5 / n + 1e-12, denoiser
        per_example_noise = noise / len(rows)
        low = per_example_noise / (per_example_noise / denoiser["mean_span"] + 0.5)
        high = per_example_noise / max(per_example_noise / denoiser["mean_span"] - 0.5, 1)
        assert low - 1e-9 <= mean_span <= high + 1e-9, (denoiser, mean_span)
        assert (noise // len(rows), spans // len(rows)) == span_counts(n, denoiser["rate"], denoiser["mean_span"])
    # 7 equally weighted denoisers: each share is binomial; 4.5 standard deviations is a bound a
    # correct chooser breaks about once in 10^5 runs (and the output is deterministic anyway).
    count = len(examples["denoiser"])
    shares = np.bincount(examples["denoiser"], minlength=7) / count
    assert np.all(np.abs(shares - 1 / 7) < 4.5 * np.sqrt((1 / 7) * (6 / 7) / count))
    assert 0 < metadata["padding_fraction"] < 0.5


def test_denoiser_choice_follows_the_weights():
    from jobs.data.plan import Denoiser, ExamplePlan, choose_denoisers

    denoisers = [Denoiser("R", 3.0, 0.15, None, weight, 10) for weight in (3.0, 1.0, 4.0)]
    plan = ExamplePlan(denoisers, {}, [], 2, 1, 0, 64, 32)
    index = np.arange(200_000, dtype=np.uint64)
    shares = np.bincount(choose_denoisers(plan, 5, index), minlength=3) / len(index)
    assert np.all(np.abs(shares - np.array([3, 1, 4]) / 8) < 0.006)  # ~5 standard deviations at n = 200k
    assert np.array_equal(choose_denoisers(plan, 5, index[7:9]), choose_denoisers(plan, 5, index)[7:9])
    assert not np.array_equal(choose_denoisers(plan, 6, index[:50]), choose_denoisers(plan, 5, index[:50]))


def test_output_is_byte_identical_whatever_the_parallelism(tmp_path):
    # The shipped corpus split over 6 files, so 2 tokenizer actors really run side by side.
    source = list_files(data_cfg().corpus[0], "data.corpus[0]")[0]
    lines = open(source).read().splitlines()
    (tmp_path / "corpus").mkdir()
    for part in range(6):
        (tmp_path / "corpus" / f"part-{part}.jsonl").write_text("\n".join(lines[part::6]) + "\n")
    corpus = f"data.corpus=[{{path: '{tmp_path / 'corpus'}'}}]"
    outputs = []
    for workers in (1, 2):
        outputs.append(str(tmp_path / f"workers-{workers}"))
        run_prepare(data_cfg(corpus, f"data.num_tokenizer_workers={workers}"), "builtin:tiny-gemma3", outputs[-1])
    names = sorted(f for f in os.listdir(outputs[0]) if f.endswith(".parquet"))
    assert len(names) >= 6 and names == sorted(f for f in os.listdir(outputs[1]) if f.endswith(".parquet"))
    _, mismatch, errors = filecmp.cmpfiles(outputs[0], outputs[1], names, shallow=False)
    assert not mismatch and not errors
    # metadata.json records the config (worker count included); everything else in it must agree.
    first, second = (json.load(open(os.path.join(o, "metadata.json"))) for o in outputs)
    for metadata in (first, second):
        del metadata["config"], metadata["config_hash"]
    assert first == second


def test_bad_rows_are_skipped_and_counted_exactly(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = "A sentence of ordinary English text that is long enough to tokenize into several pieces."
    lines = [json.dumps({"text": good})] * 30 + ['{"text": "unterminated', json.dumps({"body": good}),
                                                  json.dumps({"text": 42}), json.dumps({"text": "   "}), "",
                                                  json.dumps(["not", "an", "object"])]
    with open(corpus / "a.jsonl", "wb") as f:
        f.write("\n".join(lines).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with open(corpus / "b.txt", "wb") as f:
        f.write((good + "\n").encode() * 20 + b"\xff\xfe broken\n\n" + (good + "\n").encode() * 5)
    pq.write_table(pa.table({"text": [good] * 25 + [None, "", None]}), corpus / "c.parquet")
    out = str(tmp_path / "out")
    metadata = run_prepare(data_cfg(f"data.corpus=[{{path: '{corpus}', text_field: text}}]"), "builtin:tiny-gemma3", out)
    by_file = {os.path.basename(k): v for k, v in metadata["bad_rows"]["by_file"].items()}
    assert by_file["a.jsonl"] == {"malformed_json": 1, "missing_field": 2, "not_text": 1, "empty_text": 2, "invalid_utf8": 1}
    assert by_file["b.txt"] == {"invalid_utf8": 1}
    assert by_file["c.parquet"] == {"missing_field": 2, "empty_text": 1}
    assert metadata["bad_rows"]["total"] == 11
    assert metadata["bad_rows"]["by_reason"] == {"invalid_utf8": 2, "malformed_json": 1, "missing_field": 4,
                                                 "not_text": 1, "empty_text": 3}
    assert metadata["sources"][0]["documents"] == 30 + 25 + 25


def test_committed_output_is_reused_uncommitted_redone(prepared, tmp_path):
    stamp = os.path.getmtime(os.path.join(prepared, "metadata.json"))
    assert run_prepare(data_cfg(), "builtin:tiny-gemma3", prepared)["num_examples"] > 0
    assert os.path.getmtime(os.path.join(prepared, "metadata.json")) == stamp  # reused
    with pytest.raises(UserError, match=r"holds finished output made from another config.*--force"):
        run_prepare(data_cfg("data.seed=1"), "builtin:tiny-gemma3", prepared)
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    (interrupted / "part-000000.parquet").write_bytes(b"half a file")
    metadata = run_prepare(data_cfg(), "builtin:tiny-gemma3", str(interrupted))
    assert (interrupted / "COMMITTED").is_file()
    assert pq.read_table(interrupted / "part-000000.parquet").num_rows == metadata["files"][0]["examples"]


def test_unreadable_file_and_missing_column_are_named(tmp_path):
    (tmp_path / "c").mkdir()
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "c" / "c.parquet")
    with pytest.raises(UserError, match=r"cannot read corpus file .*c\.parquet: ValueError: has no column 'text'"):
        run_prepare(data_cfg(f"data.corpus=[{{path: '{tmp_path / 'c'}'}}]"), "builtin:tiny-gemma3", str(tmp_path / "o1"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "broken.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(UserError, match=r"cannot read corpus file .*broken\.parquet"):
        run_prepare(data_cfg(f"data.corpus=[{{path: '{tmp_path / 'd'}'}}]"), "builtin:tiny-gemma3", str(tmp_path / "o2"))
    with pytest.raises(UserError, match=r"data\.corpus\[0\]\.path=/no/such/\*\.jsonl matches no files"):
        run_prepare(data_cfg("data.corpus=[{path: '/no/such/*.jsonl'}]"), "builtin:tiny-gemma3", str(tmp_path / "o3"))
    assert not os.path.exists(tmp_path / "o1") and not os.path.exists(tmp_path / "o2")


def test_mixture_weights_and_prefix_lm(tmp_path):
    corpus = tmp_path / "small.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"Short document number {i} about assignment statements."}) for i in range(40)))
    out = str(tmp_path / "mix")
    metadata = run_prepare(data_cfg("data.objective=prefix_lm", "data.mode_tokens=false",
                                    f"data.corpus=[{{path: 'builtin:python-docs', weight: 1}}, {{path: '{corpus}', weight: 1}}]"),
                           "builtin:tiny-gemma3", out)
    big, small = metadata["sources"]
    assert small["passes"] > 1  # the small source is cycled to reach its half of the tokens
    assert abs(small["examples"] / big["examples"] - 1) < 0.25
    _, examples = read_examples(out)
    (denoiser,) = metadata["denoisers"]
    assert denoiser["name"] == "S" and denoiser["prefix_split"] == 0.5 and metadata["mode_tokens"] == {}
    split = round(denoiser["raw_length"] * 0.5)
    assert {len(x) for x in examples["input_ids"]} == {split + 1}
    assert {len(y) for y in examples["labels"]} == {denoiser["raw_length"] - split + 1}


def test_s3_corpus_and_cli(s3_endpoint, tmp_path, capsys):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="corpus")
    for i in range(3):
        body = "\n".join(json.dumps({"text": f"Document {i}.{j}: names are bound to objects by assignment."}) for j in range(30))
        s3.put_object(Bucket="corpus", Key=f"web/part-{i}.jsonl", Body=body.encode() + b'\n{"text": broken\n')
    out, root = str(tmp_path / "s3data"), str(tmp_path / "root")
    assert main(["prepare", TINY, "--corpus", "s3://corpus/web", "--out", out, "--root", root]) == 0
    assert "prepared" in capsys.readouterr().out
    metadata = json.load(open(os.path.join(out, "metadata.json")))
    assert metadata["sources"][0]["files"] == 3 and metadata["sources"][0]["documents"] == 90
    assert metadata["bad_rows"]["by_reason"]["malformed_json"] == 3
    # Workers fetch their own objects: counts are keyed by the object's URI.
    assert metadata["bad_rows"]["by_file"] == {f"s3://corpus/web/part-{i}.jsonl": {"malformed_json": 1} for i in range(3)}

    # Tracked in MLflow (the default store: SQLite in the run root), counts as metrics, metadata as artifact.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("t5adapt").experiment_id])
    assert run.info.run_name == "tiny/prepare" and run.info.status == "FINISHED"
    assert run.data.metrics["bad_rows.malformed_json"] == 3 and run.data.metrics["num_examples"] == metadata["num_examples"]
    assert run.data.params["data.encoder_length"] == "64"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["metadata.json"]
    assert run.info.artifact_uri.startswith(f"file://{root}/mlartifacts")

    assert main(["prepare", TINY, "--corpus", "s3://corpus/web", "--out", out, "tracking.enabled=false"]) == 0  # reused

    # An s3:// output: workers upload their own files, the marker goes last, and a rerun reuses it.
    assert main(["prepare", TINY, "--corpus", "s3://corpus/web", "--out", "s3://corpus/prepared/tiny",
                 "tracking.enabled=false"]) == 0
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="corpus", Prefix="prepared/tiny/")["Contents"]}
    parts = sorted(f for f in os.listdir(out) if f.endswith(".parquet"))
    assert keys == {f"prepared/tiny/{name}" for name in parts + ["metadata.json", "COMMITTED"]}
    body = s3.get_object(Bucket="corpus", Key=f"prepared/tiny/{parts[0]}")["Body"].read()
    assert body == open(os.path.join(out, parts[0]), "rb").read()  # same bytes as the local output
    s3.delete_object(Bucket="corpus", Key="prepared/tiny/COMMITTED")  # an interrupted run: redone
    assert main(["prepare", TINY, "--corpus", "s3://corpus/web", "--out", "s3://corpus/prepared/tiny",
                 "tracking.enabled=false"]) == 0
    assert s3.head_object(Bucket="corpus", Key="prepared/tiny/COMMITTED")
    assert main(["prepare", TINY, "--corpus", "s3://corpus/nothing-here", "--out", str(tmp_path / "x")]) == 2
