"""The held-out split of prepare, on a small corpus where every document can be counted.

Two sources, three files (JSON Lines with bad rows, gzipped plain text, Parquet with nulls), each
document unique. A plain reference tokenizes the good documents and applies the rule (a document
is held out iff its draw, a function of seed, source, file and document index, is below the
fraction; the kept ones are a draw-order prefix within the token budget); the pipeline's output
must match it exactly.
"""

import filecmp
import gzip
import json
import os

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.core.sources import load_tokenizer
from jobs.data.corpus import heldout_draws, hold_out
from jobs.data.stage import run_prepare
from orchestrator.config import load_config
from orchestrator.keys import prepare_key

from .conftest import REPO

TINY = os.path.join(REPO, "configs", "tiny.yaml")
TOKENIZER = "builtin:tiny-gemma3"
WORDS = "names objects bind assignment scope module class value list tuple loop branch".split()


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(s3_endpoint):
    """A real local Ray cluster, started after the S3 endpoint so its workers inherit the settings."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def document(source, file_index, n):
    rng = np.random.default_rng([source, file_index, n])
    return f"Record {source}.{file_index}.{n}: " + " ".join(rng.choice(WORDS, int(rng.integers(8, 30))))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """{(source, file index): good documents in order}, and the data.corpus override naming the files."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "s0").mkdir()
    good = {(0, 0): [document(0, 0, n) for n in range(50)], (0, 1): [document(0, 1, n) for n in range(40)],
            (1, 0): [document(1, 0, n) for n in range(30)]}
    lines = [json.dumps({"text": text}) for text in good[0, 0]]
    for at, bad in ((5, '{"text": broken'), (20, json.dumps({"body": "no text field"})), (33, json.dumps({"text": 7}))):
        lines.insert(at, bad)  # bad rows do not count as documents: indices are over good documents
    (root / "s0" / "a.jsonl").write_text("\n".join(lines) + "\n")
    (root / "s0" / "b.txt.gz").write_bytes(gzip.compress(("\n\n".join(good[0, 1]) + "\n").encode()))
    pq.write_table(pa.table({"text": good[1, 0][:10] + [None] + good[1, 0][10:] + [None]}), root / "c.parquet")
    override = f"data.corpus=[{{path: '{root / 's0'}'}}, {{path: '{root / 'c.parquet'}'}}]"
    return good, override


def data_cfg(*overrides):
    return load_config(TINY, ["data.objective=prefix_lm", "data.mode_tokens=false", *overrides]).data


def prepare(cfg, out):
    return run_prepare(cfg, TOKENIZER, out, prepare_key(cfg, TOKENIZER))


def reference(good, cfg):
    """(training token ids per file, held-out documents kept: (source, file, n, ids), all held out)."""
    tokenizer = load_tokenizer(TOKENIZER)
    training, candidates = {}, []
    for (source, file_index), texts in good.items():
        ids = [doc + [tokenizer.eos_token_id] for doc in
               tokenizer(texts, add_special_tokens=False, split_special_tokens=True).input_ids]
        draws = heldout_draws(cfg.seed, source, file_index, np.arange(len(ids), dtype=np.uint64))
        training[source, file_index] = [doc for doc, draw in zip(ids, draws) if draw >= cfg.heldout_fraction]
        candidates += [(draw, source, file_index, n, doc) for n, (doc, draw) in enumerate(zip(ids, draws))
                       if draw < cfg.heldout_fraction]
    kept, total = [], 0
    for _, source, file_index, n, doc in sorted(candidates, key=lambda c: c[:4]):
        if total + len(doc) > cfg.heldout_max_tokens:
            break
        kept.append((source, file_index, n, doc))
        total += len(doc)
    return training, sorted(kept, key=lambda c: c[:3]), candidates


def segments(examples):
    """PrefixLM without mode tokens: each example's corpus segment is its inputs and labels, EOS dropped."""
    return [x[:-1] + y[:-1] for x, y in zip(examples["input_ids"], examples["labels"])]


def read(out, name):
    return pq.read_table(os.path.join(out, name)).to_pydict()


