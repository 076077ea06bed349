"""The prepare stage on a real local Ray cluster, on real English text shipped with CPython."""

import filecmp
import json
import os
import re

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.core.sources import load_tokenizer
from jobs.data.corpus import list_files
from jobs.data.spans import corrupt_batch, span_counts
from jobs.core.errors import UserError
from jobs.data.corpus import heldout_draws
from jobs.data.stage import run_prepare
from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.keys import prepare_key

from .conftest import REPO
from .span_reference import reference_corrupt

TINY = os.path.join(REPO, "configs", "tiny.yaml")
TOKENIZER = "builtin:tiny-gemma3"


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


def prepare(cfg, out, force=False):
    """run_prepare as the controller calls it: with the stage key of this config and corpus."""
    return run_prepare(cfg, TOKENIZER, out, prepare_key(cfg, TOKENIZER), force)


def read_examples(out):
    metadata = json.load(open(os.path.join(out, "metadata.json")))
    tables = [pq.read_table(os.path.join(out, f["name"])) for f in metadata["files"]]
    return metadata, pa.concat_tables(tables).to_pydict()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prepared") / "data")
    prepare(data_cfg(), out)
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


def corpus_documents(cfg):
    """The shipped corpus tokenized independently of the pipeline: each document's ids + EOS, and
    whether it is held out (its draw, a function of seed and place in the corpus, below the fraction)."""
    tokenizer = load_tokenizer(TOKENIZER)
    path = list_files(cfg.corpus[0], "data.corpus[0]")[0]
    documents = [json.loads(line)["text"] for line in open(path)]
    ids = tokenizer(documents, add_special_tokens=False, split_special_tokens=True).input_ids
    draws = heldout_draws(cfg.seed, 0, 0, np.arange(len(ids), dtype=np.uint64))
    return [doc + [tokenizer.eos_token_id] for doc in ids], draws, draws < cfg.heldout_fraction


