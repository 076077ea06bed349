"""Sources: local directories, s3:// prefixes (a real S3 server on loopback), and bad sources."""

import json
import os
import shutil
import time

import boto3
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSeq2SeqLM, LlamaConfig, LlamaForCausalLM

from jobs.adapt.stage import build_in_memory, run_adapt
from jobs.core.tensors import SafetensorsReader, StreamingWriter
from orchestrator.cli import main
from orchestrator.config import load_config
from jobs.core.errors import UserError

from .conftest import REPO, builtin_path

TINY = os.path.join(REPO, "configs", "tiny.yaml")


def adapted(cfg, out, force=False):
    """run_adapt under the stage key the controller would give it (no data plan recorded)."""
    from orchestrator.keys import adapt_key

    return run_adapt(cfg, out, adapt_key(cfg, None), force=force)


def adapt_cfg(*overrides):
    return load_config(TINY, list(overrides)).adapt


def copy_source(name, tmp_path, **config_changes):
    """A private copy of a builtin source, with `config_changes` written into its config.json."""
    path = str(tmp_path / name.split(":")[1])
    shutil.copytree(builtin_path(name), path)
    config_path = os.path.join(path, "config.json")
    config = json.load(open(config_path))
    config.update(config_changes)
    json.dump(config, open(config_path, "w"))
    return path


