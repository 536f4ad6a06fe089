"""The one rule for every output, and atomic writes: every file this package writes appears under its name
complete, or not at all, and replaces only a regular file it was allowed to replace.

A file is written to one hidden staging file beside it, `.partial-<host>-<pid>-<random>-<name>` (a long name
shortened to a hash and its end, so that the staging name fits the file system's 255 bytes), and renamed
onto its name when complete. The staging file is removed on every exit Python sees (an exception, Ctrl-C, and
SIGTERM, which the CLIs turn into an exception); one left by a killed process is removed by the next write of
the same name on the same host, once that process is gone. Outputs get the permissions the umask gives, as
`open` would, whatever the writing library did to its file.

An existing output is replaced only when the caller says so (a command's --force or --overwrite), and never
when it is not a regular file (a folder, a symbolic link, a FIFO, a device): `--json /dev/null` run as root
must not replace /dev/null. A folder a command generates (`generated_folder`) is created only where nothing
is, or reused when a marker in it says it is exactly that folder; it is never emptied.

YAML a user gives (a config file, a run's args.yaml, a --model-args value) is read through `parse_yaml`, which
checks the document before building it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError, brief, error_line

STAGING_PREFIX = ".partial-"
NAME_MAX = 255  # bytes in a file name on Linux's and macOS's file systems
_LONG_NAME = 150  # a name longer than this (in bytes) is shortened in its staging name
MARKER = ".convmixer-generated"  # in a generated folder: what wrote it, and with which arguments


class OutputExistsError(UserError):
    """An output that exists already and was not to be overwritten."""


class WriteError(UserError):
    """An output that could not be written: a full disk, a file size limit, a read-only folder, a path that is
    not a regular file."""


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def kind(mode: int) -> str:
    """What a file of this `st_mode` is, in words: 'a regular file', 'a folder', 'a FIFO', ..."""
    return next((name for test, name in _KINDS if test(mode)), "a regular file")


def input_problem(path: str | Path) -> str | None:
    """Why `path` cannot be read as an input file ('no such file', 'is a FIFO, not a regular file', ...), or
    None for a regular file (or a symbolic link to one)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as e:
        return e.strerror or str(e)
    return None if stat.S_ISREG(mode) else f"is {kind(mode)}, not a regular file"


def plain_name(value: str, what: str) -> str:
    """`value` if it is a plain file or folder name (no separator, not '.' or '..', not empty), which a command
    may put below the folder it was given; a UserError naming `what` otherwise."""
    if not value or value in (".", "..") or "/" in value or "\\" in value or "\0" in value:
        raise UserError(f"{what} {value!r}: not a plain name (no '/', not '.' or '..'), so it could leave "
                        "the output folder")
    return value


def _host_prefix() -> str:
    return f"{STAGING_PREFIX}{socket.gethostname().replace('-', '_')}-"


def _staging_tail(name: str) -> str:
    """How a staging name ends for an output named `name`: the name itself, or for a long one a hash of it and
    its last characters (its extension, for writers that choose the format by it)."""
    if len(name.encode()) <= _LONG_NAME:
        return name
    end = name[-1]
    for size in range(2, len(name)):
        if len(name[-size:].encode()) > 64:
            break
        end = name[-size:]
    return f"{hashlib.sha256(name.encode()).hexdigest()[:16]}-{end}"


def remove_stale_staging(path: Path) -> list[Path]:
    """Staging files of `path` left beside it by processes of this host that no longer run."""
    removed = []
    host_prefix = _host_prefix()
    for candidate in path.parent.glob(f"{glob.escape(STAGING_PREFIX)}*-{glob.escape(_staging_tail(path.name))}"):
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


def umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output(path: str | Path, overwrite: bool = False, inputs: Sequence[str | Path] = ()) -> None:
    """The one rule for an output file, checked before any work is done: refuse one that exists unless
    `overwrite` (a command's --force), one that is not a regular file even then, one that is one of the
    command's `inputs` (or another of its outputs) even then, and one below a file."""
    path = Path(path)
    for source in inputs:
        with contextlib.suppress(OSError):
            if os.path.samefile(path, source):
                raise WriteError(f"{path}: is also {source}, which the command reads or writes; write it elsewhere")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:  # ENOTDIR below a file, ENAMETOOLONG, EACCES: named below or by the write
        mode = None
        if e.strerror and not isinstance(e, NotADirectoryError):
            raise WriteError(f"{path}: cannot write it ({e.strerror})") from None
    if mode is not None:
        if stat.S_ISDIR(mode):
            raise WriteError(f"{path}: is a folder, not a file")
        if not stat.S_ISREG(mode):
            raise WriteError(f"{path}: is {kind(mode)}, not a regular file; not replaced")
        if not overwrite:
            raise OutputExistsError(f"{path}: already exists (use --force to overwrite)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise WriteError(f"{path}: {parent} is a file, not a folder")
            return


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden staging path beside `path`; it becomes `path` only if the block finishes, and only under
    `check_output`'s rule: an existing regular file is replaced only with `overwrite`, anything else never.

    The staging name ends like `path`'s, so a staged file can be read back, e.g. verified, before it takes
    its real name.
    """
    path = Path(path)
    check_output(path, overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(path)
        fd, tmp = tempfile.mkstemp(prefix=f"{_host_prefix()}{os.getpid()}-", suffix=f"-{_staging_tail(path.name)}",
                                   dir=path.parent)
    except OSError as e:
        raise cannot_write(path, e) from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600, and some writers replace the file with their own
        _publish(Path(tmp), path, overwrite)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename the complete `tmp` onto `path`; without `overwrite` by a hard link, which fails rather than
    replace a file that appeared meanwhile."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        raise WriteError(f"{path}: became {kind(mode)} while it was being written; not replaced")
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExistsError(f"{path}: appeared while it was being written; not overwritten "
                                "(use --force)") from None
    except OSError:  # a file system without hard links: the check above is all there is
        if os.path.lexists(path):
            raise OutputExistsError(f"{path}: appeared while it was being written; not overwritten "
                                    "(use --force)") from None
        os.replace(tmp, path)


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


def write_text(path: str | Path, text: str, overwrite: bool = False) -> None:
    """`text` into `path`, atomically, under `check_output`'s rule."""
    with atomic_path(path, overwrite) as tmp, writing(path):
        tmp.write_text(text)


def generated_folder(root: str | Path, signature: str, write: Callable[[Path], None]) -> Path:
    """The folder `root` as `write(folder)` fills it, for a command that generates a data folder.

    It is written once: beside `root`, with a marker holding `signature` (what wrote it, with which
    arguments) written last, then renamed onto `root` where nothing is (or an empty folder). A `root` whose
    marker holds `signature` is reused as it is; anything else there is refused, never emptied. The folder
    gets the permissions the umask gives.
    """
    root = Path(root)
    if _owned(root, signature):
        return root
    _refuse_foreign(root, signature)
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{root.name[:64]}-", dir=root.parent))
    except OSError as e:
        raise cannot_write(root, e) from None
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700
        write(tmp)
        (tmp / MARKER).write_text(signature + "\n")
        try:
            os.rename(tmp, root)  # onto nothing, or onto an empty folder; never onto files
        except OSError:
            if not _owned(root, signature):  # another process's identical folder is as good as ours
                _refuse_foreign(root, signature)
                raise
    except OSError as e:
        raise cannot_write(root, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _owned(root: Path, signature: str) -> bool:
    try:
        return root.is_dir() and (root / MARKER).read_text() == signature + "\n"
    except (OSError, UnicodeDecodeError):
        return False


def _refuse_foreign(root: Path, signature: str) -> None:
    """Refuse a `root` that holds anything but nothing: the user's files, or another generated folder."""
    if not os.path.lexists(root):
        return
    if root.is_symlink() or not root.is_dir():
        raise OutputExistsError(f"{root}: is {kind(os.lstat(root).st_mode)}; give a new or empty folder")
    if not any(root.iterdir()):
        return
    if (root / MARKER).is_file():
        raise OutputExistsError(f"{root}: holds another generated folder than {signature.splitlines()[0]}; "
                                "give a new or empty folder (nothing in it was changed)")
    raise OutputExistsError(f"{root}: exists and was not written by this command (no {MARKER} in it); give a new "
                            "or empty folder (nothing in it was changed)")

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
