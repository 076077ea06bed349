"""Reading source tensors one at a time, and writing target tensors shard by shard.

A sharded safetensors source is never loaded whole: the reader parses shard headers up front and
reads one tensor's bytes when asked (plain file reads, no mmap, so resident memory is only what we
hold). The writer buffers target tensors up to one shard, writes it, and lets them go.
"""

import hashlib
import json
import os
import struct
from typing import Dict, Iterable, List, Tuple

import numpy as np
import torch

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsReader:
    """Lazy reader over one .safetensors file or a directory of shards (with or without index)."""

    def __init__(self, files: Iterable[str]):
        self._where: Dict[str, Tuple[str, str, Tuple[int, ...], int, int]] = {}
        for path in files:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            base = 8 + header_len
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                self._where[name] = (path, info["dtype"], tuple(info["shape"]), base + start, base + end)

    def names(self) -> List[str]:
        return list(self._where)

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._where[name][2]

    def group(self, name: str) -> str:
        """The shard a tensor lives in: reading in shard order keeps the file cache warm."""
        return self._where[name][0]

    def get(self, name: str) -> torch.Tensor:
        path, dtype, shape, start, end = self._where[name]
        if dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {name} in {path} has dtype {dtype}, which t5adapt cannot read")
        buffer = bytearray(end - start)
        with open(path, "rb") as f:
            f.seek(start)
            f.readinto(buffer)
        if not buffer:
            return torch.empty(shape, dtype=_ST_DTYPES[dtype])
        return torch.frombuffer(buffer, dtype=_ST_DTYPES[dtype]).reshape(shape)


class GGUFTensorReader:
    """Dequantises one GGUF tensor when asked, with transformers' own name map and per-architecture
    processing (Gemma stores norm weights as 1 + w). The file is memory-mapped; nothing is
    dequantised up front, so the whole float32 model never sits in memory."""

    def __init__(self, path: str, hf_config):
        from gguf import GGUFReader
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        self._gguf = GGUFReader(path)
        architecture = bytes(self._gguf.fields["general.architecture"].parts[-1]).decode()
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=hf_config.to_dict())
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(hf_config)
        to_hf = get_gguf_hf_weights_map(skeleton, self._processor)
        self._tensors = {to_hf[t.name]: t for t in self._gguf.tensors if t.name in to_hf}

    def names(self) -> List[str]:
        return list(self._tensors)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name].shape))  # GGUF lists dims innermost first

    def group(self, name: str) -> str:
        return ""

    def get(self, name: str) -> torch.Tensor:
        tensor = self._tensors[name]
        weights = self._processor.process(weights=_dequantize_by_rows(tensor), name=tensor.name).weights
        return torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)).reshape(self.shape(name))


def _dequantize_by_rows(tensor, rows_per_chunk: int = 8192) -> np.ndarray:
    """gguf's dequantize allocates several temporaries the size of its output; feeding it row blocks
    into one preallocated float32 array keeps the peak at about one output tensor."""
    from gguf import dequantize

    data = tensor.data
    if data.ndim < 2 or data.shape[0] <= rows_per_chunk:
        return dequantize(data, tensor.tensor_type)
    first = dequantize(data[:rows_per_chunk], tensor.tensor_type)
    out = np.empty((data.shape[0],) + first.shape[1:], dtype=first.dtype)
    out[:rows_per_chunk] = first
    for start in range(rows_per_chunk, data.shape[0], rows_per_chunk):
        out[start:start + rows_per_chunk] = dequantize(data[start:start + rows_per_chunk], tensor.tensor_type)
    return out


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes as safetensors stores them (C order, little-endian on our machines).

    A view, not a copy: a 670 MB embedding is hashed and written without a second 670 MB.
    """
    data = tensor.detach().contiguous().cpu()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)  # numpy has no bfloat16; the bits are what we want
    return memoryview(data.numpy().reshape(-1).view(np.uint8))


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Checksum of a tensor's raw bytes (dtype and layout as stored), for the mapping manifest."""
    return hashlib.sha256(raw_bytes(tensor)).hexdigest()


_DTYPE_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class StreamingWriter:
    """Writes safetensors shards one tensor at a time: every shape is known from the plan, so each
    shard's header is written first and tensor bytes follow as they are produced. Memory held is one
    tensor, whatever the checkpoint size.

    Same layout as transformers' save_pretrained: model.safetensors, or
    model-0000K-of-0000N.safetensors plus model.safetensors.index.json.
    """

    def __init__(self, out_dir: str, specs: List[Tuple[str, Tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        shards: List[List[Tuple[str, Tuple[int, ...], torch.dtype, int]]] = [[]]
        shard_bytes = 0
        for name, shape, dtype in specs:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
                shards.append([])
                shard_bytes = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            shard_bytes += nbytes
        count = len(shards)
        self.files = ["model.safetensors"] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.out_dir = out_dir
        self.total_bytes = sum(n for shard in shards for *_, n in shard)
        self._order = [(i, name, shape, dtype) for i, shard in enumerate(shards) for name, shape, dtype, _ in shard]
        self._shards = shards
        self._next = 0
        self._file = None
        self._file_index = -1

    def _open_shard(self, index: int) -> None:
        if self._file:
            self._file.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype, nbytes in self._shards[index]:
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data start to 8 bytes
        self._file = open(os.path.join(self.out_dir, self.files[index] + ".part"), "wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._file_index = index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must come in plan order with the planned shape and dtype."""
        index, expected, shape, dtype = self._order[self._next]
        if name != expected or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"writer expected {expected} {shape} {dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        if index != self._file_index:
            self._open_shard(index)
        self._file.write(raw_bytes(tensor))
        self._next += 1

    def close(self) -> List[str]:
        """Finish the last shard, give shards their final names, write the index. Returns file names."""
        if self._next != len(self._order):
            raise RuntimeError(f"writer closed after {self._next} of {len(self._order)} tensors")
        self._file.close()
        for name in self.files:
            os.replace(os.path.join(self.out_dir, name + ".part"), os.path.join(self.out_dir, name))
        if len(self.files) > 1:
            weight_map = {name: self.files[i] for i, name, _, _ in self._order}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        return self.files
