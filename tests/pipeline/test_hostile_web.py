"""`siclip shards` against a hostile web, on loopback: rows that trickle, never end, are huge (with an
honest or a lying length) or redirect to the machine's own addresses fail each with its reason, while
the good rows beside them land; the job ends within a bound the deadline sets, and a download
process's memory stays within a bound the byte cap sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from siclip_testing import REPO, SMALL, siclip, write_list

from siclip.manifests.layout import DataRoot
from siclip.manifests.manifest import StageManifest
from siclip.pipeline.reasons import classify

TIMEOUT_S = 3  # the deadline of a try
CAP = 4_000_000  # max_download_size
THREADS = 4
HUGE = 400_000_000  # a body that must never be read whole
# generous for a loaded machine (start-up, the pilot, a spawned download process); without the deadline
# the trickling rows alone would hold the job for hours
END_BOUND_S = 90 + 10 * TIMEOUT_S
# what a download process may hold beyond the job's main process (which ran the pilot on good rows with
# the same threads): a body under the cap per row in flight (img2dataset lets 2 x threads wait), and slack
MEMORY_BOUND = 2 * THREADS * CAP + 150_000_000

# runs the real CLI in this process, then reports the peak memory of this process (the main one) and
# of its largest child (the download process)
MEASURED_RUN = """
import json, resource, sys
from siclip.cli import main

code = main(sys.argv[1:])
peak = lambda who: resource.getrusage(who).ru_maxrss * 1024
print(json.dumps({"code": code, "main_peak": peak(resource.RUSAGE_SELF), "worker_peak": peak(resource.RUSAGE_CHILDREN)}))
"""


def row_outcomes(data: Path) -> dict[str, tuple[str, str | None]]:
    """{url: (outcome, error message)} from img2dataset's per-row records."""
    out = {}
    for parquet in (data / "shards").glob("*.parquet"):
        for r in pq.read_table(parquet, columns=["url", "status", "error_message"]).to_pylist():
            out[r["url"]] = ("success" if r["status"] == "success" else classify(r["error_message"]), r["error_message"])
    return out


@pytest.fixture
def servers(image_server):
    """The hostile routes on 127.0.0.1, and two more servers that redirects point at, on 127.0.0.2 and
    ::1: loopback addresses, so that even a fetch that failed to refuse them would stay on the machine."""
    from demo.loopback import ImageServer

    with ImageServer(dict(image_server.files)) as near, ImageServer(dict(image_server.files), host="127.0.0.2") as far, \
            ImageServer(dict(image_server.files), host="::1") as far6:
        yield near, (far, far6), image_server.good_rows


def test_hostile_rows_fail_with_their_reason_within_the_deadline_and_the_cap(tmp_path, servers):
    near, far, good = servers
    first = good[0][0]
    hostile = [
        (f"{near.base}/trickle/{first}", "trickles its body", "timeout"),
        (f"{near.base}/trickle-headers", "trickles its headers", "timeout"),
        (f"{near.base}/endless", "never ends", "too_large"),
        (f"{near.base}/huge/{HUGE}", "huge, honest length", "too_large"),
        (f"{near.base}/lying/{HUGE}", "huge, lying length", "too_large"),
        (f"{near.base}/redirect/{far[0].base}/{good[1][0]}", "redirects to another loopback address", "private_address"),
        (f"{near.base}/redirect/{far[1].base}/{good[2][0]}", "redirects to IPv6 loopback", "private_address"),
    ]
    good_rows = [(f"{near.base}/{p}", c) for p, c in good[:17]]
    # shard 0, the pilot, is good rows only and runs in the main process; the hostile rows go to the
    # download process, among good ones
    rows = good_rows[:8] + [r for pair in zip(good_rows[8:], hostile) for r in pair] + good_rows[8 + len(hostile):]
    rows = [r[:2] for r in rows]
    urls = write_list(tmp_path / "urls.parquet", rows)
    data = tmp_path / "data"
    args = ["shards", "--urls", urls, "--data", data, "--image-size", "64", "--samples-per-shard", "8",
            "--processes", "1", "--threads", THREADS, "--budget", "1GB", "--reserve", "0%",
            "--set", f"timeout={TIMEOUT_S}", "--set", f"max_download_size={CAP}",
            # the test's own server is allowed; every other private address stays refused
            "--set", 'allow_networks=["127.0.0.1/32"]']
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    try:
        res = subprocess.run([sys.executable, "-c", MEASURED_RUN, *map(str, args)], capture_output=True, text=True,
                             env=env, cwd=REPO, timeout=END_BOUND_S)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the job did not end within {END_BOUND_S} s:\n{(e.stderr or b'')[-2000:]}") from None
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    measured = json.loads(res.stdout.strip().splitlines()[-1])
    assert measured["code"] == 0, res.stderr[-3000:]

    outcomes = row_outcomes(data)
    assert {u: o for u, (o, _) in outcomes.items()} == {**{u: "success" for u, _ in good_rows},
                                                        **{u: o for u, _, o in hostile}}
    # the honest length was refused before any of the body was read
    assert "Content-Length 400,000,000" in outcomes[hostile[3][0]][1]
    assert all("--allow-private-addresses" in outcomes[u][1] for u, _, o in hostile if o == "private_address")
    assert not far[0].hits and not far[1].hits  # the redirects were refused before connecting

    m = StageManifest.load(DataRoot(data), "shards")
    assert m.total_samples == len(good_rows)
    failures: dict[str, int] = {}
    for e in m.entries.values():
        for r, n in e.failures.items():
            failures[r] = failures.get(r, 0) + n
    assert failures == {"timeout": 2, "too_large": 3, "private_address": 2}
    summary = res.stderr.strip().splitlines()[-1]
    assert summary.startswith("shards: done:") and "too_large 3" in summary and "private_address 2" in summary
    assert took < END_BOUND_S
    grew = measured["worker_peak"] - measured["main_peak"]
    assert grew < MEMORY_BOUND, (f"the download process peaked {grew / 1e6:.0f} MB above the main process "
                                 f"({measured['worker_peak'] / 1e6:.0f} MB)")


