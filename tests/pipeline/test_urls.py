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


@pytest.mark.parametrize("name, fmt", [("l.json", "jsonl"), ("l.ndjson", "jsonl"), ("l.TSV.GZ", "tsv"),
                                       ("l.csv.gz", "csv")])
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


# --- lists as the field has them: img2dataset's formats, folders and globs of files, extra columns ----------------

def write_table(path, columns: dict):
    """A list file with these columns, in the format its name says (gzip-compressed when it ends in .gz)."""
    table = pa.table(columns)
    if path.name.endswith(".parquet"):
        pq.write_table(table, path)
        return path
    if ".jsonl" in path.name:
        text = "".join(json.dumps(r) + "\n" for r in table.to_pylist())
    else:
        sep = "\t" if ".tsv" in path.name else ","
        text = sep.join(table.column_names) + "\n" + "".join(
            sep.join(json.dumps(v) if isinstance(v, str) else str(v) for v in r.values()) + "\n" for r in table.to_pylist())
    path.write_bytes(gzip.compress(text.encode()) if path.name.endswith(".gz") else text.encode())
    return path


def part(n0: int, n: int) -> dict:
    """Rows n0..n0+n-1 of a LAION-like list: url, caption and two extra columns."""
    return {"url": [f"http://h/{i}.jpg" for i in range(n0, n0 + n)], "caption": [f"c{i}" for i in range(n0, n0 + n)],
            "uid": [f"u{i}" for i in range(n0, n0 + n)], "similarity": [i / 10 for i in range(n0, n0 + n)]}


def test_a_txt_list_is_one_url_per_line(tmp_path):
    p = tmp_path / "urls.txt"
    p.write_bytes(b"\xef\xbb\xbfhttp://h/a.jpg\r\n\nhttp://h/b c.jpg\n  ftp://h/c.jpg  \nhttp://h/d,e.jpg")
    urls = read_url_list(p)
    assert urls.table.to_pylist() == [{"url": "http://h/a.jpg", "caption": ""}, {"url": "http://h/b c.jpg", "caption": ""},
                                      {"url": "http://h/d,e.jpg", "caption": ""}]
    assert (urls.source_rows, urls.refused) == (4, {"scheme_ftp": 1})
    gz = tmp_path / "urls.txt.gz"
    gz.write_bytes(gzip.compress(b"http://h/a.jpg\n"))
    assert read_url_list(gz).table.column("url").to_pylist() == ["http://h/a.jpg"]


def test_a_txt_list_with_a_caption_column_says_it_is_a_tsv_and_reads_as_one_when_told(tmp_path):
    p = tmp_path / "urls.txt"
    p.write_text("url\tcaption\nhttp://h/a.jpg\ta dog\n")
    with pytest.raises(SiclipError, match=r"urls.txt: line 1 holds a tab, but a .txt list is one URL per line; .*"
                                          r"--input-format tsv"):
        read_url_list(p)
    urls = read_url_list(p, input_format="tsv")
    assert urls.table.to_pylist() == [{"url": "http://h/a.jpg", "caption": "a dog"}]


def test_a_folder_is_read_in_file_name_order_with_its_extra_columns(tmp_path):
    lists = tmp_path / "laion"
    lists.mkdir()
    write_table(lists / "part-00001.parquet", part(3, 2))  # written first, read second
    write_table(lists / "part-00000.parquet", part(0, 3))
    (lists / "_SUCCESS").write_bytes(b"")
    (lists / ".part-00000.parquet.crc").write_bytes(b"x")
    (lists / "README.md").write_text("not a list")
    urls = read_url_list(lists, extra_columns=["uid", "similarity"])
    assert (urls.files, urls.source_rows) == (2, 5)
    assert urls.table.column_names == ["url", "caption", "uid", "similarity"]
    assert urls.table.to_pylist() == pa.table(part(0, 5)).to_pylist()
    assert urls.table.num_rows == len(urls.table.column("uid").chunks[0])  # one chunk: a stable list id


