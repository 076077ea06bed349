"""The evaluate stage on tiny models: probe identities, held-out loss against transformers' own
loss, parameter counts, and the commit / reuse contract."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.adapt.stage import build_in_memory, run_adapt
from jobs.core.commits import COMMIT_MARKER
from jobs.core.errors import UserError
from jobs.core.examples_io import IGNORE, denoiser_names, make_collate, read_heldout_documents, read_heldout_examples
from jobs.core.sources import load_causal_lm, load_tokenizer
from jobs.evaluate.config import EvaluateConfig
from jobs.evaluate.cost import causal_cost, parameter_counts, seq2seq_cost, source_parameter_counts
from jobs.evaluate.heldout import heldout_loss
from jobs.evaluate.probe import cut_passages, probe
from jobs.evaluate.stage import RESULT, REPORT, evaluation_table, run_evaluate
from orchestrator.config import load_config

from .conftest import REPO

TINY = os.path.join(REPO, "configs", "tiny.yaml")
SMALL = EvaluateConfig(max_examples=24, batch_size=8, probe_passages=6, probe_prefix_tokens=24, probe_target_tokens=12,
                       cost_input_tokens=16, cost_output_tokens=4, cost_repeats=1, num_samples=2, sample_new_tokens=6)


def write_heldout_data(path: str, num_examples: int = 24, num_documents: int = 10) -> str:
    """A prepared-data directory holding only what evaluation reads: metadata.json and the held-out
    split (examples cut and corrupted by the real prepare code from the tiny tokenizer's English text)."""
    from jobs.core.shipped_text import prose_documents
    from jobs.data.examples import build_examples
    from jobs.data.plan import denoising_tokens, make_plan

    cfg = load_config(TINY, ["data.denoisers=[{name: R, mean_span: 3, rate: 0.15}, {name: X, mean_span: 8, rate: 0.5}, "
                             "{name: S}]"]).data
    tokenizer = load_tokenizer("builtin:tiny-gemma3")
    plan = make_plan(cfg, tokenizer)
    documents = []
    for text in prose_documents():
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) > 60:
            documents.append(np.array(ids + [plan.eos_id], dtype=np.int32))
        if len(documents) == num_documents:
            break
    columns = build_examples(np.concatenate(documents), 0, num_examples, plan, cfg.seed)
    os.makedirs(os.path.join(path, "heldout"))
    pq.write_table(pa.table({
        "example_index": pa.array(columns["example_index"], pa.int64()),
        **{c: pa.array(columns[c], pa.list_(pa.int32())) for c in ("input_ids", "decoder_input_ids", "labels")},
        "denoiser": pa.array(columns["denoiser"], pa.int32()),
    }), os.path.join(path, "heldout", "examples.parquet"))
    pq.write_table(pa.table({"tokens": pa.array(documents, pa.list_(pa.int32())), "source": ["python-docs"] * len(documents)}),
                   os.path.join(path, "heldout", "documents.parquet"))
    metadata = {"bos_id": plan.bos_id, "eos_id": plan.eos_id, "pad_id": plan.pad_id,
                "encoder_length": cfg.encoder_length, "decoder_length": cfg.decoder_length, "files": [],
                **denoising_tokens(plan, tokenizer),
                "heldout": {"files": ["heldout/examples.parquet", "heldout/documents.parquet"]}}
    with open(os.path.join(path, "metadata.json"), "w") as f:
        json.dump(metadata, f)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: a second torch thread only adds synchronisation, which on a busy 2-core
    machine made each forward ~30x slower. Restored for the other test modules."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_heldout_data(str(tmp_path_factory.mktemp("evaluate") / "data"))


@pytest.fixture(scope="module")
def t5gemma2():
    return build_in_memory(load_config(TINY).adapt)[0]


@pytest.fixture(scope="module")
def source():
    return load_causal_lm("builtin:tiny-gemma3")


