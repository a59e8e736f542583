"""URL lists are validated before anything downloads."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests.errors import SiclipError
from pipeline.urls import read_url_list

ROWS = [("http://127.0.0.1:9/a.jpg", "a"), ("https://127.0.0.1:9/b.jpg", "b"), ("file:///etc/hosts", "c"),
        ("ftp://127.0.0.1/d.jpg", "d"), ("data:image/png;base64,AAAA", "e"), ("", "f"), ("not a url", "g")]
REFUSED = {"scheme_file": 1, "scheme_ftp": 1, "scheme_data": 1, "no_url": 1, "malformed_url": 1}


def write(path, rows, fmt):
    if fmt == "parquet":
        pq.write_table(pa.table({"url": [r[0] for r in rows], "caption": [r[1] for r in rows]}), path)
        return
    if fmt == "jsonl":
        text = "".join(json.dumps({"url": u, "caption": c}) + "\n" for u, c in rows)
    else:
        sep = "," if fmt == "csv" else "\t"
        text = f"url{sep}caption\n" + "".join(f'"{u}"{sep}"{c}"\n' for u, c in rows)
    data = text.encode()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


@pytest.mark.parametrize("name, fmt", [("l.parquet", "parquet"), ("l.csv", "csv"), ("l.tsv.gz", "tsv"),
                                       ("l.jsonl.gz", "jsonl"), ("l.jsonl", "jsonl")])
def test_formats_and_refusals(tmp_path, name, fmt):
    write(tmp_path / name, ROWS, fmt)
    urls = read_url_list(tmp_path / name)
    assert urls.source_rows == len(ROWS)
    assert urls.table.column("url").to_pylist() == [ROWS[0][0], ROWS[1][0]]
    assert urls.table.column("caption").to_pylist() == ["a", "b"]
    assert urls.refused == REFUSED


def test_allow_non_http_and_max_samples(tmp_path):
    write(tmp_path / "l.parquet", ROWS, "parquet")
    urls = read_url_list(tmp_path / "l.parquet", allow_non_http=True, max_samples=4)
    assert urls.table.num_rows == 4 and urls.table.column("url")[2].as_py() == "file:///etc/hosts"


def test_malformed_csv_names_the_file(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text('url,caption\n"http://127.0.0.1/a.jpg,unterminated\nx,y,z,w\n')
    with pytest.raises(SiclipError, match=f"{p}: cannot read as csv"):
        read_url_list(p)


def test_unknown_extension(tmp_path):
    p = tmp_path / "list.xlsx"
    p.write_bytes(b"x")
    with pytest.raises(SiclipError, match=r"unknown URL list format '\.xlsx'"):
        read_url_list(p)
