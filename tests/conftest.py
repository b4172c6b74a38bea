"""Suite-wide rules: no job outlives the test that started it, soak tests run only when asked for, and
nothing is fetched from a model hub."""
import ctypes
import os

# Every model a test builds is local: a Hugging Face hub lookup from timm or transformers would be a bug.
# Set before either library is imported, since huggingface_hub reads it at import.
os.environ["HF_HUB_OFFLINE"] = "1"

import psutil  # noqa: E402
import pytest  # noqa: E402

from tests.torchrun import kill_tree  # noqa: E402

PR_SET_CHILD_SUBREAPER = 36


def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true", help="also run the soak tests (minutes each; `make soak`)")


def pytest_collection_modifyitems(config, items):
    # A skip rather than addopts' `-m "not soak"`, which any other -m on the command line would replace.
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="a soak test: `make soak` (pytest --soak) runs it")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    # Processes whose parent dies (a killed torchrun's ranks) become this process's children instead of
    # init's, so the fixture below can still find and end them.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: orphans are only what the tests end themselves
        pass


@pytest.fixture(autouse=True)
def no_job_outlives_its_test():
    """Kill what a test's jobs left running: every process group started during the test other than pytest's
    own (a job started in its own session, a rank torchrun started in one). In-process data loader workers
    share pytest's group and are left to their loaders."""
    me = psutil.Process()
    before = {p.pid for p in me.children()}
    yield
    for child in me.children():
        if child.pid in before:
            continue
        try:
            if os.getpgid(child.pid) == os.getpgrp():
                continue
        except ProcessLookupError:
            pass
        kill_tree(child.pid)
        try:
            os.waitpid(child.pid, 0)
        except ChildProcessError:  # reaped by its Popen meanwhile
            pass
