"""Images and datasets shared by training and evaluation: decoding, the ImageFolder layout, tar shards, the
embedded digits tree, generated images, and the samplers that make runs reproducible across process counts.

Shards are WebDataset tars (one sample = `<key>.<image extension>` + `<key>.cls`, the class index as text) with an
index, `<split>.json`, in the format of the webdataset project's indexed reader (`wids`), which reads them with
random access: a shard dataset is a map-style dataset like an ImageFolder, and a run resumes from shards exactly,
at any step, as from folders. Opening a shard costs its reader a pass over the tar's headers (milliseconds per
1,000 samples: docs/performance.md), so a training epoch visits the shards `SHARDS_PER_CHUNK` at a time (shards in
a random order, samples shuffled within each run of them) rather than in one global shuffle, which would open a
shard per sample; the training split is written in a seeded random order, so that a run of shards is a random
sample of the classes.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import random
import re
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from .errors import DataError, error_line
from .files import cannot_write, check_output, generated_folder, input_problem, plain_name, write_text
from .runtime import DistEnv

CACHE = Path.home() / ".cache" / "convmixer_pt"
DIGITS_CACHE = CACHE / "digits"
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (seed, epoch, rank, ...), well mixed."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


@dataclass(frozen=True)
class Encoded:
    """An image's encoded bytes and the name errors give it (a shard sample: `shard.tar:key`)."""

    name: str
    data: bytes

    def __str__(self) -> str:
        return self.name


def load_image(source: str | Path | Encoded,
               before_decode: Callable[[Image.Image], None] | None = None) -> Image.Image:
    """PIL decode of a file or of encoded bytes to RGB; an image PIL cannot read, or one that would decompress
    to more pixels than PIL's limit (a decompression bomb), becomes one DataError naming it.

    `before_decode` sees the opened image (size and format known, pixels not decoded yet): where it may ask
    PIL for a reduced-size decode (`Image.draft`). An RGB image is returned as decoded, without the copy
    `convert("RGB")` would make."""
    try:
        with io.BytesIO(source.data) if isinstance(source, Encoded) else open(source, "rb") as f:
            img = Image.open(f)
            if before_decode is not None:
                before_decode(img)
            img.load()
            return img if img.mode == "RGB" else img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else error_line(e)
        raise DataError(f"{source}: cannot read the image ({reason})") from None


class Decoded:
    """`transform(load_image(path))`: a PIL transform (timm's, torchvision's) as a path transform."""

    def __init__(self, transform: Callable[[Image.Image], Any]) -> None:
        self.transform = transform

    def __call__(self, source: str | Path | Encoded) -> Any:
        return self.transform(load_image(source))


class ImageFolder(Dataset):
    """`root/<class>/<image>` with torchvision's rules (class folders sorted by name, files sorted, its image
    extensions); items are (transform(path), label). `samples` lists (path, label) in index order."""

    def __init__(self, root: str | Path, transform: Callable[[str], Any]) -> None:
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: data folder not found")
        try:
            self.classes, class_to_idx = find_classes(str(root))
        except FileNotFoundError:
            raise DataError(f"{root}: no images found: it holds no class folders (expected the ImageFolder "
                            "layout DIR/<class>/<image>)") from None
        self.samples = make_dataset(str(root), class_to_idx, IMG_EXTENSIONS, allow_empty=True)
        if not self.samples:
            raise DataError(f"{root}: no images found in its {len(self.classes)} class folders "
                            f"({', '.join(IMG_EXTENSIONS)})")
        self.root, self.transform = root, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        return self.transform(path), label

    def sample_name(self, index: int) -> str:
        """Where sample `index` comes from, relative to the root."""
        return os.path.relpath(self.samples[index][0], self.root)


IMAGE_FIELDS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm")
SHARD_INDEX_KIND = "wids-shard-index-v1"
SHARDS_PER_CHUNK = 8  # shards a training epoch reads at a time; each loader worker keeps two runs of them open
SHARD_SAMPLE_BYTES = 1024  # the fewest bytes a sample takes in a tar: two members' 512-byte headers


