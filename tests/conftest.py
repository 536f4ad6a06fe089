"""Markers: `mindspore` tests need MindSpore installed, `gpu` tests a CUDA GPU; both skip where it is missing.
`slow` marks tests of more than a few seconds on two CPU cores (`-m "not slow"` for a quick pass)."""

from __future__ import annotations

import importlib.util
import multiprocessing.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from convmixer_pt.runtime import usable_cores


def pytest_configure(config: pytest.Config) -> None:
    """This process's own multiprocessing folder (`pymp-*`, made on first use and removed when the process exits)
    is made now, in the system's temp folder, not in the session's (`temp_folder_per_session`); so is the path of
    torch.compile's cache, shared by every test and run.

    timm's test module (read by test_timm_suite.py where CONVMIXER_TIMM_TESTS names it) marks its tests
    with timm's own markers: register them, or --strict-markers refuses the module."""
    timm_tests = os.environ.get("CONVMIXER_TIMM_TESTS")
    if timm_tests and Path(timm_tests).is_file():
        for name in sorted(set(re.findall(r"pytest\.mark\.(\w+)", Path(timm_tests).read_text()))):
            config.addinivalue_line("markers", f"{name}: a marker of timm's tests/test_models.py")
    multiprocessing.util.get_temp_dir()
    # torch.compile's cache stays where torch keeps it (the system's temp folder), shared by every test and run.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    share_cores_among_workers()


def share_cores_among_workers() -> None:
    """Under pytest-xdist, each worker (and the programs its tests start) gets its share of the cores as
    intra-op threads. With PyTorch's default (every core per process) two workers on two cores run four busy
    OpenMP threads, which spin while waiting for each other: measured here, a third of the CPU time of the
    model tests was lost that way (176 s of user time against 121 s with one thread per worker)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers:
        threads = max(1, usable_cores() // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = {"mindspore": importlib.util.find_spec("mindspore") is None, "gpu": not torch.cuda.is_available()}
    reasons = {"mindspore": "MindSpore is not installed", "gpu": "no CUDA GPU"}
    for item in items:
        for marker, absent in missing.items():
            if absent and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reasons[marker]))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: in-process runs then sum in the order of the one-thread
    subprocesses they are compared with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Left in the temp folder by other programs: multiprocessing's folder of a process that did not exit cleanly (a
# trainer a test killed on purpose), torchrun's log folders (it keeps them), a cache of torch.compile's that
# ignores TORCHINDUCTOR_CACHE_DIR (torch._inductor.runtime.caching), a native library's session file.
TOOLS_LEAVE = ("pymp-", "torchelastic_", "torchinductor_", ".ses")


def check_left(folder: Path, who: str) -> None:
    """Removes what other programs left in `folder`; anything else is a leak and fails `who`."""
    left = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(TOOLS_LEAVE) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(TOOLS_LEAVE):
            entry.unlink()
        else:
            left.append(entry.name)
    assert not left, f"{who} left {', '.join(left)} in its temp folder {folder}"


@pytest.fixture(scope="session", autouse=True)
def temp_folder_per_session(tmp_path_factory: pytest.TempPathFactory):
    """The test process's temp folder (`tempfile.tempdir`): one for the session, since libraries keep paths in
    it for the life of the process (torch.compile's precompiled headers); checked when the session ends."""
    folder = tmp_path_factory.mktemp("session-tmp")
    saved, tempfile.tempdir = tempfile.tempdir, str(folder)
    yield folder
    tempfile.tempdir = saved
    check_left(folder, "the session")


@pytest.fixture(autouse=True)
def temp_folder_per_test(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
                         temp_folder_per_session: Path):
    """Every process a test starts gets a temp folder of the test's own (TMPDIR), so nothing it leaves reaches
    the system's temp folder; what is left there after the test is checked (`check_left`)."""
    folder = tmp_path_factory.mktemp("tmp")  # short: multiprocessing's socket paths must fit in 108 bytes
    monkeypatch.setenv("TMPDIR", str(folder))
    yield folder
    monkeypatch.undo()
    check_left(folder, "the test")
