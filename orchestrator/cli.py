"""The `t5adapt` command line. Exit codes: 0 success, 2 user error (one clear line), 1 anything else."""

import argparse
import logging
import os
import sys

from jobs.core.errors import RunFailed, UserError

_EPILOG = """examples:
  t5adapt run configs/quickstart.yaml                    # the whole pipeline on the real Gemma 3 270M
  t5adapt run configs/tiny.yaml train.lr=0.001           # only train, evaluate and export run again
  t5adapt sweep configs/sweep_tiny.yaml                  # pairings x learning rates under Ray Tune
  t5adapt ls                                             # runs under the root, their stages and loss
  t5adapt show quickstart                                # one run: stage keys, states, timings, paths
  t5adapt ui                                             # the MLflow UI on the run store (127.0.0.1)
  t5adapt submit configs/tiny.yaml --address http://127.0.0.1:8265   # the same run as a Ray job
  t5adapt jobs                                           # t5adapt jobs on the cluster ($RAY_ADDRESS)
  t5adapt adapt configs/tiny.yaml adapt.encoder_layers=every:2 --out /tmp/tiny-adapted
  t5adapt config show configs/quickstart.yaml adapt.dtype=bfloat16

Any config key can be overridden as key=value (dotted keys, e.g. adapt.decoder_layers=first:6).
The run root is --root, else $T5ADAPT_ROOT, else ./runs. Stage outputs are content-addressed:
ROOT/stages/<stage>-<key>, where the key covers the config fields that change the output and the
keys of its inputs; re-running reuses finished stages and resumes the first unfinished one.
"""

_ROOT_HELP = "run root: run directories, the stage store and mlflow.db (default: $T5ADAPT_ROOT or ./runs)"


