"""Distillation end to end through `t5adapt run` (real local Ray, Ray Data actors, Ray Train with
DeepSpeed, a real MLflow store, a real S3 endpoint on loopback): the precomputed teacher is its own
content-addressed stage, skipped when done and rebuilt when its key changes, and training reads it,
from a local store or an s3:// one; the online teacher trains too."""

import json
import os

import pytest

from orchestrator.cli import main
from tests.helpers import files as _files, mlflow_runs as _mlflow_runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
SMALL = ["train.num_workers=1", "train.zero_stage=0", "train.max_steps=2", "train.checkpoint_every_steps=2",
         "evaluate.enabled=false", "data.objective=prefix_lm"]
PRECOMPUTED = ["train.distill.enabled=true", "train.distill.teacher=precomputed", "train.distill.top_k=8",
               "train.distill.teacher_batch_size=4"]


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint):
    """Ray starts after the S3 server, so its workers (the teacher's actors) inherit the endpoint."""
    import ray

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _ledger(root):
    from orchestrator import ledger

    return ledger.read(os.path.join(root, "tiny"))["stages"]


def _distill_losses(root, train_run_id):
    client, _, _ = _mlflow_runs(root)
    return [m.value for m in client.get_metric_history(train_run_id, "distill_loss")]


def test_precomputed_teacher_is_a_stage_skipped_when_done_and_rebuilt_when_its_key_changes(ray_cluster, tmp_path):
    root = str(tmp_path)
    assert main(["run", TINY, "--root", root] + SMALL + PRECOMPUTED) == 0
    stages = _ledger(root)
    assert {n: stages[n]["state"] for n in ("prepare", "adapt", "teacher", "train", "export")} == \
        dict.fromkeys(("prepare", "adapt", "teacher", "train", "export"), "done")
    teacher = stages["teacher"]["output"]
    info = json.load(open(os.path.join(teacher, "teacher.json")))
    assert info["top_k"] == 8 and info["teacher_examples"] == info["examples"] > 0 and info["targets"] > 0
    metadata = json.load(open(os.path.join(stages["prepare"]["output"], "metadata.json")))
    assert info["data_key"] == metadata["config_hash"]
    assert {p["name"] for p in info["parts"]} == {f["name"] for f in metadata["files"]}
    losses = _distill_losses(root, stages["train"]["mlflow_run_id"])
    assert len(losses) == 2 and all(0 < x < 50 for x in losses)  # training read the stored top-k
    _, _, runs = _mlflow_runs(root)
    teacher_runs = [r for r in runs if r.info.run_name == "tiny/teacher"]
    assert len(teacher_runs) == 1 and teacher_runs[0].data.metrics["teacher_examples"] == info["teacher_examples"]
    assert teacher_runs[0].data.params["train.distill.top_k"] == "8"

    before = _files(teacher)
    assert main(["run", TINY, "--root", root] + SMALL + PRECOMPUTED) == 0
    again = _ledger(root)
    assert again["teacher"]["state"] == "reused" and again["train"]["state"] == "reused"
    assert _files(teacher) == before

    assert main(["run", TINY, "--root", root] + SMALL + PRECOMPUTED + ["train.distill.top_k=4"]) == 0
    changed = _ledger(root)
    assert changed["teacher"]["state"] == "done" and changed["teacher"]["key"] != stages["teacher"]["key"]
    assert changed["train"]["state"] == "done" and changed["train"]["key"] != stages["train"]["key"]
    assert json.load(open(os.path.join(changed["teacher"]["output"], "teacher.json")))["top_k"] == 4
    assert _files(teacher) == before  # the old output stays, reusable if the key goes back


def _objects(s3, bucket):
    """{key: (ETag, LastModified)} of every object in `bucket`."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: (o["ETag"], o["LastModified"]) for page in pages for o in page.get("Contents", [])}


def test_precomputed_teacher_on_an_s3_store_is_written_there_read_by_training_and_reused(ray_cluster, tmp_path):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="teacher")
    root = str(tmp_path)
    command = ["run", TINY, "--root", root, "store=s3://teacher/stages"] + SMALL + PRECOMPUTED
    assert main(command) == 0
    stages = _ledger(root)
    assert stages["teacher"]["state"] == "done" and stages["train"]["state"] == "done"
    teacher = stages["teacher"]["output"]
    assert teacher.startswith("s3://teacher/stages/teacher-")
    objects = _objects(s3, "teacher")
    prefix = teacher[len("s3://teacher/"):] + "/"
    stored = {k[len(prefix):] for k in objects if k.startswith(prefix)}
    info = json.loads(s3.get_object(Bucket="teacher", Key=prefix + "teacher.json")["Body"].read())
    assert info["top_k"] == 8 and info["teacher_examples"] > 0 and info["config_hash"] == stages["teacher"]["key"]
    metadata = json.loads(s3.get_object(Bucket="teacher", Key=stages["prepare"]["output"][len("s3://teacher/"):]
                                        + "/metadata.json")["Body"].read())
    parts = {f["name"] for f in metadata["files"]}
    assert parts and stored == parts | {"teacher.json", "COMMITTED"}  # one file per part, named alike
    losses = _distill_losses(root, stages["train"]["mlflow_run_id"])
    assert len(losses) == 2 and all(0 < x < 50 for x in losses)  # training read the stored top-k

    assert main(command) == 0
    again = _ledger(root)
    assert again["teacher"]["state"] == "reused" and again["train"]["state"] == "reused"
    assert _objects(s3, "teacher") == objects  # nothing in the bucket was written again


def test_online_teacher_trains_without_a_teacher_stage(ray_cluster, tmp_path):
    root = str(tmp_path)
    assert main(["run", TINY, "--root", root] + SMALL + ["train.distill.enabled=true", "train.distill.top_k=0"]) == 0
    stages = _ledger(root)
    assert "teacher" not in stages and stages["train"]["state"] == "done"
    losses = _distill_losses(root, stages["train"]["mlflow_run_id"])
    assert len(losses) == 2 and all(0 < x < 50 for x in losses)
