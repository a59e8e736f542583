"""The scale-out tests (marker `scaleout`): stage 1 through img2dataset's pyspark and ray distributors.
They need the extras siclip[pyspark] and siclip[ray], and Spark a Java runtime: elsewhere they are
skipped with the reason; under `make test-scaleout` a missing part is an error, not a skip."""

from __future__ import annotations

import os
import shutil

import pytest

# Set by `make test-scaleout`: there an extra that does not import is an error, not a quiet skip.
REQUIRE_SCALEOUT = "SICLIP_REQUIRE_SCALEOUT"
DISTRIBUTORS = ("pyspark", "ray")


def pytest_configure(config):
    config.addinivalue_line("markers", "scaleout: stage 1 on pyspark and ray (extras siclip[pyspark,ray] and, for "
                                       "Spark, a Java runtime); skipped with the reason without them (make test-scaleout)")


def scaleout_problem(distributor: str) -> str | None:
    """Why `distributor` cannot run here (None: it can)."""
    try:
        __import__(distributor)
    except Exception as e:  # ImportError, or whatever a broken install raises
        return f"{distributor} does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if distributor == "pyspark" and not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        return "Spark needs a Java runtime and there is no java on the PATH (.ci/run installs Debian's default-jre-headless)"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "scaleout" not in item.keywords:
            continue
        wanted = getattr(item, "callspec", None) and item.callspec.params.get("distributor")
        problems = [p for d in ([wanted] if wanted else DISTRIBUTORS) if (p := scaleout_problem(d))]
        if not problems:
            continue
        if os.environ.get(REQUIRE_SCALEOUT):
            raise pytest.UsageError(f"{REQUIRE_SCALEOUT} is set but the scale-out path cannot run: {problems[0]}")
        item.add_marker(pytest.mark.skip(reason=f"needs the scale-out extras ({'; '.join(problems)}): make test-scaleout"))