class ShardDataset(Dataset):
    """The samples of a shard index (`<split>.json`, see the module's docstring), read in place through the
    webdataset project's indexed reader; items are (transform(Encoded image), label), as an ImageFolder's.

    The index and its shards are checked against each other: shards are plain files inside the index's folder,
    each present, of the size the index recorded, and able to hold the samples it claims; a shard's sample
    count is checked against the tar when the shard is first read."""

    def __init__(self, index: str | Path, transform: Callable[[Encoded], Any]) -> None:
        import wids

        index = Path(index)
        shards, self.classes = read_shard_index(index)
        # Read in place, never copied into wids' cache; wids prints a summary of every dataset it opens.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            self.reader = wids.ShardListDataset(shards, localname=lambda url: url, transformations=[],
                                                lru_size=2 * SHARDS_PER_CHUNK)
        self.shards = shards
        self.shard_sizes = [s["nsamples"] for s in shards]
        self.starts = np.cumsum([0, *self.shard_sizes])
        self.root, self.transform = index, transform

    def __len__(self) -> int:
        return int(self.starts[-1])

    def sample_name(self, index: int) -> str:
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return f"{Path(self.shards[shard]['url']).name}:{index - self.starts[shard]}"

    def __getitem__(self, index: int) -> tuple[Any, int]:
        name = self.sample_name(index)
        try:
            tar, inner, desc = self.reader.get_shard(index)
        except Exception as e:  # a tar wids cannot index: tarfile's, mmap's and wids' own assertion errors
            raise DataError(f"{name.rpartition(':')[0]}: cannot read the shard ({type(e).__name__}: "
                            f"{error_line(e)[:200]})") from None
        if len(tar) != desc["nsamples"]:
            raise DataError(f"{self.root}: its shard {Path(desc['url']).name} holds {len(tar)} samples, the "
                            f"index says {desc['nsamples']} (write the split again with convmixer-make-shards)")
        sample = tar[inner]
        image = next((sample[k] for k in IMAGE_FIELDS if k in sample), None)
        try:
            label = int(sample[".cls"].read())
        except (KeyError, ValueError):
            raise DataError(f"{name}: the sample has no class (.cls) a number can be read from") from None
        if image is None:
            raise DataError(f"{name}: the sample has no image ({', '.join(IMAGE_FIELDS)})")
        if not 0 <= label < len(self.classes):
            raise DataError(f"{name}: class {label} is not one of the index's {len(self.classes)}")
        return self.transform(Encoded(name, image.read())), label


