"""The train stage end to end on a real local Ray cluster (2 CPU workers, gloo), real DeepSpeed,
a real MLflow store and a real S3 endpoint on loopback, with the tiny Gemma 3 / Gemma 2 models."""

import json
import os
import threading
import time

import numpy as np
import pytest
import torch

from orchestrator.cli import main
from orchestrator.config import load_config

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint):
    """3 logical CPUs: two training workers plus the prepare stage's tasks (Ray starts after the S3
    server, so its workers inherit the endpoint and test credentials)."""
    import ray

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _mlflow(root):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{os.path.abspath(root)}/mlflow.db")


def _train_run(root, name):
    client = _mlflow(root)
    experiment = client.get_experiment_by_name("t5adapt")
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}/train'")
    assert len(runs) == 1
    return client, runs[0]


def _stage(root, stage, name="tiny"):
    """Where a stage of run `name` put its output (from the run's ledger)."""
    from orchestrator import ledger

    return ledger.read(os.path.join(root, name))["stages"][stage]["output"]


def _copy_inputs(reference, root):
    """Give a new root the reference's prepare and adapt outputs: same stage keys, so they are reused."""
    import shutil

    for stage in ("prepare", "adapt"):
        source = _stage(reference["root"], stage)
        shutil.copytree(source, os.path.join(root, "stages", os.path.basename(source)))


def _train_alone(reference, storage_root, overrides, init=None, run_id=None, root=None):
    """The train job by itself on the reference's prepared data and adapted model."""
    from jobs.train.stage import run_train

    job = load_config(TINY, overrides)
    uri = f"sqlite:///{os.path.abspath(root)}/mlflow.db" if run_id else None
    return job, run_train(job.train, _stage(reference["root"], "prepare"), init or _stage(reference["root"], "adapt"),
                          storage_root, key="test-" + "-".join(overrides), tracking_uri=uri, mlflow_run_id=run_id)


def _loss_by_step(client, run_id, key="loss"):
    """The last logged value per step (a replayed step after a restart overrides the first try)."""
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
    return {m.step: m.value for m in history}


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    """`t5adapt train configs/tiny.yaml` in an empty root: prepare, adapt, then 30 ZeRO-2 steps, with
    5 held-out examples scored at each checkpoint (odd, so one rank pads its last micro-batch)."""
    root = str(tmp_path_factory.mktemp("train-ref"))
    assert main(["train", TINY, "--root", root, "train.heldout_examples=5"]) == 0
    client, run = _train_run(root, "tiny")
    return {"root": root, "client": client, "run": run, "losses": _loss_by_step(client, run.info.run_id)}


