"""Atomic writes: every file this package writes appears under its name complete, or not at all.

A file is written to one hidden staging file beside it, `.partial-<host>-<pid>-<random>-<name>`, and renamed
onto its name when complete. The staging file is removed on every exit Python sees (an exception, Ctrl-C, and
SIGTERM, which the CLIs turn into an exception); one left by a killed process is removed by the next write of
the same name on the same host, once that process is gone. Outputs get the permissions the umask gives, as
`open` would, whatever the writing library did to its file.

YAML a user gives (a config file, a run's args.yaml, a --model-args value) is read through `parse_yaml`, which
checks the document before building it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError, brief, error_line

STAGING_PREFIX = ".partial-"


class OutputExistsError(UserError):
    """An output that exists already and was not to be overwritten."""


class WriteError(UserError):
    """An output that could not be written: a full disk, a file size limit, a read-only folder."""


def _host_prefix() -> str:
    return f"{STAGING_PREFIX}{socket.gethostname().replace('-', '_')}-"


def remove_stale_staging(path: Path) -> list[Path]:
    """Staging files of `path` left beside it by processes of this host that no longer run."""
    removed = []
    host_prefix = _host_prefix()
    for candidate in path.parent.glob(f"{STAGING_PREFIX}*-{path.name}"):
        if not candidate.name.startswith(host_prefix):
            continue  # another host's, or another naming: not ours to judge
        pid = candidate.name[len(host_prefix):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):
            candidate.unlink()
            removed.append(candidate)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a hidden staging path beside `path`; it replaces `path` only if the block finishes.

    The staging name ends like `path`'s, so a staged file can be read back, e.g. verified, before it takes
    its real name.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise OutputExistsError(f"{path}: already exists (use --force to overwrite)")
    if path.is_dir():
        raise WriteError(f"{path}: is a folder, not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(path)
        fd, tmp = tempfile.mkstemp(prefix=f"{_host_prefix()}{os.getpid()}-", suffix=f"-{path.name}", dir=path.parent)
    except OSError as e:
        raise cannot_write(path, e) from None
    os.close(fd)
    try:
        yield Path(tmp)
        if not overwrite and path.exists():
            raise OutputExistsError(f"{path}: appeared while it was being written; not overwritten (use --force)")
        os.chmod(tmp, _umask_mode())  # mkstemp makes 0600, and some writers replace the file with their own
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def check_output(path: str | Path) -> None:
    """Refuse, before any work is done, an output path that cannot become a file: a folder, or one below a
    file."""
    path = Path(path)
    if path.is_dir():
        raise WriteError(f"{path}: is a folder, not a file")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise WriteError(f"{path}: {parent} is a file, not a folder")
            return


def cannot_write(path: str | Path, error: BaseException) -> WriteError:
    """One line for a failed write. PyTorch and safetensors report a full disk in their own words (a
    RuntimeError from torch.save), so a nearly full disk is named as the likely cause."""
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    else:
        reason = error_line(error)
        with contextlib.suppress(OSError):
            if shutil.disk_usage(Path(path).parent).free < 2**20:
                reason = f"no space left on the device; {reason}"
    return WriteError(f"{path}: cannot write it ({reason})")


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a writer's failure (OSError, or what PyTorch and safetensors raise) into a WriteError naming the
    file; wrap only the write itself, so that no other failure is taken for one."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # OSError, torch.save's RuntimeError, safetensors' SafetensorError: no common base
        raise cannot_write(path, e) from None


def write_text(path: str | Path, text: str) -> None:
    """`text` into `path`, atomically."""
    with atomic_path(path) as tmp, writing(path):
        tmp.write_text(text)


# A config or run record holds tens of values; an alias bomb (anchors that repeat anchors) holds billions once
# expanded, which every repr, copy or dump then pays for.
MAX_YAML_NODES = 100_000


class YAMLRefused(yaml.YAMLError):
    """A YAML document refused before it is built: a key given twice, an expansion beyond MAX_YAML_NODES, an
    alias cycle, nesting deeper than the parser recurses, a number of more digits than Python reads."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that checks the whole node graph before building objects from it, and refuses a
    mapping key given twice (YAML forbids it; PyYAML would keep the last)."""

    def construct_document(self, node: yaml.Node) -> Any:
        size = _expanded_size(node)
        if size > MAX_YAML_NODES:
            raise YAMLRefused(f"it expands to more than {MAX_YAML_NODES:,} values (aliases repeating aliases)")
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys merged in from `<<` may be overridden: that is what merging is for
            key = self.construct_object(key_node, deep=deep)
            try:
                twice = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key, which the base constructor reports
                continue
            if twice:
                raise YAMLRefused(f"key {brief(key)} is given twice (line {key_node.start_mark.line + 1})")
        return super().construct_mapping(node, deep)


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes the document has once every alias is expanded, counted without expanding anything and
    without recursion; stops counting past MAX_YAML_NODES."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else \
            list(node.value) if isinstance(node, yaml.SequenceNode) else []
        if finished:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[id(node)] > MAX_YAML_NODES:
                return sizes[id(node)]
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_nodes:
            raise YAMLRefused("an alias refers to a node that contains it (a cycle)")
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)
    return sizes[id(root)]


def parse_yaml(text: str) -> Any:
    """One YAML document as plain data (PyYAML's safe types), refused with a yaml.YAMLError if it repeats a
    key, expands beyond MAX_YAML_NODES values or nests deeper than PyYAML's recursive parser can go."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except RecursionError:
        raise YAMLRefused("it nests values too deeply") from None
    except ValueError as e:  # int() of a number with thousands of digits
        if isinstance(e, yaml.YAMLError):
            raise
        raise YAMLRefused(error_line(e)) from None