def _job_command(commands, name: str, help: str, description: str, epilog: str):
    command = commands.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter, help=help,
                                  description=description, epilog=epilog)
    command.add_argument("config", metavar="CONFIG", help="YAML job config, e.g. configs/quickstart.yaml")
    command.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    command.add_argument("--root", help=_ROOT_HELP)
    return command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="t5adapt", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="Turn decoder-only Gemma models into T5Gemma-style encoder-decoder models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every tensor mapping and debug detail")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _job_command(
        commands, "run", "the whole adaptation: prepare -> adapt -> train -> evaluate -> export",
        "Run one adaptation as content-addressed, resumable stages:\n"
        "  prepare   corpus -> UL2 / PrefixLM examples on Ray Data, with a held-out part\n"
        "  adapt     decoder-only source(s) -> encoder-decoder checkpoint (T5Gemma / T5Gemma 2)\n"
        "  train     Ray Train + DeepSpeed ZeRO, checkpoints, the final model consolidated\n"
        "  evaluate  held-out loss (per denoiser), the adaptation probe, inference cost, samples\n"
        "  export    a Hugging Face directory with a model card\n"
        "Each stage's output lives at STORE/<stage>-<key> (default STORE: ROOT/stages); a finished one\n"
        "is reused by any run whose stage key is equal, and one being built is locked, so concurrent\n"
        "runs wait for each other instead of building it twice. ROOT/NAME holds the resolved config\n"
        "and a ledger; every run is an MLflow parent run with a nested run per stage.",
        "examples:\n  t5adapt run configs/quickstart.yaml\n  t5adapt run configs/tiny.yaml --root /tmp/runs train.max_steps=60\n"
        "  RAY_ADDRESS=ray://head:10001 t5adapt run my.yaml store=s3://bucket/t5adapt train.use_gpu=true\n"
        "Interrupted (Ctrl-C, a crash, a lost node)? Run the same command again: finished stages are\n"
        "reused and training resumes from its newest intact checkpoint.")

    adapt = _job_command(
        commands, "adapt", "build an encoder-decoder checkpoint from decoder-only checkpoint(s)",
        "Build an encoder-decoder Hugging Face directory from decoder-only checkpoint(s):\n"
        "Gemma 3 -> T5Gemma 2 (shared embedding, merged attention), Gemma 2 -> T5Gemma\n"
        "(balanced, or unbalanced with adapt.decoder_source). Writes safetensors, config,\n"
        "tokenizer, a model card and adapt_manifest.json (every tensor's source and checksum).\n"
        "Sources: a local directory, an s3:// prefix, a .gguf file, or builtin:gemma3-270m.",
        "the output loads with transformers.AutoModelForSeq2SeqLM.from_pretrained(OUT).\n"
        "Re-running with the same config reuses a finished output.")
    adapt.add_argument("--out", help="output directory or s3:// prefix (default: ROOT/stages/adapt-KEY)")
    adapt.add_argument("--force", action="store_true", help="replace an --out made from another config")

    prepare = _job_command(
        commands, "prepare", "turn a text corpus into UL2 / PrefixLM training examples (Ray Data)",
        "Read a text corpus (JSON Lines, Parquet or plain text, also .gz / .zst compressed; local\n"
        "paths, globs or s3:// prefixes), tokenize it with the source model's tokenizer on Ray Data,\n"
        "set aside a held-out part (data.heldout_fraction, by document), pack documents and build UL2\n"
        "(mixture of denoisers) or PrefixLM examples. Writes Parquet shards, heldout/, metadata.json\n"
        "(tokenizer, sentinel ids, denoiser table, lengths, bad-row counts) and COMMITTED.\n"
        "Bad rows are skipped and counted per reason and file. Output is byte-identical for the same\n"
        "config, whatever the number of workers.",
        "examples:\n  t5adapt prepare configs/tiny.yaml\n"
        "  t5adapt prepare configs/quickstart.yaml --corpus 'data/*.jsonl.gz' data.encoder_length=1024\n"
        "Runs on the embedded local Ray unless RAY_ADDRESS points at a cluster.")
    prepare.add_argument("--corpus", action="append", metavar="PATH",
                         help="corpus file, glob, directory or s3:// prefix (repeatable; replaces data.corpus)")
    prepare.add_argument("--out", help="output directory or s3:// prefix (default: ROOT/stages/prepare-KEY)")
    prepare.add_argument("--force", action="store_true", help="replace an --out made from another config")

    _job_command(
        commands, "train", "prepare, adapt and train (the stages of `run` up to train)",
        "Run the stages of `t5adapt run` up to training: prepare and adapt (reused when finished),\n"
        "then Ray Train's TorchTrainer with DeepSpeed ZeRO (train.zero_stage) on the embedded local\n"
        "Ray (CPU workers, gloo) or a cluster (RAY_ADDRESS; train.use_gpu=true for NCCL + bf16).\n"
        "Checkpoints (every train.checkpoint_every_steps, the newest train.keep_checkpoints kept) go\n"
        "to STORE/train-KEY/checkpoints; the final one is consolidated into STORE/train-KEY/model.",
        "examples:\n  t5adapt train configs/tiny.yaml\n"
        "  t5adapt train configs/quickstart.yaml train.max_steps=200 train.zero_stage=3\n"
        "Re-running the same command resumes from the newest intact checkpoint; a worker that dies\n"
        "mid-run is restarted by Ray (train.max_failures times) from that checkpoint too.")

    export = _job_command(
        commands, "export", "the trained model as a Hugging Face directory (or any checkpoint with --step)",
        "Without --step: the stages of `t5adapt run` (reused when finished), with the export copied\n"
        "to --out. With --step N: consolidate the ZeRO shards of training checkpoint N of this\n"
        "config's train stage into a Hugging Face directory, e.g. while the run is still going.",
        "examples:\n  t5adapt export configs/tiny.yaml --out /tmp/tiny-model\n"
        "  t5adapt export configs/tiny.yaml --step 10 --out /tmp/tiny-step10")
    export.add_argument("--step", type=int, help="a training checkpoint's step (default: the finished run)")
    export.add_argument("--out", help="output directory or s3:// prefix")

    sweep = commands.add_parser(
        "sweep", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="many runs under Ray Tune: encoder/decoder pairings x hyper-parameters, and the frontier",
        description="Run a sweep: every pairing (explicit encoder/decoder sources, or a grid over encoder and\n"
        "decoder depth) x every hyper-parameter setting (Tune search spaces in YAML) is one trial, and\n"
        "every trial is a `t5adapt run` of its own config: stages that trials share are built once.\n"
        "scheduler.type=asha stops trials whose held-out loss lags at a checkpoint. At the end: the\n"
        "quality-vs-inference-cost frontier (probe cross-entropy against generate latency and total\n"
        "parameters, Pareto-optimal trials marked, the source decoder-only model as a reference) as\n"
        "a table, ROOT/sweeps/ID/frontier.csv and frontier.png, all logged to the sweep's MLflow run.",
        epilog="examples:\n  t5adapt sweep configs/sweep_tiny.yaml\n"
        "  t5adapt sweep configs/sweep_quickstart.yaml max_concurrent_trials=1 scheduler.type=asha\n"
        "  t5adapt ls --sweep sweep-tiny        # trials, states and metrics (also while it runs)\n"
        "Overrides set sweep config keys; `overrides.train.max_steps=50` reaches every trial's run config.\n"
        "Interrupted? Run the same command again: finished trials are kept, the unfinished one resumes.")
    sweep.add_argument("config", metavar="SWEEP_CONFIG", help="YAML sweep config, e.g. configs/sweep_tiny.yaml")
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help="sweep config overrides")
    sweep.add_argument("--root", help=_ROOT_HELP)

    ls = commands.add_parser("ls", help="list the runs (or a sweep's trials) under the root",
                             description="A table of the runs under the root: name, pairing, each stage's state, "
                                         "held-out loss, last update. With --sweep: that sweep's trials.")
    ls.add_argument("--root", help=_ROOT_HELP)
    ls.add_argument("--sweep", metavar="ID", help="a sweep's ID or name (ROOT/sweeps/ID): list its trials")
    show = commands.add_parser("show", help="one run's stages, keys, states, timings and paths",
                               description="One run in full: run key, MLflow run, and per stage its key, state, "
                                           "timing, main numbers and output location.")
    show.add_argument("run", metavar="RUN", help="the run's name (config key `name`)")
    show.add_argument("--root", help=_ROOT_HELP)
    ui = commands.add_parser("ui", help="open the MLflow UI on the run store (bound to 127.0.0.1)",
                             description="Start the MLflow UI on the root's tracking store, bound to 127.0.0.1, "
                                         "and print its URL. Ctrl-C stops it.")
    ui.add_argument("--root", help=_ROOT_HELP)
    ui.add_argument("--port", type=int, default=5000, help="port (default 5000)")

    address_help = "the cluster's Ray dashboard, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)"
    submit = commands.add_parser(
        "submit", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="send a run (or with --sweep, a sweep) to a Ray cluster as a Ray job",
        description="Validate CONFIG here, then run `t5adapt run` (or `sweep`) on a Ray cluster through the Ray\n"
        "Jobs API. The job ships the project's code (orchestrator/, jobs/) and the resolved config, nothing\n"
        "else of this directory; the cluster must have the dependencies installed (cluster/). Forwarded\n"
        "environment: MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL(_S3), AWS_REGION, AWS_DEFAULT_REGION; never\n"
        "credentials (the nodes use their own AWS chain).\n"
        "The cluster: --address, else $RAY_ADDRESS, else the config's submit.address. Token authentication:\n"
        "the token is read from $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token.",
        epilog="examples:\n  cluster/local/up.sh        # a local head with token auth + an MLflow server; prints the exports\n"
        "  t5adapt submit configs/tiny.yaml train.max_steps=4\n"
        "  t5adapt submit --sweep configs/sweep_tiny.yaml --root /shared/t5adapt-runs\n"
        "  t5adapt logs JOB --follow; t5adapt status JOB; t5adapt stop JOB; t5adapt jobs\n"
        "The run root on the cluster: --root, else submit.root, else $T5ADAPT_ROOT on the head, else\n"
        "~/t5adapt-runs there. On several nodes put the stage store on s3:// (store=s3://BUCKET/PREFIX).")
    submit.add_argument("config", metavar="CONFIG", help="run config (or sweep config with --sweep)")
    submit.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    submit.add_argument("--sweep", action="store_true", help="CONFIG is a sweep config: submit `t5adapt sweep`")
    submit.add_argument("--address", help=address_help)
    submit.add_argument("--root", help="the run root on the cluster (default: submit.root, $T5ADAPT_ROOT there, ~/t5adapt-runs)")
    status = commands.add_parser("status", help="a submitted job's status (default: the newest t5adapt job)",
                                 description="The status of a submitted job, or of the newest t5adapt job.")
    status.add_argument("job", nargs="?", metavar="JOB", help="job id, as printed by submit")
    logs = commands.add_parser("logs", help="a submitted job's output", description="Print a job's output so far; "
                               "with --follow, stream it until the job ends (exit 1 if it did not succeed).")
    logs.add_argument("job", metavar="JOB")
    logs.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    stop = commands.add_parser("stop", help="stop a submitted job", description="Stop a job and wait until "
                               "Ray reports it stopped. Finished stages and checkpoints stay: submitting the "
                               "same config again resumes.")
    stop.add_argument("job", metavar="JOB")
    jobs_command = commands.add_parser("jobs", help="the t5adapt jobs on the cluster",
                                       description="A table of the t5adapt jobs on the cluster: id, kind, status, start, name.")
    for command in (status, logs, stop, jobs_command):
        command.add_argument("--address", help=address_help)

    config = commands.add_parser("config", help="inspect configs",
                                 description="Inspect job configs without running anything.")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_commands.add_parser("show", help="print the resolved config (defaults + file + overrides)",
                                      description="Print the fully resolved config, after validation.")
    show.add_argument("config", metavar="CONFIG")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def _load(args, extra_overrides=()):
    from orchestrator.config import default_root, load_config

    return load_config(args.config, list(args.overrides) + list(extra_overrides)), args.root or default_root()