def test_kept_columns_stay_with_their_rows_when_rows_are_refused_dropped_or_cut(tmp_path):
    cols = part(0, 5)
    cols["url"][1] = "ftp://h/1.jpg"
    cols["url"][3] = cols["url"][0]  # a duplicate
    write_table(tmp_path / "a.parquet", cols)
    urls = read_url_list(tmp_path / "a.parquet", drop_duplicates=True, max_samples=2, extra_columns=["uid"])
    assert urls.table.to_pylist() == [{"url": "http://h/0.jpg", "caption": "c0", "uid": "u0"},
                                      {"url": "http://h/2.jpg", "caption": "c2", "uid": "u2"}]


@pytest.mark.parametrize("suffix", [".csv", ".tsv.gz", ".jsonl"])
def test_a_glob_of_text_lists_is_one_list(tmp_path, suffix):
    for i, n0 in enumerate((0, 2, 4)):
        write_table(tmp_path / f"shard{i}{suffix}", part(n0, 2))
    write_table(tmp_path / "other.parquet", part(9, 1))  # outside the pattern
    urls = read_url_list(f"{tmp_path}/shard*{suffix}", extra_columns=["similarity"])
    assert urls.table.column("url").to_pylist() == [f"http://h/{i}.jpg" for i in range(6)]
    assert urls.table.column("similarity").to_pylist() == [i / 10 for i in range(6)]


def test_img2dataset_json_is_a_list_of_objects(tmp_path):
    p = tmp_path / "l.json"
    p.write_text(json.dumps(pa.table(part(0, 2)).to_pylist()))
    urls = read_url_list(p, input_format="json", extra_columns=["uid"])
    assert urls.table.column("uid").to_pylist() == ["u0", "u1"]


def test_the_same_list_read_twice_is_the_same_table(tmp_path):
    from siclip.pipeline.stage import table_sha256

    for i in (1, 0):
        write_table(tmp_path / f"{i}.parquet", part(3 * i, 3))
    a = read_url_list(tmp_path, extra_columns=["uid"])
    b = read_url_list(f"{tmp_path}/*.parquet", extra_columns=["uid"])
    assert table_sha256(a.table) == table_sha256(b.table)
    edited = part(3, 3)
    edited["uid"][0] = "changed"
    write_table(tmp_path / "1.parquet", edited)
    assert table_sha256(read_url_list(tmp_path, extra_columns=["uid"]).table) != table_sha256(a.table)
    assert table_sha256(read_url_list(tmp_path).table) == table_sha256(a.table.select(["url", "caption"]))


def test_a_glob_that_matches_nothing_and_a_folder_without_lists_are_one_line_errors(tmp_path):
    with pytest.raises(SiclipError, match=rf"^URL list {tmp_path}/\*\.parquet: the pattern matches no file$"):
        read_url_list(f"{tmp_path}/*.parquet")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(SiclipError, match=rf"^URL list folder {tmp_path} holds no \.parquet, \.csv, \.tsv, \.jsonl "
                                          r"or \.txt file$"):
        read_url_list(tmp_path)
    write_table(tmp_path / "a.csv", part(0, 1))
    with pytest.raises(SiclipError, match=rf"^URL list folder {tmp_path} holds no \.parquet file$"):
        read_url_list(tmp_path, input_format="parquet")


def test_a_folder_of_mixed_formats_names_them_and_input_format_picks_one(tmp_path):
    write_table(tmp_path / "a.parquet", part(0, 2))
    write_table(tmp_path / "b.csv", part(2, 1))
    with pytest.raises(SiclipError, match=rf"^URL list {tmp_path} mixes formats \({tmp_path}/a.parquet is parquet, "
                                          rf"{tmp_path}/b.csv is csv\); .*--input-format$"):
        read_url_list(tmp_path)
    assert read_url_list(tmp_path, input_format="parquet").source_rows == 2
    assert read_url_list(f"{tmp_path}/*", input_format="parquet").source_rows == 2
    (tmp_path / "c.dat").write_bytes((tmp_path / "b.csv").read_bytes())
    assert read_url_list(f"{tmp_path}/*.dat", input_format="csv").source_rows == 1  # a name of no format
    assert read_url_list(tmp_path, input_format="csv.gz").source_rows == 1  # compression is read from the file