def test_train_from_empty_root_learns_tracks_and_exports(reference):
    from transformers import AutoModelForSeq2SeqLM

    from jobs.train import checkpoints

    root, client, run = reference["root"], reference["client"], reference["run"]
    losses = reference["losses"]
    assert sorted(losses) == list(range(1, 31))
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (28, 29, 30)])
    assert last < first - 0.5, (first, last)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.zero_stage"] == "2"
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.params["data.encoder_length"] == "64" and parent.info.run_name == "tiny"
    for key in ("lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu", "data_wait_fraction", "loss_by_denoiser/S",
                "loss_by_denoiser/X64_r0.5", "params_trainable"):
        assert key in run.data.metrics, key
    assert 0 < run.data.metrics["mfu"] < 1 and 0 <= run.data.metrics["data_wait_fraction"] < 1
    # The prepare stage logged its own run beside it.
    prepare = client.search_runs([run.info.experiment_id], "attributes.run_name = 'tiny/prepare'")
    assert prepare and prepare[0].data.tags["mlflow.parentRunId"] == parent.info.run_id

    storage = _stage(root, "train")
    assert checkpoints.committed_steps(storage) == [30, 20]  # keep_checkpoints=2: step 10 pruned
    assert sorted(os.listdir(os.path.join(storage, "checkpoints"))) == ["step-000020", "step-000030"]
    for step in (20, 30):
        assert checkpoints.verify(storage, step, checkpoints.step_dir(storage, step)) is None
        manifest = checkpoints.read_manifest(storage, step)
        assert manifest["step"] == step and manifest["micro_batches"] == step and manifest["world_size"] == 2
        assert any(name.startswith("ds/zero_pp_rank_1") for name in manifest["files"])  # rank 1's shard is in
    assert run.data.tags["t5adapt.last_checkpoint"] == checkpoints.step_dir(storage, 30)

    # The export loads with plain transformers and reproduces the engine's logits on the probe batch.
    export = os.path.join(storage, "model")
    model = AutoModelForSeq2SeqLM.from_pretrained(export, dtype=torch.float32).eval()
    probe = torch.load(os.path.join(checkpoints.step_dir(storage, 30), checkpoints.PROBE))
    with torch.no_grad():
        logits = model(**probe["inputs"]).logits
    assert torch.equal(logits, probe["logits"])
    # ... and it is the trained model, not the initial one.
    initial = AutoModelForSeq2SeqLM.from_pretrained(_stage(root, "adapt"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert not torch.equal(initial(**probe["inputs"]).logits, logits)
    info = json.load(open(os.path.join(export, "t5adapt_train.json")))
    assert info["step"] == 30 and info["probe_max_abs_diff"] == 0.0

    # The held-out loss training logged at its last checkpoint (2 ranks, ZeRO-2) is the evaluate
    # stage's, computed by transformers on the exported model over the same 5 examples.
    from jobs.core.examples_io import read_heldout_examples
    from jobs.evaluate.heldout import heldout_loss

    heldout = _loss_by_step(client, run.info.run_id, "heldout_loss")
    assert sorted(heldout) == [10, 20, 30]
    metadata, rows = read_heldout_examples(_stage(root, "prepare"), limit=5)
    assert len(rows["input_ids"]) == 5
    expected = heldout_loss(model, rows, metadata, batch_size=8, progress=False)["loss"]
    assert heldout[30] == pytest.approx(expected, rel=1e-5)
    assert heldout[10] != pytest.approx(heldout[30], rel=1e-3)  # scored on each checkpoint's weights


def _kill_a_worker_after(path, stop):
    """Wait for `path` (a commit marker), then SIGKILL one Ray Train worker process."""
    import psutil

    while not stop.is_set():
        if os.path.exists(path):
            for process in psutil.process_iter(["cmdline"]):
                if "RayTrainWorker" in " ".join(process.info["cmdline"] or []):
                    process.kill()
                    stop.kill_time = time.time()
                    return
        time.sleep(0.02)


def test_killed_worker_recovers_and_replays_the_same_losses(reference):
    root = str(reference["root"]) + "-killed"
    _copy_inputs(reference, root)
    marker = os.path.join(root, "stages", os.path.basename(_stage(reference["root"], "train")), "checkpoints",
                          "step-000010", "COMMITTED")
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_worker_after, args=(marker, stop), daemon=True)
    killer.start()
    try:
        assert main(["train", TINY, "--root", root]) == 0
    finally:
        stop.set()
    assert hasattr(stop, "kill_time"), "no worker was killed"
    client, run = _train_run(root, "tiny")
    resumed = [m.value for m in client.get_metric_history(run.info.run_id, "resumed_from_step")]
    assert resumed and resumed[0] in (10, 20), resumed  # Ray restarted the group; it resumed by itself
    # Replayed steps are logged once: one value per step, and every step is there.
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 31))
    # Bitwise: same data per rank and position (a seeded order per pass), same reduction order
    # (gloo, same world size), fp32: the killed run ends on the reference's weights.
    assert _loss_by_step(client, run.info.run_id) == reference["losses"]
    assert _final_weights(root) == _final_weights(reference["root"])


def _final_weights(root):
    """{name: bytes} of the trained model a root's train stage exported (local or s3://)."""
    from safetensors.torch import load_file

    from jobs.core import storage

    model = storage.local_copy(storage.join(_stage(root, "train"), "model"))
    weights = {}
    for name in sorted(os.listdir(model)):
        if name.endswith(".safetensors"):
            weights.update({k: v.numpy().tobytes() for k, v in load_file(os.path.join(model, name)).items()})
    assert weights
    return weights