def read_shard_index(index: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The shards (url as an absolute path, nsamples) and classes of a shard index, checked against the files
    beside it; a DataError naming the index and the shard at fault otherwise."""
    problem = input_problem(index)
    if problem == "no such file":
        raise DataError(f"{index}: no shard index here (write one with convmixer-make-shards)")
    if problem:
        raise DataError(f"{index}: {problem}")
    try:
        spec = json.loads(index.read_text())
        entries, classes = spec["shardlist"], spec["classes"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{index}: not a shard index ({type(e).__name__}: {error_line(e)[:200]})") from None
    if not isinstance(entries, list) or not isinstance(classes, list) or \
            not all(isinstance(c, str) for c in classes):
        raise DataError(f"{index}: not a shard index (shardlist and classes must be lists, classes of names)")
    shards = [_checked_shard(index, entry) for entry in entries]
    if not shards:
        raise DataError(f"{index}: lists no samples")
    return shards, classes


def _checked_shard(index: Path, entry: Any) -> dict[str, Any]:
    """One shardlist entry as the reader takes it, after checking it against its file."""
    url = entry.get("url") if isinstance(entry, dict) else None
    nsamples = entry.get("nsamples") if isinstance(entry, dict) else None
    if not isinstance(url, str) or not url or Path(url).is_absolute() or ".." in Path(url).parts or "\0" in url:
        raise DataError(f"{index}: shard url {str(url)[:200]!r} is not a file name inside the index's folder")
    path = index.parent / url
    if isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples < 1:
        raise DataError(f"{index}: shard {url}: nsamples {str(nsamples)[:50]} is not a whole number of at least 1")
    problem = input_problem(path)
    if problem:
        raise DataError(f"{index}: its shard {url}: {'is missing' if problem == 'no such file' else problem}")
    size = path.stat().st_size
    recorded = entry.get("filesize")
    if recorded is not None and recorded != size:
        raise DataError(f"{index}: its shard {url} has {size} bytes, the index says {str(recorded)[:50]} (changed "
                        "since the index was written; write the split again with convmixer-make-shards)")
    if nsamples * SHARD_SAMPLE_BYTES > size:
        raise DataError(f"{index}: its shard {url} claims {nsamples} samples, more than its {size} bytes hold")
    return dict(url=str(path.resolve()), nsamples=nsamples)


def write_shards(folder: str | Path, out: str | Path, name: str, shard_size: int = 1000,
                 shuffle_seed: int | None = None, overwrite: bool = False) -> Path:
    """The ImageFolder `folder` as WebDataset tar shards `out/<name>-<tag>-NNNNNN.tar` of `shard_size` samples
    (the files' bytes as they are; in the ImageFolder's order, or in a random order drawn from `shuffle_seed`)
    and their index `out/<name>.json`, written last: a split without its index is not a dataset. A sample's key
    is its place in the ImageFolder's order.

    The index and its shards are written as a set: the shards under names no file has (a fresh `tag`), the
    index last; an existing index is replaced only with `overwrite`, and then the shards it listed that an
    earlier write made are removed. An interrupted write removes its own shards and leaves the old set as it
    was. No other file in `out` is touched."""
    import webdataset

    name = plain_name(name, "split")
    out = Path(out)
    index = out / f"{name}.json"
    check_output(index, overwrite)
    tree = ImageFolder(folder, transform=lambda path: path)
    order = np.arange(len(tree)) if shuffle_seed is None else \
        np.random.default_rng(shuffle_seed).permutation(len(tree))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cannot_write(out, e) from None
    tag = _fresh_tag(out, name)
    counts = [min(shard_size, len(tree) - first) for first in range(0, len(tree), shard_size)]
    urls = [f"{name}-{tag}-{k:06d}.tar" for k in range(len(counts))]
    try:
        with contextlib.redirect_stderr(io.StringIO()), webdataset.ShardWriter(
                str(out / f"{name}-{tag}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
            for source in order.tolist():
                path, label = tree.samples[source]
                sink.write({"__key__": f"{source:08d}", Path(path).suffix.lower().lstrip("."):
                            Path(path).read_bytes(), "cls": str(label).encode()})
        previous = _own_shards(index, name)
        write_shard_index(out, name, tree.classes, list(zip(urls, counts, strict=True)), overwrite=overwrite,
                          shuffle_seed=shuffle_seed)
    except BaseException:
        for url in urls:
            with contextlib.suppress(FileNotFoundError):
                (out / url).unlink()
        raise
    for url in sorted(set(previous) - set(urls)):
        with contextlib.suppress(FileNotFoundError):
            (out / url).unlink()
    return index


def _fresh_tag(out: Path, name: str) -> str:
    """A tag no file in `out` starts `<name>-<tag>-` with."""
    while True:
        tag = os.urandom(4).hex()
        if not any(out.glob(f"{glob.escape(name)}-{tag}-*")):
            return tag


def _own_shards(index: Path, name: str) -> list[str]:
    """The shards an existing index of this package lists under the names `write_shards` gives (this version's
    `<name>-<tag>-NNNNNN.tar` and the earlier `<name>-NNNNNN.tar`): the files a rewrite of the split may
    remove. Any other file, and every file of an index that is not this package's, is left alone."""
    try:
        spec = json.loads(index.read_text())
        urls = [s["url"] for s in spec["shardlist"]] if spec.get("__kind__") == SHARD_INDEX_KIND else []
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    own = re.compile(rf"{re.escape(name)}-([0-9a-f]{{8}}-)?\d{{6}}\.tar")
    return [u for u in urls if isinstance(u, str) and own.fullmatch(u)]


def write_shard_index(out: Path, name: str, classes: list[str], shards: list[tuple[str, int]],
                      overwrite: bool = False, **extra: Any) -> Path:
    """The index `out/<name>.json` of the shards `(file name in out, samples)`, as `ShardDataset` reads it, with
    each shard's size in bytes (`filesize`, wids' key) so that a reader can tell a shard that changed
    (`extra` keys are recorded beside it)."""
    index = dict(__kind__=SHARD_INDEX_KIND, wids_version=1, name=name, classes=classes, **extra,
                 shardlist=[dict(url=url, nsamples=n, filesize=(out / url).stat().st_size) for url, n in shards])
    write_text(out / f"{name}.json", json.dumps(index, indent=1) + "\n", overwrite=overwrite)
    return out / f"{name}.json"


DIGITS_SIGNATURE = (f"convmixer_pt digits: scikit-learn's 8x8 digits as PNGs, {DIGITS_VAL_FRACTION:.0%} val, "
                    f"split seed {DIGITS_SPLIT_SEED}")


def write_digits_imagefolder(root: str | Path) -> Path:
    """scikit-learn's 8x8 digits as grayscale PNGs in `root/{train,val}/{0..9}/`, written once
    (`files.generated_folder`: where nothing is, or reused when it is exactly this tree).

    The split is fixed (stratified, 20% val, seed 0).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split


    def write(tmp: Path) -> None:
        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        index = np.arange(len(images))
        train_idx, val_idx = train_test_split(index, test_size=DIGITS_VAL_FRACTION,
                                              random_state=DIGITS_SPLIT_SEED, stratify=digits.target)
        for split, idx in (("train", train_idx), ("val", val_idx)):
            for i in sorted(idx):
                folder = tmp / split / str(digits.target[i])
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")

    return generated_folder(root, DIGITS_SIGNATURE, write)


def write_generated_imagefolder(root: str | Path, classes: int, train_images: int, val_images: int,
                                seed: int = 0, shapes: Sequence[tuple[int, int]] | None = None) -> Path:
    """JPEG photographs' stand-ins in `root/{train,val}/<class>/`: sizes from 160 to 480 pixels a side (or
    `shapes`, (height, width) pairs taken in turn), low-frequency random content tinted by class, so that
    decoding, resizing and every augmentation run as on ImageNet without a dataset. Written once
    (`files.generated_folder`); the same arguments give the same files."""

    def write(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        palette = rng.uniform(0, 255, (classes, 3))
        for split, count in (("train", train_images), ("val", val_images)):
            for i in range(count):
                label = i % classes
                h, w = (int(v) for v in rng.integers(160, 481, 2)) if shapes is None else shapes[i % len(shapes)]
                coarse = rng.uniform(0, 255, (h // 32 + 2, w // 32 + 2, 3)).astype(np.uint8)
                smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.float64)
                pixels = 0.6 * smooth + 0.4 * palette[label] + rng.normal(0, 8, smooth.shape)
                folder = tmp / split / f"c{label:03d}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)

    signature = (f"convmixer_pt generated images: {classes} classes, {train_images} train and {val_images} val "
                 f"images, seed {seed}" + (f", shapes {list(shapes)}" if shapes is not None else ""))
    return generated_folder(root, signature, write)


class SyntheticImages(Dataset):
    """Random normalised images of a fixed size; image i is the same in every epoch and process."""

    def __init__(self, size: int, input_size: int, num_classes: int, seed: int) -> None:
        self.size, self.input_size, self.num_classes, self.seed = size, input_size, num_classes, seed
        self.classes = [str(c) for c in range(num_classes)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, i))
        return torch.randn(3, self.input_size, self.input_size, generator=g), i % self.num_classes


class SampleKey(NamedTuple):
    """What a training loader asks a `Seeded` dataset for: an index and the seed of that sample's augmentation."""

    index: int
    seed: int