@pytest.fixture(scope="module")
def adapted_dir(tmp_path_factory):
    """The tiny adapted checkpoint on disk, untrained: at init, masked encoder == source."""
    return run_adapt(load_config(TINY).adapt, str(tmp_path_factory.mktemp("evaluate") / "adapted"), key="adapt-key")


@pytest.fixture
def local_ray():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:  # other modules start their own cluster
        ray.shutdown()


@pytest.mark.parametrize("source_spec", ["builtin:tiny-gemma3", "builtin:tiny-gemma2"])
def test_masked_encoder_equals_source_given_target_alone_at_init(data_dir, source_spec):
    model = build_in_memory(load_config(TINY, [f"adapt.source={source_spec}"]).adapt)[0]
    metadata, _ = read_heldout_examples(data_dir, limit=1)
    prefixes, targets = cut_passages(read_heldout_documents(data_dir), 24, 12, 5)
    assert prefixes.shape == (5, 24) and targets.shape == (5, 12)
    result = probe(model, load_causal_lm(source_spec), prefixes, targets, metadata, batch_size=2, progress=False)
    assert abs(result["encoder_masked"] - result["source_target_only"]) < 1e-4, result
    # Teeth: the untrained encoder moves the decoder, and the prefix changes the source's predictions.
    assert abs(result["encoder_gain"]) > 1e-3 and abs(result["source_context_gain"]) > 1e-3
    assert result["encoder_gain"] == pytest.approx(result["encoder_masked"] - result["encoder"])


def test_passages_stay_inside_documents_round_robin():
    documents = [np.arange(100, 131), np.arange(200, 206), np.arange(300, 321)]  # last token plays EOS
    prefixes, targets = cut_passages(documents, 6, 4, 10)
    starts = [int(p[0]) for p in prefixes]
    # 30 usable tokens -> 3 windows, 5 -> none, 20 -> 2; taken round-robin.
    assert starts == [100, 300, 110, 310, 120]
    assert torch.equal(targets[0], torch.arange(106, 110))


def test_heldout_loss_matches_transformers_loss_per_denoiser(data_dir, t5gemma2):
    metadata, rows = read_heldout_examples(data_dir)
    result = heldout_loss(t5gemma2, rows, metadata, batch_size=5, progress=False)
    names = denoiser_names(metadata)
    assert names == ["R3_r0.15", "X8_r0.5", "S"]
    assert result["examples"] == len(rows["input_ids"]) == 24
    assert result["tokens"] == sum(len(labels) for labels in rows["labels"])
    collate = make_collate(metadata["encoder_length"], metadata["decoder_length"], metadata["pad_id"])
    weighted = 0.0
    for index, name in enumerate(names):
        mine = np.flatnonzero(np.asarray(rows["denoiser"], dtype=np.int64) == index)
        assert len(mine), f"the fixture should hold {name} examples"
        batch = collate({c: v[mine] for c, v in rows.items()})
        with torch.no_grad():
            expected = t5gemma2(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                decoder_input_ids=batch["decoder_input_ids"],
                                decoder_attention_mask=batch["decoder_attention_mask"], labels=batch["labels"]).loss.item()
        got = result["by_denoiser"][name]
        assert got["loss"] == pytest.approx(expected, abs=1e-5), name
        assert got["examples"] == len(mine) and got["tokens"] == int((batch["labels"] != IGNORE).sum())
        weighted += expected * got["tokens"]
    assert result["loss"] == pytest.approx(weighted / result["tokens"], abs=1e-5)