def test_training_examples_and_heldout_documents_partition_the_good_documents(corpus, tmp_path):
    good, override = corpus
    cfg = data_cfg(override, "data.heldout_fraction=0.3", "data.documents_per_piece=3")
    training, _, candidates = reference(good, cfg)
    budget = sum(len(c[4]) for c in candidates) // 2  # so that the budget really cuts
    cfg = data_cfg(override, "data.heldout_fraction=0.3", "data.documents_per_piece=3", f"data.heldout_max_tokens={budget}")
    training, kept, candidates = reference(good, cfg)
    out = str(tmp_path / "out")
    metadata = prepare(cfg, out)

    # Counts: every good document is either trained on or held out, never both.
    for source in (0, 1):
        held = sum(1 for c in candidates if c[1] == source)
        trained = sum(len(docs) for (s, _), docs in training.items() if s == source)
        assert metadata["sources"][source]["heldout_documents"] == held > 0
        assert metadata["sources"][source]["documents"] == trained
        assert held + trained == sum(len(texts) for (s, _), texts in good.items() if s == source)
    heldout = metadata["heldout"]
    assert (heldout["documents"], heldout["documents_over_budget"]) == (len(kept), len(candidates) - len(kept))
    assert 0 < len(kept) < len(candidates) and heldout["tokens"] == sum(len(c[3]) for c in kept) <= budget

    # Training examples are consecutive segments of their piece, packed from training documents only.
    paths = {(0, 0): "a.jsonl", (0, 1): "b.txt.gz", (1, 0): "c.parquet"}
    row, all_segments = 0, []
    for file in metadata["files"]:
        (key,) = [k for k, name in paths.items() if file["corpus_file"].endswith(name)]
        piece = training[key][file["piece"] * 3:file["piece"] * 3 + 3]
        stream = [t for doc in piece for t in doc]
        offset = 0
        for segment in segments(read(out, file["name"])):
            assert segment == stream[offset:offset + len(segment)], (file["name"], row)
            offset += len(segment)
            row += 1
            all_segments.append(segment)
    assert row == metadata["num_examples"] > 20

    # Held-out documents: exactly the reference's, in corpus order, each followed by EOS.
    documents = read(out, "heldout/documents.parquet")
    assert documents["tokens"] == [c[3] for c in kept] and documents["source"] == [c[0] for c in kept]
    # Held-out examples: built from those documents packed like a piece, indices from 0.
    examples = read(out, "heldout/examples.parquet")
    assert list(examples) == ["example_index", "input_ids", "decoder_input_ids", "labels", "denoiser"]
    assert examples["example_index"] == list(range(heldout["examples"])) and heldout["examples"] > 3
    stream, offset = [t for c in kept for t in c[3]], 0
    for segment in segments(examples):
        assert segment == stream[offset:offset + len(segment)]
        offset += len(segment)
    assert heldout["examples_per_denoiser"] == [heldout["examples"]]
    # Lineage aside: no training segment holds the opening of a held-out document (openings are cut
    # just long enough to tell every document apart: each starts with its own record number).
    every = [doc for docs in training.values() for doc in docs] + [c[4] for c in candidates]
    length = next(n for n in range(1, 100) if len({tuple(doc[:n]) for doc in every}) == len(every))
    windows = {tuple(s[i:i + length]) for s in all_segments for i in range(len(s) - length + 1)}
    assert windows & {tuple(doc[:length]) for doc in every[:5]}  # the check can see training documents
    assert not windows & {tuple(c[4][:length]) for c in candidates}


def test_heldout_output_is_the_same_whatever_the_pieces_and_workers(corpus, tmp_path):
    good, override = corpus
    outputs = []
    for pieces, workers in ((3, 1), (1000, 2)):
        outputs.append(str(tmp_path / f"out-{pieces}-{workers}"))
        metadata = prepare(data_cfg(override, "data.heldout_fraction=0.3", "data.heldout_max_tokens=600",
                                    f"data.documents_per_piece={pieces}", f"data.num_tokenizer_workers={workers}"),
                           outputs[-1])
        assert metadata["heldout"]["documents_over_budget"] > 0
    names = ["heldout/examples.parquet", "heldout/documents.parquet"]
    _, mismatch, errors = filecmp.cmpfiles(*outputs, names, shallow=False)
    assert not mismatch and not errors
    first, second = (json.load(open(os.path.join(o, "metadata.json"))) for o in outputs)
    assert first["heldout"] == second["heldout"]
    assert [s["heldout_documents"] for s in first["sources"]] == [s["heldout_documents"] for s in second["sources"]]


def test_fraction_zero_holds_nothing_out(corpus, tmp_path):
    good, override = corpus
    out = str(tmp_path / "out")
    metadata = prepare(data_cfg(override, "data.heldout_fraction=0"), out)
    assert metadata["heldout"]["files"] == [] and metadata["heldout"]["documents"] == 0
    assert [s["documents"] for s in metadata["sources"]] == [90, 30]
    assert [s["heldout_documents"] for s in metadata["sources"]] == [0, 0]
    assert not os.path.exists(os.path.join(out, "heldout"))


def test_s3_output_uploads_the_heldout_files(corpus, tmp_path):
    good, override = corpus
    cfg = data_cfg(override, "data.heldout_fraction=0.3")
    local = str(tmp_path / "local")
    prepare(cfg, local)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="heldout")
    metadata = prepare(cfg, "s3://heldout/prepared")
    assert metadata["heldout"]["files"] == ["heldout/examples.parquet", "heldout/documents.parquet"]
    for name in metadata["heldout"]["files"]:
        body = s3.get_object(Bucket="heldout", Key=f"prepared/{name}")["Body"].read()
        assert body == open(os.path.join(local, name), "rb").read()


def test_hold_out_is_a_pure_function_of_seed_source_file_and_document():
    texts = [f"doc {n}" for n in range(10_000)]  # more than one chunk of draws
    heldout = []
    training = list(hold_out(iter(texts), 0.1, 3, 1, 2, heldout))
    draws = heldout_draws(3, 1, 2, np.arange(len(texts), dtype=np.uint64))
    assert [n for _, n, _ in heldout] == np.flatnonzero(draws < 0.1).tolist()
    assert [d for d, _, _ in heldout] == draws[draws < 0.1].tolist()
    assert training == [t for t, d in zip(texts, draws) if d >= 0.1]
    assert abs(len(heldout) / len(texts) - 0.1) < 4.5 * np.sqrt(0.1 * 0.9 / len(texts))
    # Each coordinate matters; the same coordinates give the same draws in any slice.
    others = [heldout_draws(4, 1, 2, np.arange(100, dtype=np.uint64)), heldout_draws(3, 0, 2, np.arange(100, dtype=np.uint64)),
              heldout_draws(3, 1, 1, np.arange(100, dtype=np.uint64))]
    assert all(not np.array_equal(other, draws[:100]) for other in others)
    assert np.array_equal(heldout_draws(3, 1, 2, np.arange(4090, 4100, dtype=np.uint64)), draws[4090:4100])
    assert list(hold_out(iter(texts), 0.0, 3, 1, 2, [])) == texts
