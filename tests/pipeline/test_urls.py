"""URL lists are validated before anything downloads."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from siclip.manifests.errors import SiclipError
from siclip.pipeline.urls import read_url_list

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
    if path.suffix.lower() == ".gz":
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


@pytest.mark.parametrize("name, fmt", [("l.json", "jsonl"), ("l.ndjson", "jsonl"), ("l.txt", "tsv"),
                                       ("l.TSV.GZ", "tsv"), ("l.csv.gz", "csv")])
def test_format_aliases_and_gzip(tmp_path, name, fmt):
    path = tmp_path / name
    write(path, ROWS[:2], fmt)  # gzip-compressed when the name ends in .gz (any case)
    urls = read_url_list(path)
    assert urls.table.column("url").to_pylist() == [ROWS[0][0], ROWS[1][0]] and urls.source_rows == 2


def test_csv_captions_may_hold_newlines_and_empty_cells_are_empty_captions(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text('url,caption\n"http://h/a.jpg","two\nlines"\n"http://h/b.jpg",\n')
    urls = read_url_list(p)
    assert urls.table.column("caption").to_pylist() == ["two\nlines", ""]


def test_duplicates_are_counted_and_dropped_on_request_keeping_the_first(tmp_path):
    rows = [("http://h/a.jpg", "first"), ("http://h/b.jpg", "b"), ("http://h/a.jpg", "again"), ("ftp://h/a.jpg", "x")]
    write(tmp_path / "l.parquet", rows, "parquet")
    kept = read_url_list(tmp_path / "l.parquet")
    assert (kept.table.num_rows, kept.duplicates, kept.refused) == (3, 1, {"scheme_ftp": 1})
    dropped = read_url_list(tmp_path / "l.parquet", drop_duplicates=True, max_samples=5)
    assert dropped.table.to_pylist() == [{"url": "http://h/a.jpg", "caption": "first"}, {"url": "http://h/b.jpg", "caption": "b"}]
    assert dropped.refused == {"scheme_ftp": 1, "duplicate_url": 1} and dropped.source_rows == 4


@pytest.mark.parametrize("url, reason", [("HTTPS://h/a.jpg", None), ("http:/h/a.jpg", "malformed_url"),
                                         ("http://", "malformed_url"), ("  http://h/a.jpg  ", None),
                                         ("S3://bucket/a.jpg", "scheme_s3"), ("gs://b/a.jpg", "scheme_gs"),
                                         ("mailto:a@b", "malformed_url"), ("a.jpg", "malformed_url")])
def test_refusal_reasons(url, reason):
    from siclip.pipeline.urls import refusal_reason

    assert refusal_reason(url) == reason


def test_a_missing_list_and_a_missing_column_name_what_is_there(tmp_path):
    with pytest.raises(SiclipError, match=f"^URL list {tmp_path / 'nope.csv'} does not exist$"):
        read_url_list(tmp_path / "nope.csv")
    write(tmp_path / "l.parquet", ROWS[:1], "parquet")
    with pytest.raises(SiclipError, match=r"no column 'text'; columns are: url, caption \(choose them with"):
        read_url_list(tmp_path / "l.parquet", caption_col="text")
