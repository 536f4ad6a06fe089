"""How fast a training epoch reads tar shards, in the trainer's chunked order and in one global shuffle.

The shards are written as `make_shards` writes them (webdataset's ShardWriter, one `.jpg` + `.cls` per sample)
with small payloads: what is timed is the reader's work per sample (opening a shard, parsing its headers,
finding a sample), not decoding, which costs the same either way. One process, no loader workers.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..data import SHARDS_PER_CHUNK, ShardDataset, chunked_order, write_shard_index
from ..files import generated_folder


def write_test_shards(workdir: Path, shards: int, per_shard: int, payload: int = 100) -> Path:
    """`shards` tars of `per_shard` samples of `payload` bytes each, and their index, in a folder of their own
    in `workdir` (`files.generated_folder`: written once, reused, never over anything else)."""
    import webdataset

    def write(root: Path) -> None:
        data = bytes(range(256)) * (payload // 256 + 1)
        with contextlib.redirect_stderr(io.StringIO()), webdataset.ShardWriter(
                str(root / "train-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
            for i in range(shards * per_shard):
                sink.write({"__key__": f"{i:08d}", "jpg": data[:payload], "cls": b"0"})
        write_shard_index(root, "train", ["0"], [(f"train-{k:06d}.tar", per_shard) for k in range(shards)])

    name = f"shard-benchmark-{shards}x{per_shard}x{payload}"
    signature = f"convmixer_pt shard benchmark: {shards} shards of {per_shard} samples of {payload} bytes"
    return generated_folder(workdir / name, signature, write) / "train.json"


def shard_read_times(workdir: Path, shards: int = 160, per_shard: int = 1000, reads: int = 4000, seed: int = 0,
                     log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Samples per second over the first `reads` samples of an epoch, per order; and the cost of one shard's
    first read (its opening), averaged over 20 shards."""
    index = write_test_shards(Path(workdir), shards, per_shard)
    rows = []
    dataset = ShardDataset(index, transform=lambda encoded: len(encoded.data))
    start = time.perf_counter()
    opened = min(20, shards)
    for k in range(opened):
        dataset[k * per_shard]
    rows.append(dict(what="open a shard (first read)", ms=(time.perf_counter() - start) / opened * 1e3,
                     per_shard=per_shard))
    log(f"opening a shard of {per_shard} samples: {rows[-1]['ms']:.2f} ms")
    for order_name in ("global shuffle", "chunked"):
        dataset = ShardDataset(index, transform=lambda encoded: len(encoded.data))
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(dataset), generator=g).tolist() if order_name == "global shuffle" else \
            chunked_order(dataset.shard_sizes, SHARDS_PER_CHUNK, g)
        start = time.perf_counter()
        for i in order[:reads]:
            dataset[i]
        elapsed = time.perf_counter() - start
        rows.append(dict(what=f"read in {order_name} order", samples_per_s=reads / elapsed,
                         ms=elapsed / reads * 1e3, shards=shards, per_shard=per_shard, reads=reads))
        log(f"{order_name}: {reads / elapsed:.0f} samples/s, {elapsed / reads * 1e3:.3f} ms per sample")
    return rows