def test_zero3_on_s3_resumes_from_previous_checkpoint_when_newest_is_corrupt(ray_cluster, reference, tmp_path):
    """Every stage output on S3 (store=s3://...): ZeRO-3 checkpoints there; a damaged newest shard is
    skipped on the re-run, which resumes from the previous checkpoint and replays the same losses."""
    import boto3

    from jobs.core import storage
    from jobs.train import checkpoints

    boto3.client("s3").create_bucket(Bucket="train-ckpt")
    root = str(tmp_path)
    overrides = ["train.zero_stage=3", "train.max_steps=8", "train.checkpoint_every_steps=4",
                 "store=s3://train-ckpt/stages"]
    assert main(["train", TINY, "--root", root] + overrides) == 0
    train = _stage(root, "train")
    assert train.startswith("s3://train-ckpt/stages/train-")
    assert checkpoints.committed_steps(train) == [8, 4]
    client, run = _train_run(root, "tiny")
    losses = _loss_by_step(client, run.info.run_id)
    assert np.mean([losses[7], losses[8]]) < np.mean([losses[1], losses[2]]) - 0.3, losses
    first_weights = _final_weights(root)

    # Flip bytes in one ZeRO-3 shard of the newest checkpoint, keeping its size, and take the
    # export and the stage's marker away (as if the run had died before exporting), so the stage is
    # built again: the driver's export finds the damage and training redoes step 8 from step 4.
    shard = next(name for name in checkpoints.read_manifest(train, 8)["files"]
                 if "zero_pp_rank_1" in name and "optim" in name)
    bucket, key = storage.split_s3(storage.join(checkpoints.step_dir(train, 8), shard))
    body = bytearray(boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2:len(body) // 2 + 64] = bytes(64)
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=bytes(body))
    storage.delete_file(storage.join(train, "COMMITTED"))
    storage.delete_tree(storage.join(train, "model"))

    assert main(["train", TINY, "--root", root] + overrides) == 0  # the same command again
    client, again = _train_run(root, "tiny")
    assert again.info.run_id == run.info.run_id  # the same MLflow run, reopened
    resumed = [m.value for m in client.get_metric_history(run.info.run_id, "resumed_from_step")]
    assert resumed == [4]  # the damaged step 8 was skipped for step 4
    assert client.get_run(run.info.run_id).data.tags["t5adapt.resumed_from_step"] == "4"
    # Steps 5-8 were replayed, not logged again; the replay ends on the same weights, bitwise.
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, 9))
    assert checkpoints.verify(train, 8, checkpoints.fetch(train, 8)) is None
    assert _final_weights(root) == first_weights


UNBALANCED = ["adapt.source=builtin:tiny-gemma2", "adapt.decoder_source=builtin:tiny-gemma2-narrow", "name=tiny-t5gemma"]


