"""The `t5adapt` command line. Exit codes: 0 success, 2 user error (one clear line), 1 anything else."""

import argparse
import logging
import os
import sys

from orchestrator.errors import RunFailed, UserError

_EPILOG = """examples:
  t5adapt adapt configs/quickstart.yaml                  # real Gemma 3 270M -> T5Gemma 2 270M-270M
  t5adapt adapt configs/tiny.yaml adapt.encoder_layers=every:2 --out /tmp/tiny-adapted
  t5adapt train configs/tiny.yaml                        # prepare + adapt + train, resumable
  t5adapt config show configs/quickstart.yaml adapt.dtype=bfloat16

Any config key can be overridden as key=value (dotted keys, e.g. adapt.decoder_layers=first:6).
The run root is --root, else $T5ADAPT_ROOT, else ./runs.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="t5adapt", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="Turn decoder-only Gemma models into T5Gemma-style encoder-decoder models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every tensor mapping and debug detail")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    adapt = commands.add_parser(
        "adapt", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="build an encoder-decoder checkpoint from decoder-only checkpoint(s)",
        description="Build an encoder-decoder Hugging Face directory from decoder-only checkpoint(s):\n"
                    "Gemma 3 -> T5Gemma 2 (shared embedding, merged attention), Gemma 2 -> T5Gemma\n"
                    "(balanced, or unbalanced with adapt.decoder_source). Writes safetensors, config,\n"
                    "tokenizer, a model card and adapt_manifest.json (every tensor's source and checksum).\n"
                    "Sources: a local directory, an s3:// prefix, a .gguf file, or builtin:gemma3-270m.",
        epilog="the output loads with transformers.AutoModelForSeq2SeqLM.from_pretrained(OUT).\n"
               "Re-running with the same config reuses a finished output.")
    adapt.add_argument("config", metavar="CONFIG", help="YAML job config, e.g. configs/quickstart.yaml")
    adapt.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    adapt.add_argument("--out", help="output directory or s3:// prefix (default: ROOT/NAME/adapted)")
    adapt.add_argument("--root", help="run root (default: $T5ADAPT_ROOT or ./runs)")
    adapt.add_argument("--force", action="store_true", help="replace an existing output made from another config")

    prepare = commands.add_parser(
        "prepare", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="turn a text corpus into UL2 / PrefixLM training examples (Ray Data)",
        description="Read a text corpus (JSON Lines, Parquet or plain text; local paths, globs or s3://\n"
                    "prefixes), tokenize it with the source model's tokenizer on Ray Data, pack documents\n"
                    "and build UL2 (mixture of denoisers) or PrefixLM examples. Writes Parquet shards\n"
                    "(example_index, input_ids, decoder_input_ids, labels, denoiser), metadata.json\n"
                    "(tokenizer, sentinel ids, denoiser table, lengths, bad-row counts) and COMMITTED.\n"
                    "Bad rows are skipped and counted per reason and file. Output is byte-identical\n"
                    "for the same config, whatever the number of workers.",
        epilog="examples:\n  t5adapt prepare configs/tiny.yaml\n"
               "  t5adapt prepare configs/quickstart.yaml --corpus 'data/*.jsonl' data.encoder_length=1024\n"
               "Runs on the embedded local Ray unless RAY_ADDRESS points at a cluster.")
    prepare.add_argument("config", metavar="CONFIG", help="YAML job config")
    prepare.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    prepare.add_argument("--corpus", action="append", metavar="PATH",
                         help="corpus file, glob, directory or s3:// prefix (repeatable; replaces data.corpus)")
    prepare.add_argument("--out", help="output directory or s3:// prefix (default: ROOT/NAME/data)")
    prepare.add_argument("--root", help="run root (default: $T5ADAPT_ROOT or ./runs)")
    prepare.add_argument("--force", action="store_true", help="replace an existing output made from another config")

    train = commands.add_parser(
        "train", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="train the adapted model on prepared examples (Ray Train + DeepSpeed ZeRO)",
        description="Train an adapted encoder-decoder checkpoint on prepared UL2 / PrefixLM examples with\n"
                    "Ray Train's TorchTrainer and DeepSpeed ZeRO (train.zero_stage), on the embedded local\n"
                    "Ray (CPU workers, gloo) or a cluster (RAY_ADDRESS; train.use_gpu=true for NCCL + bf16).\n"
                    "Missing default inputs are produced first: prepare (ROOT/NAME/data), then adapt\n"
                    "(ROOT/NAME/adapted). Checkpoints (every train.checkpoint_every_steps, the newest\n"
                    "train.keep_checkpoints kept) go to ROOT/NAME/train/checkpoints, or train.storage=s3://...\n"
                    "At the end the final checkpoint is exported to ROOT/NAME/train/export, a Hugging Face\n"
                    "directory. Every run is an MLflow run (default store: ROOT/mlflow.db).",
        epilog="examples:\n  t5adapt train configs/tiny.yaml\n"
               "  t5adapt train configs/quickstart.yaml train.max_steps=200 train.zero_stage=3\n"
               "  RAY_ADDRESS=ray://head:10001 t5adapt train my.yaml train.use_gpu=true train.num_workers=16\n"
               "Re-running the same command resumes from the newest intact checkpoint; a worker that dies\n"
               "mid-run is restarted by Ray (train.max_failures times) from that checkpoint too.\n"
               "Browse runs: mlflow ui --backend-store-uri sqlite:///ROOT/mlflow.db")
    train.add_argument("config", metavar="CONFIG", help="YAML job config")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    train.add_argument("--root", help="run root (default: $T5ADAPT_ROOT or ./runs)")
    train.add_argument("--force", action="store_true",
                       help="delete checkpoints made from another training config and start over")

    export = commands.add_parser(
        "export", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="consolidate a training checkpoint's ZeRO shards into a Hugging Face directory",
        description="Consolidate the ZeRO shards of a training checkpoint (default: the newest intact one)\n"
                    "into a Hugging Face directory that plain transformers loads. `t5adapt train` does this\n"
                    "at the end; this command does it on demand, e.g. for an earlier checkpoint or while a\n"
                    "run is still going.",
        epilog="example:\n  t5adapt export configs/tiny.yaml --step 10 --out /tmp/tiny-step10")
    export.add_argument("config", metavar="CONFIG", help="the YAML job config the run was trained with")
    export.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    export.add_argument("--step", type=int, help="checkpoint step (default: the newest intact one)")
    export.add_argument("--out", help="output directory or s3:// prefix (default: STORAGE/export-stepN)")
    export.add_argument("--root", help="run root (default: $T5ADAPT_ROOT or ./runs)")

    config = commands.add_parser("config", help="inspect configs",
                                 description="Inspect job configs without running anything.")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_commands.add_parser("show", help="print the resolved config (defaults + file + overrides)",
                                      description="Print the fully resolved config, after validation.")
    show.add_argument("config", metavar="CONFIG")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def _adapt(args) -> None:
    from jobs.adapt.stage import run_adapt
    from orchestrator.config import default_root, load_config

    job = load_config(args.config, args.overrides)
    out = args.out or os.path.join(args.root or default_root(), job.name, "adapted")
    run_adapt(job.adapt, out, force=args.force, data_cfg=job.data)
    print(f"adapted checkpoint: {out}")


def _prepare(args) -> None:
    from jobs.data.stage import run_prepare
    from orchestrator.config import default_root, load_config
    from orchestrator.tracking import tracking_uri

    overrides = list(args.overrides)
    if args.corpus:
        overrides.append("data.corpus=[" + ",".join("{path: '%s'}" % p.replace("'", "''") for p in args.corpus) + "]")
    job = load_config(args.config, overrides)
    root = args.root or default_root()
    out = args.out or os.path.join(root, job.name, "data")
    metadata = run_prepare(job.data, job.data.tokenizer or job.adapt.source, out, force=args.force)
    if job.tracking.enabled:
        from jobs.data.stage import log_to_mlflow

        run_id = log_to_mlflow(job.tracking, root, job.name, metadata, out)
        print(f"MLflow run {run_id} at {tracking_uri(job.tracking, root)}")
    bad = metadata["bad_rows"]
    print(f"prepared {metadata['num_examples']} examples in {len(metadata['files'])} files "
          f"(padding {metadata['padding_fraction']:.1%}, bad rows skipped: {bad['total']} {bad['by_reason']}): {out}")


def _train(args) -> None:
    from jobs.train.stage import run_train
    from orchestrator.config import default_root, load_config

    job = load_config(args.config, args.overrides)
    summary = run_train(job, args.root or default_root(), force=args.force)
    diff = summary["probe_max_abs_diff"]
    print(f"trained to step {summary['step']}; checkpoints in {summary['storage']}/checkpoints")
    print(f"exported: {summary['export']}" + (f" (reproduces the trained logits, max |diff| {diff:.2g})" if diff is not None else ""))
    if summary["mlflow_run_id"]:
        print(f"MLflow run {summary['mlflow_run_id']}")


def _export(args) -> None:
    from jobs.train.stage import export_checkpoint
    from orchestrator.config import default_root, load_config

    job = load_config(args.config, args.overrides)
    info = export_checkpoint(job, args.root or default_root(), args.step, args.out)
    print(f"exported checkpoint step {info['step']}: {info['out']}")


def _config_show(args) -> None:
    from orchestrator.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")


def main(argv=None) -> int:
    parser = _parser()
    # Overrides may come after options (`t5adapt prepare CONFIG --out X key=value`), which argparse
    # alone does not take once the positionals are consumed.
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    handler = {"adapt": _adapt, "prepare": _prepare, "train": _train, "export": _export,
               "config": _config_show}[args.command]
    try:
        handler(args)
    except UserError as e:
        print(f"t5adapt: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"t5adapt: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