def _run_stages(args, stages, outputs=None, force=False):
    from jobs.core.tracking import tracking_uri
    from orchestrator import report
    from orchestrator.controller import run

    job, root = _load(args)
    current = run(job, root, stages, outputs={k: v for k, v in (outputs or {}).items() if v}, force=force)
    print()
    print(report.summary(current, tracking_uri(job.tracking, root) if job.tracking.enabled else None))
    return current


def _run(args) -> None:
    _run_stages(args, ("prepare", "adapt", "train", "evaluate", "export"))


def _adapt(args) -> None:
    current = _run_stages(args, ("adapt",), {"adapt": args.out}, force=args.force)
    print(f"adapted checkpoint: {current.stages['adapt'].output}")


def _prepare(args) -> None:
    if args.corpus:
        args.overrides = list(args.overrides) + [
            "data.corpus=[" + ",".join("{path: '%s'}" % p.replace("'", "''") for p in args.corpus) + "]"]
    current = _run_stages(args, ("prepare",), {"prepare": args.out}, force=args.force)
    metadata = current.results["prepare"]
    bad = metadata["bad_rows"]
    print(f"prepared {metadata['num_examples']} examples in {len(metadata['files'])} files "
          f"(padding {metadata['padding_fraction']:.1%}, bad rows skipped: {bad['total']} {bad['by_reason']}): "
          f"{current.stages['prepare'].output}")