def test_unbalanced_pair_warms_up_cross_attention_alone(ray_cluster, tmp_path):
    """T5Gemma (Gemma 2), 1 worker, ZeRO-1, activation checkpointing: for train.cross_attn_warmup_steps
    only cross-attention moves; afterwards everything trains."""
    from jobs.train.export import consolidated_state
    from jobs.train import checkpoints
    from safetensors.torch import load_file

    root = str(tmp_path)
    overrides = UNBALANCED + ["train.num_workers=1", "train.zero_stage=1", "train.max_steps=3",
                              "train.cross_attn_warmup_steps=2", "train.checkpoint_every_steps=1",
                              "train.keep_checkpoints=3", "train.lr=0.01", "train.warmup_steps=0",
                              "train.activation_checkpointing=true"]
    assert main(["train", TINY, "--root", root] + overrides) == 0
    storage = _stage(root, "train", "tiny-t5gemma")
    adapted = _stage(root, "adapt", "tiny-t5gemma")
    initial = {}
    for name in os.listdir(adapted):
        if name.endswith(".safetensors"):
            initial.update(load_file(os.path.join(adapted, name)))
    after_warmup = consolidated_state(checkpoints.step_dir(storage, 2))
    after_all = consolidated_state(checkpoints.step_dir(storage, 3))
    cross = [k for k in initial if "cross_attn" in k]
    rest = [k for k in initial if "cross_attn" not in k and k in after_warmup]
    assert cross and rest
    assert all(torch.equal(after_warmup[k], initial[k]) for k in rest)
    assert all(not torch.equal(after_warmup[k], initial[k]) for k in cross if k.endswith("proj.weight"))
    assert sum(not torch.equal(after_all[k], initial[k]) for k in rest) > len(rest) // 2
    client, run = _train_run(root, "tiny-t5gemma")
    frozen = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "params_frozen")}
    trainable = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "params_trainable")}
    total = sum(t.numel() for t in initial.values())
    assert trainable[0] == sum(initial[k].numel() for k in cross) and frozen[0] == total - trainable[0]
    assert trainable[2] == total and frozen[2] == 0
    assert run.data.params["resolved.cross_attn_warmup_steps"] == "2"


@pytest.fixture(scope="module")
def poisoned_init(reference, tmp_path_factory):
    """The tiny adapted checkpoint with NaN in the encoder's final norm: every loss is NaN."""
    import shutil

    from safetensors.torch import load_file, save_file

    path = str(tmp_path_factory.mktemp("poisoned") / "adapted")
    shutil.copytree(_stage(reference["root"], "adapt"), path)
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            tensors = load_file(os.path.join(path, name))
            hits = [k for k in tensors if k.endswith("encoder.text_model.norm.weight")]
            for k in hits:
                tensors[k] = torch.full_like(tensors[k], float("nan"))
            if hits:
                save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
    return path


ONE_WORKER = ["train.num_workers=1", "train.zero_stage=1", "train.max_steps=2"]


def test_nonfinite_loss_stops_naming_the_step(reference, poisoned_init, tmp_path):
    from jobs.core.errors import RunFailed

    with pytest.raises(RunFailed, match="loss is not finite at step 1.*train.on_nonfinite_loss=skip"):
        _train_alone(reference, str(tmp_path / "train"), ONE_WORKER, init=poisoned_init)


def test_nonfinite_loss_skip_discards_steps_and_counts_them(reference, poisoned_init, tmp_path):
    client = _mlflow(tmp_path)
    run_id = client.create_run(client.create_experiment("t5adapt")).info.run_id
    _, summary = _train_alone(reference, str(tmp_path / "train"), ONE_WORKER + ["train.on_nonfinite_loss=skip"],
                              init=poisoned_init, run_id=run_id, root=str(tmp_path))
    assert client.get_run(run_id).data.metrics["skipped_steps"] == 2
    # DeepSpeed really discarded the steps: every weight is still the initial one (NaN where poisoned).
    from transformers import AutoModelForSeq2SeqLM

    initial = AutoModelForSeq2SeqLM.from_pretrained(poisoned_init).state_dict()
    exported = AutoModelForSeq2SeqLM.from_pretrained(summary["model"]).state_dict()
    assert set(initial) == set(exported)
    assert all(torch.equal(exported[k].nan_to_num(7.0), initial[k].nan_to_num(7.0)) for k in initial)
    assert any(initial[k].isnan().any() for k in initial)


def test_export_on_demand_writes_an_earlier_checkpoint(reference, tmp_path, capsys):
    from transformers import AutoModelForSeq2SeqLM

    root = reference["root"]
    out = str(tmp_path / "step20")
    assert main(["export", TINY, "--root", root, "--step", "20", "--out", out]) == 0
    assert json.load(open(os.path.join(out, "t5adapt_train.json")))["step"] == 20
    step20 = AutoModelForSeq2SeqLM.from_pretrained(out)
    final = AutoModelForSeq2SeqLM.from_pretrained(os.path.join(_stage(root, "train"), "model"))
    assert any(not torch.equal(a, b) for a, b in zip(step20.parameters(), final.parameters()))
    assert main(["export", TINY, "--root", root, "--step", "10"]) == 2  # pruned: keep_checkpoints=2
    assert "no committed checkpoint for step 10" in capsys.readouterr().err