@contextlib.contextmanager
def restored_rngs() -> Iterator[None]:
    """Python's, NumPy's and torch's global CPU generators as they were before the block, after it."""
    cpu = torch.default_generator
    states = random.getstate(), np.random.get_state(), cpu.get_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        cpu.set_state(states[2])


def seed_rngs(seed: int) -> None:
    """Python's, NumPy's and torch's global CPU generators seeded from `seed` (torch's CPU generator alone:
    `torch.manual_seed` would also seed every accelerator's, at ~100x the cost, per sample)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """The global CPU generators seeded from `seed` inside the block and restored after it, so that what runs
    inside draws the same numbers wherever and whenever it runs."""
    with restored_rngs():
        seed_rngs(seed)
        yield


class Seeded(Dataset):
    """A dataset whose item for `SampleKey(i, seed)` is item i with its transform's randomness (timm's draw from
    the three global generators) seeded from `seed`: a sample's augmentation depends on the run's seed, the
    epoch and its place in the epoch, not on which loader worker or process decodes it, nor on what ran before.
    That is what lets a run resume at any step exactly."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> Any:
        with seeded_rngs(key.seed):
            return self.dataset[key.index]

    def __getitems__(self, keys: list[SampleKey]) -> list[Any]:
        """A batch's items, as a DataLoader asks for them: each sample seeded as by `__getitem__`, the caller's
        generators saved and restored once per batch (NumPy's state alone costs ~80 us each way)."""
        items = []
        with restored_rngs():
            for key in keys:
                seed_rngs(key.seed)
                items.append(self.dataset[key.index])
        return items