def _train(args) -> None:
    current = _run_stages(args, ("prepare", "adapt", "train"))
    result = current.results["train"]
    diff = result.get("probe_max_abs_diff")
    print(f"trained to step {result['step']}; model: {result['model']}"
          + (f" (reproduces the trained logits, max |diff| {diff:.2g})" if diff is not None else ""))


def _export(args) -> None:
    if args.step is None:
        extra = [f"export.out={args.out}"] if args.out else []
        args.overrides = list(args.overrides) + extra
        current = _run_stages(args, ("prepare", "adapt", "train", "evaluate", "export"))
        print(f"exported: {args.out or current.stages['export'].output}")
        return
    from jobs.core import storage
    from jobs.train.stage import export_checkpoint
    from orchestrator import keys

    from orchestrator.controller import check_output_location

    job, root = _load(args)
    check_output_location(args.out, "--out")
    stages = keys.plan_stages(job, root, keys.denoising_plan(job))
    train = stages["train"].output
    out = args.out or storage.join(train, f"export-step{args.step}")
    info = export_checkpoint(train, stages["adapt"].output, args.step, out)
    print(f"exported checkpoint step {info['step']}: {info['out']}")


def _ls(args) -> None:
    from orchestrator import report
    from orchestrator.config import default_root

    if args.sweep:
        from orchestrator.sweep import ls_sweep

        print(ls_sweep(args.root or default_root(), args.sweep))
        return
    print(report.ls(args.root or default_root()))