def test_parameter_counts_and_cost(t5gemma2, source):
    counts = parameter_counts(t5gemma2)
    # transformers ties T5Gemma 2's embeddings to one Parameter, which parameters() yields once.
    assert counts["total"] == sum(p.numel() for p in t5gemma2.parameters())
    assert counts["encoder"] == sum(p.numel() for p in t5gemma2.get_encoder().parameters())
    # The one embedding (its table and T5Gemma 2's end-of-image vector) is what both stacks share.
    assert counts["shared"] == sum(p.numel() for p in t5gemma2.get_input_embeddings().parameters()) == 512 * 64 + 64
    assert counts["total"] == counts["encoder"] + counts["decoder"] - counts["shared"] and counts["other"] == 0
    source_counts = source_parameter_counts(source)
    assert source_counts["total"] == sum(p.numel() for p in source.parameters())
    assert source_counts["total"] < counts["total"]
    ids = torch.randint(5, 512, (1, 16))
    model_cost, source_cost = seq2seq_cost(t5gemma2, ids, 4, 1), causal_cost(source, ids, 4, 1)
    for value in [*model_cost.values(), *source_cost.values()]:
        assert value > 0


def test_run_evaluate_commits_reuses_and_redoes(tmp_path, data_dir, adapted_dir):
    model_dir = adapted_dir
    out = str(tmp_path / "evaluation")
    first = run_evaluate(SMALL, model_dir, "builtin:tiny-gemma3", data_dir, out, key="k1")
    assert first["config_hash"] == "k1" and os.path.isfile(os.path.join(out, COMMIT_MARKER))
    with open(os.path.join(out, RESULT)) as f:
        assert json.load(f) == json.loads(json.dumps(first))
    assert first["heldout"]["examples"] == 24 and first["probe"]["passages"] == 6
    assert len(first["samples"]) == 2 and all(isinstance(s["model"], str) for s in first["samples"])
    report = open(os.path.join(out, REPORT)).read()
    assert evaluation_table(first) in report and "| probe target CE with the prefix (nats/token) |" in report
    stamp = os.stat(os.path.join(out, RESULT)).st_mtime_ns

    again = run_evaluate(SMALL, model_dir, "builtin:tiny-gemma3", data_dir, out, key="k1")
    assert again == json.loads(json.dumps(first)) and os.stat(os.path.join(out, RESULT)).st_mtime_ns == stamp
    with pytest.raises(UserError, match="another config"):
        run_evaluate(SMALL, model_dir, "builtin:tiny-gemma3", data_dir, out, key="k2")
    redone = run_evaluate(SMALL, model_dir, "builtin:tiny-gemma3", data_dir, out, key="k2", force=True)
    assert redone["config_hash"] == "k2" and os.stat(os.path.join(out, RESULT)).st_mtime_ns != stamp
    # Deterministic numbers, recomputed.
    assert redone["heldout"] == first["heldout"]


def test_run_evaluate_on_the_prepare_stage_output(tmp_path, adapted_dir, local_ray):
    from jobs.core.examples_io import read_examples
    from jobs.data.stage import run_prepare

    data = str(tmp_path / "data")
    metadata = run_prepare(load_config(TINY).data, "builtin:tiny-gemma3", data, key="k")
    _, rows = read_examples(data)  # the training parts, through the shared reader
    assert len(rows["input_ids"]) == metadata["num_examples"] and list(rows["example_index"]) == list(range(len(rows["input_ids"])))
    evaluation = run_evaluate(SMALL, adapted_dir, "builtin:tiny-gemma3", data, str(tmp_path / "evaluation"), key="e")
    heldout = evaluation["heldout"]
    assert heldout["examples"] == min(SMALL.max_examples, metadata["heldout"]["examples"])
    assert sum(d["examples"] for d in heldout["by_denoiser"].values()) == heldout["examples"]
    assert set(heldout["by_denoiser"]) <= set(denoiser_names(metadata))
    probe_result = evaluation["probe"]
    assert probe_result["passages"] > 0
    assert abs(probe_result["encoder_masked"] - probe_result["source_target_only"]) < 1e-4  # untrained model


def test_missing_heldout_split_is_a_user_error(tmp_path):
    (tmp_path / "metadata.json").write_text("{}")
    with pytest.raises(UserError, match="no held-out split"):
        read_heldout_examples(str(tmp_path))