class GlobalBatchSampler(Sampler[SampleKey]):
    """Per-epoch shuffled training samples, this process's share of every global batch, as `SampleKey`s.

    A global batch (batch_size x world_size x grad_accum images) is the same set of images whatever the
    process count: process r takes chunks r*accum .. r*accum+accum-1 of it. So 10 GPUs x 64, 8 GPUs x 80,
    and 8 GPUs x 40 x 2 accumulation steps see the same batches, and each sample's augmentation seed follows
    its place in the epoch, so they are augmented alike too. The incomplete last global batch is dropped.
    `set_epoch(epoch, start_step)` starts an epoch part-way, as a run resumed mid-epoch does. With `shards`
    (the samples per shard, in index order) the epoch's order is `chunked_order`'s.
    """

    def __init__(self, size: int, batch_size: int, grad_accum: int, env: DistEnv, seed: int,
                 shuffle: bool = True, shards: list[int] | None = None) -> None:
        self.shards = shards
        self.size, self.batch_size, self.grad_accum = size, batch_size, grad_accum
        self.rank, self.world_size, self.seed, self.shuffle = env.rank, env.world_size, seed, shuffle
        self.global_batch = batch_size * grad_accum * env.world_size
        self.steps = size // self.global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.batch_size * self.grad_accum

    def __iter__(self) -> Iterator[SampleKey]:
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=g).tolist() if self.shards is None else \
                chunked_order(self.shards, SHARDS_PER_CHUNK, g)
        else:
            order = list(range(self.size))
        share = self.batch_size * self.grad_accum
        for step in range(self.start_step, self.steps):
            start = step * self.global_batch + self.rank * share
            for place in range(start, start + share):
                yield SampleKey(order[place], derive_seed(self.seed, self.epoch, place))


def chunked_order(sizes: list[int], chunk: int, generator: torch.Generator) -> list[int]:
    """A random order of the samples of consecutive groups of `sizes` (shards) that reads `chunk` groups at a
    time: the groups in a random order, and the samples of each run of `chunk` of them shuffled together."""
    starts = np.cumsum([0, *sizes]).tolist()
    groups = torch.randperm(len(sizes), generator=generator).tolist()
    order: list[int] = []
    for first in range(0, len(groups), chunk):
        members = torch.cat([torch.arange(starts[k], starts[k + 1]) for k in groups[first:first + chunk]])
        order += members[torch.randperm(len(members), generator=generator)].tolist()
    return order


class RankSampler(Sampler[int]):
    """Indices rank, rank + world_size, ...: every image on exactly one process, no padding duplicates."""

    def __init__(self, size: int, env: DistEnv) -> None:
        self.indices = list(range(env.rank, size, env.world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def shelter_loader_worker(worker_id: int) -> None:
    """Every DataLoader's `worker_init_fn`. A stop signal or Ctrl-C is for the main process, which finishes or
    unwinds and then ends its workers; a worker that one killed first would fail the main process's next batch
    with a second error. So workers leave the main process's process group (signals sent to the group, a
    terminal's Ctrl-C, a scheduler's, pass them by) and ignore SIGUSR1 and Ctrl-C; SIGTERM keeps PyTorch's
    worker handler, with which the loader ends a worker that does not stop. Until a worker gets here it has the
    handlers it inherited from the main process: the CLIs' own ignore a signal in a process other than theirs."""
    os.setpgrp()
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