def _sweep(args) -> None:
    from orchestrator.config import default_root
    from orchestrator.sweep import run_sweep
    from orchestrator.sweep_config import load_sweep

    root = args.root or default_root()
    result = run_sweep(load_sweep(args.config, args.overrides), root)
    print(f"\nsweep {result['id']}: {len(result['trials'])} trial(s); list them: t5adapt ls --sweep {result['id']}"
          + (f" --root {root}" if args.root else ""))
    if result["mlflow_run_id"]:
        print(f"MLflow run {result['mlflow_run_id']}; browse it: t5adapt ui --root {root}")


def _show(args) -> None:
    from orchestrator import report
    from orchestrator.config import default_root

    print(report.show(args.root or default_root(), args.run))


def _ui(args) -> None:
    import subprocess

    from jobs.core.tracking import TrackingConfig, experiment_id, tracking_uri
    from orchestrator.config import default_root

    root = args.root or default_root()
    uri = tracking_uri(TrackingConfig(), root)
    if uri.startswith("sqlite:///") and not os.path.isfile(uri[len("sqlite:///"):]):
        raise UserError(f"no MLflow store at {uri}: run something first (t5adapt run CONFIG --root {root})")
    base = f"http://127.0.0.1:{args.port}"
    # MLflow 3's UI opens an experiment on its GenAI overview (no runs) unless the route asks for the
    # model-training runs table; sorted by name, nested runs (stages, sweep trials) are listed too.
    runs = (f"{base}/#/experiments/{experiment_id(TrackingConfig(), root)}/runs?workflowType=machine_learning"
            "&orderByKey=tags.%60mlflow.runName%60&orderByAsc=true")
    print(f"MLflow UI for {uri}: {base}  (Ctrl-C stops it)\nthe runs: {runs}", flush=True)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", str(args.port)]
    if uri.startswith("sqlite:///"):
        command += ["--default-artifact-root", os.path.join(os.path.abspath(root), "mlartifacts")]
    subprocess.run(command, check=False)


def _submit(args) -> None:
    from orchestrator.submit import submit

    submit("sweep" if args.sweep else "run", args.config, args.overrides, args.address, args.root)


def _cluster(args):
    from orchestrator.submit import Cluster, resolve_address

    return Cluster(resolve_address(args.address))


def _status(args) -> None:
    from orchestrator.submit import status_text

    print(status_text(_cluster(args), args.job))


def _logs(args) -> None:
    cluster = _cluster(args)
    if not args.follow:
        print(cluster.logs(args.job), end="")
        return
    status = cluster.follow(args.job, lambda text: print(text, end="", flush=True))
    print(f"\njob {args.job}: {status}")
    if status != "SUCCEEDED":
        raise RunFailed(f"job {args.job} ended {status} (t5adapt status {args.job})")


def _stop(args) -> None:
    print(f"job {args.job}: {_cluster(args).stop(args.job)}")


def _jobs(args) -> None:
    from orchestrator.submit import jobs_table

    print(jobs_table(_cluster(args)))


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
    handler = {"run": _run, "adapt": _adapt, "prepare": _prepare, "train": _train, "export": _export, "ls": _ls,
               "sweep": _sweep, "submit": _submit, "status": _status, "logs": _logs, "stop": _stop, "jobs": _jobs,
               "show": _show, "ui": _ui, "config": _config_show}[args.command]
    try:
        handler(args)
    except UserError as e:
        print(f"t5adapt: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"t5adapt: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nt5adapt: interrupted. Finished stages and training checkpoints are kept; run the same "
              "command again to resume.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