def test_a_column_missing_from_one_file_names_that_file(tmp_path):
    write_table(tmp_path / "a.parquet", part(0, 2))
    cols = part(2, 2)
    del cols["uid"]
    write_table(tmp_path / "b.parquet", cols)
    assert read_url_list(tmp_path).source_rows == 4
    with pytest.raises(SiclipError, match=rf"^{tmp_path}/b.parquet: no column 'uid'; columns are: url, caption, "
                                          r"similarity \("):
        read_url_list(tmp_path, extra_columns=["uid"])


def test_an_unreadable_parquet_names_the_file(tmp_path):
    write_table(tmp_path / "a.parquet", part(0, 2))
    (tmp_path / "b.parquet").write_bytes(b"PAR1 this is no parquet file")
    with pytest.raises(SiclipError, match=rf"^{tmp_path}/b.parquet: cannot read as parquet: [^\n]+$"):
        read_url_list(tmp_path)


def test_kept_columns_must_agree_between_files_and_fit_a_json(tmp_path):
    write_table(tmp_path / "a.parquet", {**part(0, 1), "n": [1]})
    write_table(tmp_path / "b.parquet", {**part(1, 1), "n": [2.5]})  # int and float: both numbers
    assert read_url_list(tmp_path, extra_columns=["n"]).table.column("n").to_pylist() == [1.0, 2.5]
    write_table(tmp_path / "c.parquet", {**part(2, 1), "n": ["three"]})
    with pytest.raises(SiclipError, match=rf"^{tmp_path}/c.parquet: column 'n' is string but int64 in "
                                          rf"{tmp_path}/a.parquet; the files of one list must agree"):
        read_url_list(tmp_path, extra_columns=["n"])
    pq.write_table(pa.table({**part(0, 1), "raw": pa.array([b"\x00"], pa.binary())}), tmp_path / "c.parquet")
    with pytest.raises(SiclipError, match=r"c.parquet: column 'raw' is binary, which a sample's json cannot hold"):
        read_url_list(tmp_path / "c.parquet", extra_columns=["raw"])
    pq.write_table(pa.table({**part(0, 1), "tag": pa.array(["x"]).dictionary_encode()}), tmp_path / "c.parquet")
    assert read_url_list(tmp_path / "c.parquet", extra_columns=["tag"]).table.column("tag").type == pa.string()


def test_a_txt_list_has_no_columns_to_keep(tmp_path):
    p = tmp_path / "urls.txt"
    p.write_text("http://h/a.jpg\n")
    with pytest.raises(SiclipError, match=r"urls.txt: a .txt list is one URL per line, with no column 'uid' to keep"):
        read_url_list(p, extra_columns=["uid"])


@pytest.mark.parametrize("sets, error", [
    (["save_additional_columns=['status']"], r"save_additional_columns: 'status' is a key img2dataset writes"),
    (["save_additional_columns=['uid', 'uid']"], r"save_additional_columns names a column twice"),
    (["input_format=xlsx"], r"input_format 'xlsx' is not one of auto, parquet, csv"),
])
def test_config_refuses_what_would_not_reach_the_json(sets, error):
    from siclip.config import resolve
    from siclip.pipeline.config import ShardsConfig

    with pytest.raises(SiclipError, match=error):
        resolve(ShardsConfig, None, ["urls=l.parquet", *sets])


def test_the_worst_case_of_a_shard_counts_its_kept_columns():
    from siclip.pipeline.config import ShardsConfig
    from siclip.pipeline.plan import TAR_BLOCK, extra_json_bytes, shard_bound

    cfg = ShardsConfig(urls="-", image_size=64)
    plain = pa.table({"url": ["http://h/a.jpg"], "caption": ["a"]})
    kept = plain.append_column("note", pa.array(["x" * 5000]))
    (x,) = extra_json_bytes(kept)
    assert x == len(json.dumps({"note": "x" * 5000}, indent=4))
    # in the tar's .json (padded to whole blocks from a slack that already held it in part) and in the parquet
    assert shard_bound(kept, cfg) - shard_bound(plain, cfg) >= 2 * x - TAR_BLOCK