def test_a_loopback_list_is_refused_row_by_row_without_the_flag(tmp_path, image_server):
    from demo.loopback import ImageServer

    with ImageServer(dict(image_server.files)) as server:
        rows = [(f"{server.base}/{p}", c) for p, c in image_server.good_rows[:10]]
        urls = write_list(tmp_path / "urls.parquet", rows)
        args = [a for a in SMALL if a != "--allow-private-addresses"]
        res = siclip("shards", "--urls", urls, "--data", tmp_path / "data", *args, check=False)
    assert res.returncode == 1  # a run that downloaded nothing has failed, whatever the reasons
    assert not server.hits  # not one connection reached it
    outcomes = row_outcomes(tmp_path / "data")
    assert set(outcomes) == {u for u, _ in rows}
    for url, (outcome, message) in outcomes.items():
        assert outcome == "private_address", (url, message)
        assert message == (f"private address 127.0.0.1 (host 127.0.0.1) refused: pass --allow-private-addresses "
                           "to fetch from your own network")
    m = StageManifest.load(DataRoot(tmp_path / "data"), "shards")
    assert m.total_samples == 0 and sum(e.failures["private_address"] for e in m.entries.values()) == len(rows)
    hint, summary, verdict = res.stderr.strip().splitlines()[-3:]
    assert hint.startswith(f"shards: {len(rows)} row(s) point at loopback") and "--allow-private-addresses" in hint
    assert "failures: private_address 10" in summary
    assert verdict == ("shards: no image was downloaded of 10 row(s) (failures: private_address 10); the data root "
                       "holds no samples for the later stages")
    assert "rerun with --allow-private-addresses --retry-failed" in hint

    # the rerun the hint names fetches the refused rows, and the net outcome has no failure left
    with ImageServer(dict(image_server.files), port=server.port) as again:
        res = siclip("shards", "--urls", urls, "--data", tmp_path / "data", *args, "--allow-private-addresses",
                     "--retry-failed")
    assert len(again.hits) == len(rows)
    done = next(line for line in res.stderr.splitlines() if line.startswith("shards: done:"))
    assert "10/10 images (100.0%), net of 10 row(s) downloaded again by --retry-failed" in done
    assert "failures: none;" in done


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("127.0.0.1", False), ("127.8.9.10", False), ("::1", False),  # loopback
    ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False), ("fd00:ec2::254", False),  # private
    ("169.254.169.254", False), ("fe80::1", False),  # link-local: the cloud metadata endpoint
    ("100.100.100.200", False),  # shared address space (another cloud's metadata endpoint)
    ("224.0.0.1", False), ("ff0e::1", False),  # multicast
    ("240.0.0.1", False), ("0.0.0.0", False), ("::", False),  # reserved, unspecified
    ("::ffff:127.0.0.1", False), ("2002:7f00:1::", False), ("64:ff9b::7f00:1", False),  # IPv4 inside IPv6
    ("::ffff:8.8.8.8", True), ("64:ff9b::808:808", True),
])
def test_which_addresses_are_refused(address, public):
    """Judged without any network: the address itself, IPv4 and IPv6."""
    import ipaddress

    from siclip.pipeline.fetch import FetchPolicy

    ip = ipaddress.ip_address(address)
    assert FetchPolicy(max_bytes=1).permits(ip) is public
    assert FetchPolicy(max_bytes=1, allow_private=True).permits(ip)
    allowed = ipaddress.ip_network(address)  # an allow_networks entry lets that network through, only it
    assert FetchPolicy(max_bytes=1, allow_networks=(allowed,)).permits(ip)
    assert FetchPolicy(max_bytes=1, allow_networks=(ipaddress.ip_network("10.99.0.0/16"),)).permits(ip) is public
