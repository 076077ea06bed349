"""Ray Train's per-worker function: a thin adapter from Ray's context to loop.train."""

import os


def train_loop_per_worker(config: dict) -> None:
    """config = {"spec": RunSpec}. Sets the worker's environment, builds the WorkerContext, trains."""
    spec = config["spec"]
    os.environ.update(spec.env)
    if not spec.train.use_gpu:
        # DeepSpeed picks its accelerator at import: it must see this first (and gloo, set by the trainer).
        os.environ["DS_ACCELERATOR"] = "cpu"
    import ray.train
    import torch

    from jobs.core.examples_io import make_collate, read_metadata
    from jobs.train import batches
    from jobs.train.loop import WorkerContext, train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if spec.train.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()  # right under shared or fractional GPUs too
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(spec.train.cpus_per_worker)))
    first, end = batches.rank_rows(spec.num_examples, rank, world)
    metadata = read_metadata(spec.data_dir)
    reader = batches.RankReader(spec.data_dir, metadata, first, end, spec.teacher_dir or None)
    per_epoch = batches.batches_per_epoch(spec.num_examples, world, spec.train.micro_batch_size, spec.data_dir)
    collate = make_collate(spec.encoder_length, spec.decoder_length, spec.pad_id)
    if spec.train.distill.enabled:
        from jobs.train.distill import with_teacher

        collate = with_teacher(collate, spec.train.distill, metadata, spec.decoder_length)

    def micro_batches(start: int):
        return batches.micro_batches(reader, start, per_epoch, spec.train.micro_batch_size, spec.train.seed, rank,
                                     collate)

    train(WorkerContext(rank=rank, world_size=world, device=device, micro_batches=micro_batches,
                        report=lambda metrics: ray.train.report(metrics)), spec)