def corpus_pieces(cfg):
    """{piece: token stream} of the training documents (the held-out ones left out), packed as pieces."""
    documents, _, heldout = corpus_documents(cfg)
    training = [doc for doc, out in zip(documents, heldout) if not out]
    size = cfg.documents_per_piece
    return {start // size: [t for doc in training[start:start + size] for t in doc] for start in range(0, len(training), size)}


def assert_examples_reconstruct(metadata, examples, row, count, stream):
    """Examples row .. row + count - 1 are consecutive segments of `stream` from its start, each
    rebuilt exactly from its inputs and labels; returns the next row."""
    sentinel_ids, mode_ids = set(metadata["sentinel_ids"]), set(metadata["mode_tokens"].values())
    offset = 0
    for _ in range(count):
        inputs, labels = examples["input_ids"][row], examples["labels"][row]
        denoiser = metadata["denoisers"][examples["denoiser"][row]]
        if denoiser["rate"] is not None:
            segment = reconstruct(inputs, labels, sentinel_ids, mode_ids, metadata["eos_id"])
        else:
            segment = (inputs[1:-1] if inputs[0] in mode_ids else inputs[:-1]) + labels[:-1]
        assert len(segment) == denoiser["raw_length"]
        assert segment == stream[offset:offset + len(segment)], row
        assert examples["decoder_input_ids"][row] == [metadata["bos_id"]] + labels[:-1]
        assert len(inputs) <= metadata["encoder_length"] and len(labels) <= metadata["decoder_length"]
        offset += len(segment)
        row += 1
    return row


def test_every_example_reconstructs_its_corpus_segment_exactly(prepared):
    metadata, examples = read_examples(prepared)
    streams = corpus_pieces(data_cfg())
    row = 0
    for file in metadata["files"]:
        row = assert_examples_reconstruct(metadata, examples, row, file["examples"], streams[file["piece"]])
    assert row == metadata["num_examples"] > 1000
    assert examples["example_index"] == list(range(metadata["num_examples"]))


def test_heldout_documents_are_never_trained_on_and_make_their_own_examples(prepared):
    """The training pieces above hold exactly the documents not held out; here the held-out ones
    are checked against a plain reference of the rule: draw-ordered, cut at the token budget."""
    cfg = data_cfg()
    metadata, _ = read_examples(prepared)
    documents, draws, heldout = corpus_documents(cfg)
    chosen = sorted(np.flatnonzero(heldout), key=lambda i: (draws[i], i))
    kept, total = [], 0
    for i in chosen:
        if total + len(documents[i]) > cfg.heldout_max_tokens:
            break
        kept.append(i)
        total += len(documents[i])
    kept.sort()
    info, (source,) = metadata["heldout"], metadata["sources"]
    assert info["files"] == ["heldout/examples.parquet", "heldout/documents.parquet"]
    assert source["heldout_documents"] == heldout.sum() and source["documents"] == len(documents) - heldout.sum()
    # 4.5 standard deviations of a binomial share: the draws are uniform and independent.
    assert abs(heldout.mean() - 0.05) < 4.5 * np.sqrt(0.05 * 0.95 / len(documents))
    assert (info["documents"], info["tokens"], info["documents_over_budget"]) == (len(kept), total, heldout.sum() - len(kept))
    held = pq.read_table(os.path.join(prepared, "heldout", "documents.parquet"))
    assert held.schema == pa.schema([("tokens", pa.list_(pa.int32())), ("source", pa.int32())])
    assert held.column("tokens").to_pylist() == [documents[i] for i in kept] and set(held.column("source").to_pylist()) == {0}
    # Its examples: the same columns and construction as training examples, indices from 0.
    table = pq.read_table(os.path.join(prepared, "heldout", "examples.parquet"))
    assert table.schema == pq.read_schema(os.path.join(prepared, metadata["files"][0]["name"]))
    examples = table.to_pydict()
    assert info["examples"] == len(examples["example_index"]) > 20
    assert examples["example_index"] == list(range(info["examples"]))
    stream = [t for i in kept for t in documents[i]]
    assert assert_examples_reconstruct(metadata, examples, 0, info["examples"], stream) == info["examples"]
    assert info["examples_per_denoiser"] == np.bincount(examples["denoiser"], minlength=len(metadata["denoisers"])).tolist()


def test_sentinels_are_reserved_tokens_that_never_come_from_text(prepared):
    metadata, examples = read_examples(prepared)
    tokenizer = load_tokenizer("builtin:tiny-gemma3")
    assert all(t.startswith("<unused") for t in metadata["sentinel_tokens"])
    assert metadata["sentinel_tokens"] == tokenizer.convert_ids_to_tokens(metadata["sentinel_ids"])
    reserved = set(metadata["sentinel_ids"]) | set(metadata["mode_tokens"].values())
    streams = corpus_pieces(data_cfg())
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
    metadata = prepare(data_cfg("data.encoder_length=512", "data.decoder_length=256", "data.documents_per_piece=40"), out)
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
    # Enough held out, under a tight budget, that the held-out set is cut across files by draw order.
    config = [f"data.corpus=[{{path: '{tmp_path / 'corpus'}'}}]", "data.heldout_fraction=0.3", "data.heldout_max_tokens=10000"]
    outputs = []
    for workers in (1, 2):
        outputs.append(str(tmp_path / f"workers-{workers}"))
        prepare(data_cfg(*config, f"data.num_tokenizer_workers={workers}"), outputs[-1])
    names = sorted(f for f in os.listdir(outputs[0]) if f.endswith(".parquet"))
    assert len(names) >= 6 and names == sorted(f for f in os.listdir(outputs[1]) if f.endswith(".parquet"))
    names += ["heldout/examples.parquet", "heldout/documents.parquet"]
    _, mismatch, errors = filecmp.cmpfiles(outputs[0], outputs[1], names, shallow=False)
    assert not mismatch and not errors
    # metadata.json records the config (worker count included); everything else in it must agree.
    first, second = (json.load(open(os.path.join(o, "metadata.json"))) for o in outputs)
    for metadata in (first, second):
        del metadata["config"], metadata["config_hash"]
    assert first == second
    heldout = first["heldout"]
    assert heldout["documents"] >= 3 and heldout["documents_over_budget"] >= 3 and heldout["tokens"] <= 10000


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
    metadata = prepare(data_cfg(f"data.corpus=[{{path: '{corpus}', text_field: text}}]"), out)
    by_file = {os.path.basename(k): v for k, v in metadata["bad_rows"]["by_file"].items()}
    assert by_file["a.jsonl"] == {"malformed_json": 1, "missing_field": 2, "not_text": 1, "empty_text": 2, "invalid_utf8": 1}
    assert by_file["b.txt"] == {"invalid_utf8": 1}
    assert by_file["c.parquet"] == {"missing_field": 2, "empty_text": 1}
    assert metadata["bad_rows"]["total"] == 11
    assert metadata["bad_rows"]["by_reason"] == {"invalid_utf8": 2, "malformed_json": 1, "missing_field": 4,
                                                 "not_text": 1, "empty_text": 3}
    # Every good row is a document, trained on or held out.
    assert metadata["sources"][0]["documents"] + metadata["sources"][0]["heldout_documents"] == 30 + 25 + 25


def test_committed_output_is_reused_uncommitted_redone(prepared, tmp_path):
    stamp = os.path.getmtime(os.path.join(prepared, "metadata.json"))
    assert prepare(data_cfg(), prepared)["num_examples"] > 0
    assert os.path.getmtime(os.path.join(prepared, "metadata.json")) == stamp  # reused
    with pytest.raises(UserError, match=r"holds finished output made from another config.*--force"):
        prepare(data_cfg("data.seed=1"), prepared)
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    (interrupted / "part-000000.parquet").write_bytes(b"half a file")
    metadata = prepare(data_cfg(), str(interrupted))
    assert (interrupted / "COMMITTED").is_file()
    assert pq.read_table(interrupted / "part-000000.parquet").num_rows == metadata["files"][0]["examples"]


def test_unreadable_file_and_missing_column_are_named(tmp_path):
    (tmp_path / "c").mkdir()
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "c" / "c.parquet")
    with pytest.raises(UserError, match=r"cannot read corpus file .*c\.parquet: ValueError: has no column 'text'"):
        prepare(data_cfg(f"data.corpus=[{{path: '{tmp_path / 'c'}'}}]"), str(tmp_path / "o1"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "broken.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(UserError, match=r"cannot read corpus file .*broken\.parquet"):
        prepare(data_cfg(f"data.corpus=[{{path: '{tmp_path / 'd'}'}}]"), str(tmp_path / "o2"))
    with pytest.raises(UserError, match=r"data\.corpus\[0\]\.path=/no/such/\*\.jsonl matches no files"):
        prepare(data_cfg("data.corpus=[{path: '/no/such/*.jsonl'}]"), str(tmp_path / "o3"))
    assert not os.path.exists(tmp_path / "o1") and not os.path.exists(tmp_path / "o2")


def test_compressed_corpora_read_exactly_like_uncompressed_ones(tmp_path):
    import gzip

    texts = [f"Document {i}: a name is bound to an object by assignment, and rebinding it leaves the object as it was."
             for i in range(40)]
    jsonl = ("\n".join(json.dumps({"text": t}) for t in texts) + "\n").encode()
    lines = ("\n".join(texts) + "\n").encode()
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir()
    packed.mkdir()
    (plain / "a.jsonl").write_bytes(jsonl)
    (plain / "b.txt").write_bytes(lines)
    pq.write_table(pa.table({"text": texts}), plain / "c.parquet")
    (plain / "d.ndjson").write_bytes(jsonl)
    (packed / "a.jsonl.gz").write_bytes(gzip.compress(jsonl))
    with pa.output_stream(str(packed / "b.txt.zst"), compression="zstd") as f:
        f.write(lines)
    (packed / "c.parquet.gz").write_bytes(gzip.compress((plain / "c.parquet").read_bytes()))
    with pa.output_stream(str(packed / "d.ndjson.zstd"), compression="zstd") as f:
        f.write(jsonl)
    outputs = [str(tmp_path / "out-plain"), str(tmp_path / "out-packed")]
    for corpus, out in zip((plain, packed), outputs):
        metadata = prepare(data_cfg(f"data.corpus=[{{path: '{corpus}'}}]", "data.heldout_fraction=0.2"), out)
        assert metadata["bad_rows"]["total"] == 0  # a .gz read as bytes would be all invalid_utf8
        source = metadata["sources"][0]
        assert source["documents"] + source["heldout_documents"] == 4 * 40 and metadata["heldout"]["documents"] > 0
    names = sorted(f for f in os.listdir(outputs[0]) if f.endswith(".parquet")) + [
        "heldout/examples.parquet", "heldout/documents.parquet"]
    _, mismatch, errors = filecmp.cmpfiles(*outputs, names, shallow=False)
    assert len(names) >= 6 and not mismatch and not errors


@pytest.mark.parametrize("name, body", [
    ("truncated.jsonl.gz", b"half"),
    ("not-gzip.txt.gz", b"plain bytes, never compressed"),
    ("not-zstd.jsonl.zst", b"plain bytes, never compressed"),
])
def test_corrupt_compressed_file_is_fatal_naming_it(tmp_path, name, body):
    import gzip

    if name.startswith("truncated"):
        whole = gzip.compress("\n".join(json.dumps({"text": f"row {i} " * 20}) for i in range(2000)).encode())
        body = whole[:len(whole) // 2]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / name).write_bytes(body)
    fatal = rf"cannot read corpus file .*{re.escape(name)}: OSError: cannot decompress it as (gzip|zstd)"
    with pytest.raises(UserError, match=fatal):
        prepare(data_cfg(f"data.corpus=[{{path: '{tmp_path / 'c'}'}}]"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def _binary(size):
    """Bytes that are never UTF-8 (all >= 0x80), in lines."""
    rows = np.random.default_rng(0).integers(0x80, 0x100, size, dtype=np.uint8)
    rows[49::50] = ord("\n")
    return rows.tobytes()


@pytest.mark.parametrize("name, body, message", [
    ("empty.jsonl", b"", r"data\.corpus\[0\] \(.*\) holds no rows at all in 1 file\(s\) \(.*empty\.jsonl\)"),
    ("binary.jsonl", _binary(5000), r"all 100 rows of its 1 file\(s\) \(.*binary\.jsonl\) are bad \(invalid_utf8 100\); "
                                    r"the bytes are not UTF-8 text .*format \(now auto, read as jsonl\)"),
    ("prose.jsonl", b"Plain prose, not JSON.\nMore of it.\n", r"\(malformed_json 2\); the lines are not JSON: plain text needs "
                                                                 r"format: text\. Check data\.corpus\[0\]\.text_field"),
    ("numbers.jsonl", b'{"text": 1}\n{"text": 2.5}\n{"body": "x"}\n',
     r"\(not_text 2, missing_field 1\); the field 'text' holds numbers or other non-text values: set text_field"),
    ("ints.parquet", None, r"all 3 rows .*ints\.parquet\) are bad \(not_text 3\); .*read as parquet"),
])
def test_a_corpus_without_usable_rows_fails_naming_files_reasons_and_fix(tmp_path, name, body, message):
    (tmp_path / "c").mkdir()
    if body is None:
        pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "c" / name)
    else:
        (tmp_path / "c" / name).write_bytes(body)
    with pytest.raises(UserError, match=message):
        prepare(data_cfg(f"data.corpus=[{{path: '{tmp_path / 'c'}'}}]"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_one_unusable_source_among_good_ones_is_named(tmp_path):
    (tmp_path / "wrong-field.jsonl").write_text("\n".join(json.dumps({"body": f"text {i}"}) for i in range(7)))
    with pytest.raises(UserError, match=r"data\.corpus\[1\] \(.*wrong-field\.jsonl\) yields no usable document: all 7 rows"
                                        r".*\(missing_field 7\); the rows have no field 'text': set text_field"):
        prepare(data_cfg(f"data.corpus=[{{path: 'builtin:python-docs'}}, {{path: '{tmp_path / 'wrong-field.jsonl'}'}}]"),
                str(tmp_path / "out"))


def test_too_little_text_for_one_example_names_the_lengths(tmp_path):
    (tmp_path / "short.jsonl").write_text("\n".join(json.dumps({"text": f"Short {i}."}) for i in range(5)))
    corpus = f"data.corpus=[{{path: '{tmp_path / 'short.jsonl'}'}}]"
    with pytest.raises(UserError, match=r"data\.corpus\[0\] \(.*short\.jsonl\) yields no example: its 5 training documents "
                                        r"hold \d+ tokens, its longest piece \d+, but one example consumes \d+ to \d+ tokens at "
                                        r"data\.encoder_length=64 and data\.decoder_length=32: add text, raise "
                                        r"data\.documents_per_piece, or lower"):
        prepare(data_cfg(corpus, "data.heldout_fraction=0"), str(tmp_path / "out"))
    # One document, held out by this seed: nothing is left to train on.
    seed = next(s for s in range(100) if heldout_draws(s, 0, 0, np.array([0], dtype=np.uint64))[0] < 0.5)
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "The only document. " * 40}))
    with pytest.raises(UserError, match=r"has 1 usable documents, all held out of training by data\.heldout_fraction=0\.5"):
        prepare(data_cfg(f"data.corpus=[{{path: '{tmp_path / 'one.jsonl'}'}}]", "data.heldout_fraction=0.5",
                         f"data.seed={seed}"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_mixture_weights_and_prefix_lm(tmp_path):
    corpus = tmp_path / "small.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"Short document number {i} about assignment statements."}) for i in range(40)))
    out = str(tmp_path / "mix")
    metadata = prepare(data_cfg("data.objective=prefix_lm", "data.mode_tokens=false",
                                f"data.corpus=[{{path: 'builtin:python-docs', weight: 1}}, {{path: '{corpus}', weight: 1}}]"),
                       out)
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
    source = metadata["sources"][0]
    assert source["files"] == 3 and source["documents"] + source["heldout_documents"] == 90
    assert metadata["bad_rows"]["by_reason"]["malformed_json"] == 3
    # Workers fetch their own objects: counts are keyed by the object's URI.
    assert metadata["bad_rows"]["by_file"] == {f"s3://corpus/web/part-{i}.jsonl": {"malformed_json": 1} for i in range(3)}

    # Tracked in MLflow (the default store: SQLite in the run root): the prepare stage's run carries
    # tracking_record's counts as metrics and the data config as params.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("t5adapt").experiment_id])
    (run,) = [r for r in runs if r.info.run_name == "tiny/prepare"]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["bad_rows.malformed_json"] == 3 and run.data.metrics["num_examples"] == metadata["num_examples"]
    assert run.data.metrics["heldout.documents"] == metadata["heldout"]["documents"]
    assert run.data.params["data.encoder_length"] == "64"

    assert main(["prepare", TINY, "--corpus", "s3://corpus/web", "--out", out, "tracking.enabled=false"]) == 0  # reused

    # An s3:// output: workers upload their own files, the marker goes last, and a rerun reuses it.
    assert main(["prepare", TINY, "--corpus", "s3://corpus/web", "--out", "s3://corpus/prepared/tiny",
                 "tracking.enabled=false"]) == 0
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="corpus", Prefix="prepared/tiny/")["Contents"]}
    parts = sorted(f for f in os.listdir(out) if f.endswith(".parquet"))
    heldout = ["heldout/examples.parquet", "heldout/documents.parquet"]
    assert keys == {f"prepared/tiny/{name}" for name in parts + heldout + ["metadata.json", "COMMITTED"]}
    body = s3.get_object(Bucket="corpus", Key=f"prepared/tiny/{parts[0]}")["Body"].read()
    assert body == open(os.path.join(out, parts[0]), "rb").read()  # same bytes as the local output
    s3.delete_object(Bucket="corpus", Key="prepared/tiny/COMMITTED")  # an interrupted run: redone
    assert main(["prepare", TINY, "--corpus", "s3://corpus/web", "--out", "s3://corpus/prepared/tiny",
                 "tracking.enabled=false"]) == 0
    assert s3.head_object(Bucket="corpus", Key="prepared/tiny/COMMITTED")
    assert main(["prepare", TINY, "--corpus", "s3://corpus/nothing-here", "--out", str(tmp_path / "x")]) == 2
