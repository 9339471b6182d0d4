import os
import sys
from pathlib import Path

import pytest
import torch

# Make tests/helpers.py importable as `helpers` whether or not tests/ is a package.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Without a GPU, Triton kernels run in its interpreter; the switch must be set before the first
# kernel is loaded, so here, before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import helpers  # noqa: E402  (imports ldm: after the path and the switch above)


@pytest.fixture(scope="session", autouse=True)
def float32_by_default():
    """ldm.load's dtype="auto" picks bfloat16 on a CPU with AMX; the tests compare in float32
    against references, so here "auto" sees no fast bf16 unit. For the whole session, so that
    module- and session-scoped fixtures (set up before any function-scoped one) load in float32
    too; test_precision.py sets the detection per test to check what "auto" does with one.
    Subprocesses do not inherit this: tests that start one name their dtype."""
    from ldm import precision
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precision, "has_fast_bf16", lambda: False)
        yield


@pytest.fixture
def one_thread():
    """One torch thread for the test: toy models and the judge's many small ops only wait for a
    second thread (and CI shares its two cores). Modules take it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_runtest_setup(item):
    helpers.DRAWN.clear()  # before the test's fixtures draw theirs


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report names the seeds helpers.fresh_seed() gave it (setup included)."""
    report = (yield).get_result()
    if report.failed and helpers.DRAWN:
        report.sections.append(("fresh seeds", f"helpers.fresh_seed() gave {helpers.DRAWN} in "
                                "this test, in order"))