def test_zero0_one_worker_trains_exactly_like_a_plain_pytorch_loop(reference, tmp_path):
    """One worker, ZeRO-0: t5adapt switches off DeepSpeed's gradient all-reduce (one rank has nothing
    to reduce). The trained weights must still be what a plain PyTorch loop gets on the same batches."""
    from transformers import AutoModelForSeq2SeqLM

    from jobs.train import checkpoints
    from jobs.core.examples_io import make_collate, read_examples
    from jobs.train.batches import pass_order
    from jobs.train.export import consolidated_state
    from jobs.train.loop import forward_loss
    from jobs.train.schedule import param_groups, set_learning_rate
    data, init = _stage(reference["root"], "prepare"), _stage(reference["root"], "adapt")
    job, summary = _train_alone(reference, str(tmp_path / "train"), [
        "train.num_workers=1", "train.zero_stage=0", "train.max_steps=2", "train.warmup_steps=0", "train.schedule=constant"])
    assert summary["probe_max_abs_diff"] == 0.0
    trained = consolidated_state(checkpoints.step_dir(summary["storage"], 2))

    cfg = job.train
    model = AutoModelForSeq2SeqLM.from_pretrained(init, dtype=torch.float32).train()
    model.config.use_cache = False
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(param_groups(model, [], cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    metadata, rows = read_examples(data)
    collate = make_collate(metadata["encoder_length"], metadata["decoder_length"], metadata["pad_id"])
    order = pass_order(cfg.seed, 0, 0, len(rows["input_ids"]))  # the first pass's order (jobs/train/batches.py)
    for step in range(2):
        set_learning_rate(optimizer, step, cfg, 0)
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1_009)  # as the loop seeds rank 0
        chosen = order[step * cfg.micro_batch_size:(step + 1) * cfg.micro_batch_size]  # rank 0 of 1: all rows
        batch = collate({c: v[chosen] for c, v in rows.items()})
        loss, _ = forward_loss(model, batch, len(metadata["denoisers"]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    plain = model.state_dict()
    assert set(trained) <= set(plain) and len(trained) > 10
    assert sum(not torch.equal(trained[k], initial[k]) for k in trained) > len(trained) // 2
    for key in trained:
        torch.testing.assert_close(trained[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_second_driver_and_another_world_size_are_refused_before_training(reference, tmp_path):
    """The driver holds STORAGE/checkpoints.lock while it trains; and checkpoints saved by 2 workers
    cannot be resumed by 1 (ZeRO partitions and data positions belong to the world size)."""
    import shutil

    from jobs.core.errors import UserError
    from jobs.core.locks import StageLock
    from jobs.train import checkpoints

    storage_root = str(tmp_path / "train")
    shutil.copytree(checkpoints.folder(_stage(reference["root"], "train")), checkpoints.folder(storage_root))
    holder = StageLock(checkpoints.folder(storage_root), info="training")
    assert holder.try_acquire() is None
    try:
        with pytest.raises(UserError, match=r"checkpoints is being trained by .*: wait for it to finish"):
            _train_alone(reference, storage_root, [])
    finally:
        holder.release()
    overrides = ["train.num_workers=1", "train.zero_stage=0"]
    for step in checkpoints.committed_steps(storage_root):  # made from this config, but by 2 workers
        path = os.path.join(checkpoints.step_dir(storage_root, step), checkpoints.MANIFEST)
        manifest = json.load(open(path))
        json.dump(dict(manifest, config_hash="test-" + "-".join(overrides)), open(path, "w"))
    with pytest.raises(UserError, match=r"saved by 2 workers \(step 30\); train.num_workers=1 cannot resume them: "
                                        r"set train.num_workers=2, or pass --force"):
        _train_alone(reference, storage_root, overrides)
