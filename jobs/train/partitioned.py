"""ZeRO-3: build the model already partitioned, instead of whole on every rank and then split.

While a transformers `HfDeepSpeedConfig` is alive, from_pretrained builds the model inside
deepspeed.zero.Init (each parameter is partitioned as it is created) and loads the checkpoint one
module at a time: the module's parameters are gathered, rank 0 copies the values in, and they are
partitioned again. No rank ever holds the whole model, so deepspeed.initialize no longer casts the
whole model to bf16 and moves it to the device on every rank before partitioning it. On a CPU host
with an fp32 checkpoint this saves no host memory (README, "ZeRO-3 start-up memory"): the whole
load was only mapped page cache, and ZeRO-3's optimizer set-up is the peak either way.

A parameter built this way is a placeholder (its tensor has 0 elements); `full_shape` and
`full_numel` read the sizes DeepSpeed records on it, for code that looks at the model before
deepspeed.initialize (param_groups, count_parameters, FlopsModel).
"""

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def partitioned_build(cfg) -> Iterator[None]:
    """While open with train.zero_stage 3, transformers builds models inside deepspeed.zero.Init with
    the run's DeepSpeed config (so the same partitioning as deepspeed.initialize will use). Other
    stages: nothing changes. Needs the process group to be up."""
    if cfg.zero_stage != 3:
        yield
        return
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from jobs.train.deepspeed_config import build_deepspeed_config

    # zero.Init checks train_batch_size against DeepSpeed's own view of the world size, which is 1
    # until DeepSpeed adopts the process group (deepspeed.initialize would do it only later).
    deepspeed.init_distributed()
    # transformers keeps only a weak reference to it: the name keeps it alive while the block runs.
    marker = HfDeepSpeedConfig(build_deepspeed_config(cfg))
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del marker


def full_shape(param: torch.Tensor) -> tuple:
    """A parameter's shape, also when ZeRO-3 built it partitioned (its tensor is then a placeholder)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def full_numel(param: torch.Tensor) -> int:
    """A parameter's element count, also when ZeRO-3 built it partitioned."""
    return int(getattr(param, "ds_numel", param.numel()))