def test_other_architecture_is_refused_by_name(tmp_path):
    path = str(tmp_path / "llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(path)
    with pytest.raises(UserError, match=r"source .*llama is a 'llama' model; t5adapt adapts Gemma 2 .* and Gemma 3"):
        build_in_memory(adapt_cfg(f"adapt.source={path}"))


def test_mismatched_vocab_between_pair_is_refused(tmp_path):
    path = copy_source("builtin:tiny-gemma2-narrow", tmp_path, vocab_size=600)
    with pytest.raises(UserError, match=r"adapt\.source \(builtin:tiny-gemma2, vocab 512\) and adapt\.decoder_source "
                                        r"\(.*, vocab 600\) must share one tokenizer"):
        build_in_memory(adapt_cfg("adapt.source=builtin:tiny-gemma2", f"adapt.decoder_source={path}"))


def test_missing_tensor_is_named(tmp_path):
    path = copy_source("builtin:tiny-gemma3", tmp_path)
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    victim = "model.layers.3.mlp.down_proj.weight"
    shard = os.path.join(path, index["weight_map"][victim])
    tensors = load_file(shard)
    del tensors[victim]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"has no tensor layers\.3\.mlp\.down_proj\.weight \(needed for "
                                        r"model\.encoder\.text_model\.layers\.3\.mlp\.down_proj\.weight\)"):
        adapted(adapt_cfg(f"adapt.source={path}"), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")  # nothing half-written where the output belongs


def test_config_that_disagrees_with_weights_is_named(tmp_path):
    path = copy_source("builtin:tiny-gemma3", tmp_path, intermediate_size=256)
    with pytest.raises(UserError, match=r"tensor layers\.0\.mlp\.gate_proj\.weight has shape \(128, 64\) but "
                                        r".* needs \(256, 64\)"):
        build_in_memory(adapt_cfg(f"adapt.source={path}"))


def test_missing_and_unusable_paths(tmp_path):
    with pytest.raises(UserError, match=r"source /no/such/model does not exist"):
        build_in_memory(adapt_cfg("adapt.source=/no/such/model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"has no config\.json and no \.gguf file"):
        build_in_memory(adapt_cfg(f"adapt.source={tmp_path / 'empty'}"))
    with pytest.raises(UserError, match=r"unknown builtin source builtin:nope"):
        build_in_memory(adapt_cfg("adapt.source=builtin:nope"))


def test_gemma3_refuses_second_source_and_bad_layers(tmp_path):
    second = copy_source("builtin:tiny-gemma3", tmp_path)
    with pytest.raises(UserError, match=r"adapt\.decoder_source is for Gemma 2 pairs only.*adapt\.decoder_layers"):
        build_in_memory(adapt_cfg(f"adapt.decoder_source={second}"))
    with pytest.raises(UserError, match=r"adapt\.source is gemma3 but adapt\.decoder_source is gemma2"):
        build_in_memory(adapt_cfg("adapt.decoder_source=builtin:tiny-gemma2"))
    with pytest.raises(UserError, match=r"adapt\.encoder_layers='0,9' names layer\(s\) \[9\] but the source has layers 0\.\.5"):
        build_in_memory(adapt_cfg("adapt.encoder_layers=0,9"))


def test_cli_reports_source_errors_with_exit_2(capsys):
    assert main(["adapt", TINY, "adapt.source=/no/such/model", "--out", "/tmp/never"]) == 2
    assert "source /no/such/model does not exist" in capsys.readouterr().err


def test_streaming_writer_matches_safetensors_reader(tmp_path):
    specs = [("a", (3, 5), torch.float32), ("b", (7,), torch.bfloat16), ("c", (0, 4), torch.float32), ("d", (300,), torch.float16)]
    writer = StreamingWriter(str(tmp_path), specs, max_shard_bytes=64)
    tensors = {name: torch.randn(shape).to(dtype) for name, shape, dtype in specs}
    for name, *_ in specs:
        writer.write(name, tensors[name])
    files = writer.close()
    assert len(files) == 3  # a+b+c share the first shard; d alone exceeds the limit
    reader = SafetensorsReader([os.path.join(tmp_path, f) for f in files])
    for name, tensor in tensors.items():
        assert torch.equal(reader.get(name), tensor)
        assert torch.equal(load_file(os.path.join(tmp_path, json.load(open(tmp_path / "model.safetensors.index.json"))["weight_map"][name]))[name], tensor)
    with pytest.raises(RuntimeError, match="writer expected a"):
        StreamingWriter(str(tmp_path / "x"), specs, 64).write("b", tensors["b"])


def test_s3_source_and_s3_output(s3_endpoint, tmp_path, capsys):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="models")
    local = builtin_path("builtin:tiny-gemma3")
    for file in os.listdir(local):
        s3.upload_file(os.path.join(local, file), "models", f"gemma/tiny/{file}")
    from_s3, _, sources = build_in_memory(adapt_cfg("adapt.source=s3://models/gemma/tiny"))
    assert sources["encoder"].spec == "s3://models/gemma/tiny"
    from_disk, _, _ = build_in_memory(adapt_cfg())
    for (name, a), (_, b) in zip(from_s3.named_parameters(), from_disk.named_parameters()):
        assert torch.equal(a, b), name

    assert main(["adapt", TINY, "adapt.source=s3://models/gemma/tiny", "--out", "s3://models/exports/tiny-t5"]) == 0
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="models", Prefix="exports/tiny-t5/")["Contents"]}
    assert {"exports/tiny-t5/config.json", "exports/tiny-t5/COMMITTED", "exports/tiny-t5/adapt_manifest.json"} <= keys
    download = tmp_path / "download"
    for key in keys:
        target = download / key.split("exports/tiny-t5/")[1]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file("models", key, str(target))
    assert AutoModelForSeq2SeqLM.from_pretrained(str(download)).config.model_type == "t5gemma2"
    # The s3:// output is a commit like a local one: the same config reuses it (nothing is rewritten),
    # another config is refused without --force.
    marker = lambda: s3.head_object(Bucket="models", Key="exports/tiny-t5/COMMITTED")["LastModified"]
    first = marker()
    time.sleep(1.1)  # S3's LastModified has one-second resolution
    assert main(["adapt", TINY, "adapt.source=s3://models/gemma/tiny", "--out", "s3://models/exports/tiny-t5"]) == 0
    assert marker() == first
    assert main(["adapt", TINY, "adapt.source=s3://models/gemma/tiny", "adapt.encoder_scale=0.5",
                 "--out", "s3://models/exports/tiny-t5"]) == 2
    assert "holds finished output made from another config" in capsys.readouterr().err
    assert main(["adapt", TINY, "adapt.source=s3://models/gemma/tiny", "adapt.encoder_scale=0.5",
                 "--out", "s3://models/exports/tiny-t5", "--force"]) == 0
    assert marker() > first


def test_s3_errors_name_the_prefix(s3_endpoint):
    with pytest.raises(UserError, match=r"nothing found under s3://models-missing/x|cannot list s3://models-missing/x"):
        build_in_memory(adapt_cfg("adapt.source=s3://models-missing/x"))
    with pytest.raises(UserError, match=r"s3:// has no bucket name"):
        build_in_memory(adapt_cfg("adapt.source=s3://"))


def _materialise_in(cache, name, results):
    os.environ["T5ADAPT_CACHE"] = cache
    from jobs.core import builtin

    path = builtin.materialise(name)
    results.put(sorted(os.listdir(path)))


def test_concurrent_processes_share_one_cache_entry(tmp_path):
    """Training ranks and Ray actors on one node materialise the same source at once: one builds it,
    the others wait for it (without the lock they tore down each other's staging directory)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_materialise_in, args=(str(tmp_path), "builtin:tiny-gemma2", results))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    listings = [results.get(timeout=5) for _ in workers]
    assert listings[0] == listings[1] == listings[2] and "config.json" in listings[0]
