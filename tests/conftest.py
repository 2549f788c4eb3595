"""Shared fixtures. Slow tests are opt-in: ``pytest --run-slow`` (``./test.sh`` passes it)."""

from __future__ import annotations

import os

# One thread for torch (OpenMP) and NumPy (OpenBLAS) in each test process and in the workers, servers and
# commands the tests start: ./test.sh runs two test processes on CI's 2 cores, and two processes with two
# spinning threads each made a tiny network's step many times slower than one thread each (a test of the
# thread choice sets its own). Set before NumPy or torch is imported anywhere in the run; children inherit it.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NEUROSEG_TRAIN_THREADS",
              "NEUROSEG_LIVE_THREADS"):
    os.environ.setdefault(_name, "1")
# The tests see the tracebacks of the apps they run, on their servers' pages (`streamlit run` reads the
# variable) and in AppTest's elements (in this process, the option): the app's configuration shows a user
# an error's type only (test_the_server_runs_with_production_settings checks that it does)
os.environ.setdefault("STREAMLIT_CLIENT_SHOW_ERROR_DETAILS", "full")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from streamlit import config as _streamlit_config  # noqa: E402

from tests.browser import free_port, pages_text  # noqa: E402

_streamlit_config.set_option("client.showErrorDetails", os.environ["STREAMLIT_CLIENT_SHOW_ERROR_DETAILS"])

ROOT = Path(__file__).resolve().parent.parent
ISBI = Path(os.environ.get("NEUROSEG_ISBI_DIR") or ROOT.parent / "shared" / "data" / "isbi2012")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")
    parser.addoption("--device", default="cpu", help="device for the engine tests: cpu (default), cuda, mps")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow") or os.environ.get("NEUROSEG_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: run with --run-slow (./test.sh does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failed test that holds a module's shared browser (a ``browser`` fixture) reports what its pages
    showed: the browser outlives the test, so :func:`tests.browser.chromium` cannot print them itself."""
    report = yield
    browser = getattr(item, "funcargs", {}).get("browser")
    if report.when == "call" and report.failed and browser is not None and hasattr(browser, "contexts"):
        report.sections.append(("what the browser's pages showed", pages_text(browser)))
    return report


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    """The device the engine tests train and predict on (``pytest --device cuda`` on a GPU machine)."""
    name = request.config.getoption("--device")
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("--device cuda was asked for, but no CUDA GPU is available")
    return name


@pytest.fixture(scope="session")
def synthetic() -> tuple[np.ndarray, np.ndarray]:
    """A small synthetic EM stack (6 × 96 × 96 uint8) and its 0/255 labels."""
    from unet.training.synthetic import make_synthetic_em

    return make_synthetic_em((6, 96, 96), np.random.default_rng(42), cell_size=20)


@pytest.fixture
def app_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The app's store in tmp_path (SQLite), and no ISBI files, for tests that run the pages."""
    folder = tmp_path / "data"
    monkeypatch.setenv("NEUROSEG_DATA_DIR", str(folder))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("NEUROSEG_ISBI_DIR", str(tmp_path / "no-isbi-here"))
    return folder


@pytest.fixture(scope="session")
def isbi_dir() -> Path:
    if not (ISBI / "train-volume.tif").is_file():
        pytest.skip(f"ISBI 2012 data not found in {ISBI} (set NEUROSEG_ISBI_DIR to run this test)")
    return ISBI


@pytest.fixture(scope="session")
def postgres_server():
    """A throw-away PostgreSQL server on a loopback port, or a skip that says why there is none.
    Yields an admin URL (the ``postgres`` database)."""
    import glob
    import shutil
    import subprocess

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    bindir = Path(found[-1]).parent if found else None
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (Debian: apt-get install postgresql); "
                    "./test.sh installs them where it can")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("the psycopg driver is not installed")
    import tempfile

    # not under pytest's temp tree: as root that is mode 700 and the postgres account cannot enter it
    root = Path(tempfile.mkdtemp(prefix="neuroseg-pg-"))
    data, port = root / "data", free_port()
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: use its own account
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        shutil.chown(root, "postgres")
        os.chmod(root, 0o700)
        prefix = ["runuser", "-u", "postgres", "--"]
    run = lambda *a: subprocess.run([*prefix, *a], capture_output=True, text=True, timeout=120)  # noqa: E731
    init = run(str(bindir / "initdb"), "-D", str(data), "-U", "neuroseg", "--auth=trust", "-E", "UTF8")
    if init.returncode:
        pytest.skip(f"initdb failed: {init.stderr.strip()[-300:]}")
    start = run(str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"), "-o",
                f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    if start.returncode:
        pytest.skip(f"PostgreSQL did not start: {start.stderr.strip()[-300:]}")
    try:
        yield f"postgresql+psycopg://neuroseg@127.0.0.1:{port}/postgres"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database on each back-end: a SQLite file, and a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'neuroseg.db'}"
    from sqlalchemy import create_engine, text

    admin = request.getfixturevalue("postgres_server")
    name = f"t{abs(hash(request.node.nodeid)) % 10**12}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return admin.rsplit("/", 1)[0] + f"/{name}"
