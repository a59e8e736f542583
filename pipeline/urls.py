"""Reading and validating a URL list before anything downloads: one file, or a folder or glob of them
(LAION's and DataComp's layout), read as one list in file-name order."""

from __future__ import annotations

import collections
import gzip
import io
import json
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from siclip.manifests.errors import SiclipError
from siclip.manifests.messages import first_line
from siclip.pipeline.config import INPUT_FORMATS

FORMATS = ("parquet", "csv", "tsv", "jsonl", "txt")
_ALIASES = {"json": "jsonl", "ndjson": "jsonl"}


@dataclass
class UrlList:
    """The rows that will be downloaded (`url`, `caption`, then the extra columns kept), what was refused, by
    reason, how many rows repeat the URL of an earlier one (dropped when asked, as `duplicate_url`), and how
    many files the list was read from."""

    table: pa.Table
    source_rows: int
    refused: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    files: int = 1


def file_format(path: Path) -> str | None:
    """A list file's format by its name (a `.gz` aside), or None when the name is no list format's."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    fmt = suffixes[-1].lstrip(".") if suffixes else ""
    fmt = _ALIASES.get(fmt, fmt)
    return fmt if fmt in FORMATS else None


def list_format(path: Path, input_format: str = "auto") -> str:
    """The format a file is read as: `input_format` (img2dataset's names) when one is given, else by its name."""
    if input_format != "auto":
        if input_format not in INPUT_FORMATS:
            raise SiclipError(f"input_format {input_format!r}: choose one of {', '.join(INPUT_FORMATS)}")
        name = input_format.removesuffix(".gz")
        return _ALIASES.get(name, name)
    fmt = file_format(path)
    if fmt is None:
        raise SiclipError(f"{path}: unknown URL list format {''.join(path.suffixes)!r}; use .parquet, .csv, .tsv, "
                          ".jsonl or .txt (optionally .gz), or name the format with --input-format")
    return fmt


def list_files(spec, input_format: str = "auto") -> list[tuple[Path, str]]:
    """The files of a URL list, sorted by name, each with its format: one file; a folder's list files (its
    other files, and hidden or `_`-prefixed ones such as Spark's `_SUCCESS`, are left out); or a glob's matches.
    An `input_format` leaves out the files whose names say another format."""
    spec = str(spec)
    path = Path(spec)
    want = None if input_format == "auto" else list_format(path, input_format)
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_"))
                        and file_format(p) is not None and want in (None, file_format(p))), key=lambda p: p.name)
        if not files:
            kinds = f".{want}" if want else ".parquet, .csv, .tsv, .jsonl or .txt"
            raise SiclipError(f"URL list folder {path} holds no {kinds} file")
    elif path.is_file():
        files = [path]
    elif any(c in spec for c in "*?["):
        import glob

        matches = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
        # the pattern chose them: a name that says no format is read as `input_format`
        files = sorted((p for p in matches if want is None or file_format(p) in (None, want)), key=str)
        if not files:
            raise SiclipError(f"URL list {spec}: the pattern matches no file")
    else:
        raise SiclipError(f"URL list {path} does not exist")
    out = [(p, list_format(p, input_format)) for p in files]
    first: dict[str, Path] = {}
    for p, fmt in out:
        first.setdefault(fmt, p)
    if len(first) > 1:
        raise SiclipError(f"URL list {spec} mixes formats ({', '.join(f'{p} is {fmt}' for fmt, p in first.items())}); "
                          "keep one format per list, or read only one with --input-format")
    return out


def _file_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def read_lines(path: Path) -> list[str]:
    """A txt list (img2dataset's `txt`): one URL per line; blank lines are skipped."""
    try:
        text = _file_bytes(path).decode("utf-8-sig")
    except (OSError, EOFError) as e:
        raise SiclipError(f"{path}: cannot read as txt: {first_line(e)}") from None
    except UnicodeDecodeError as e:
        raise SiclipError(f"{path}: cannot read as txt: not UTF-8 text (byte {e.start})") from None
    urls = []
    for n, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if "\t" in line:
            raise SiclipError(f"{path}: line {n} holds a tab, but a .txt list is one URL per line; a list with a "
                              "caption column is a .tsv (or pass --input-format tsv)")
        if line:
            urls.append(line)
    return urls


def read_table(path: Path, fmt: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """Read a parquet/csv/tsv/jsonl file (gzip-compressed or not) into an Arrow table, with a one-line error when
    it is malformed; with `columns`, only those, and a one-line error naming any the file lacks."""
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise SiclipError(f"URL list {path} does not exist")
    fmt = fmt or list_format(path)
    try:
        if fmt == "parquet":
            if columns is not None:
                _check_columns(path, pq.read_schema(path).names, columns)
            return pq.read_table(path, columns=columns)
        raw = _file_bytes(path)
        if fmt == "jsonl" and raw.lstrip()[:1] == b"[":  # img2dataset's `json`: one list of objects
            rows = json.loads(raw)
            if not all(isinstance(r, dict) for r in rows):
                raise ValueError("a JSON list whose items are not all objects")
            table = pa.Table.from_pylist(rows)
        elif fmt == "jsonl":
            table = pjson.read_json(io.BytesIO(raw))
        else:
            delim = "\t" if fmt == "tsv" else ","
            table = pcsv.read_csv(io.BytesIO(raw), parse_options=pcsv.ParseOptions(delimiter=delim, newlines_in_values=True),
                                  convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
    except (pa.ArrowException, OSError, EOFError, ValueError) as e:
        raise SiclipError(f"{path}: cannot read as {fmt}: {first_line(e)}") from None
    if columns is None:
        return table
    _check_columns(path, table.column_names, columns)
    return table.select(columns)


def _check_columns(path: Path, names: list[str], columns: list[str]) -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        raise SiclipError(f"{path}: no column {', '.join(repr(c) for c in missing)}; columns are: {', '.join(names)} "
                          "(choose them with --url-col/--caption-col, keep others with save_additional_columns)")


# kept as they are: reserved characters and escapes already there ('%'); everything else that is not
# printable ASCII (spaces, non-ASCII letters, quotes) is percent-encoded as UTF-8, as browsers do
_KEEP = "!#$%&'()*+,/:;=?@[]~"


def browser_url(url: str) -> str:
    """The URL as a browser sends it: spaces and non-ASCII characters of the path and query
    percent-encoded (UTF-8), an international host name in IDNA, no fragment. ValueError when it
    has no host or the host is no valid name."""
    parts = urllib.parse.urlsplit(str(url).strip())
    host = parts.hostname
    if not host:
        raise ValueError("no host name")
    netloc = parts.netloc
    if not host.isascii():
        try:
            netloc = netloc.replace(netloc.rpartition("@")[2].split(":")[0], host.encode("idna").decode("ascii"))
        except UnicodeError:
            raise ValueError(f"host {host!r} is not a valid name") from None
    if any(c.isspace() or not c.isprintable() for c in netloc):
        raise ValueError(f"host {netloc!r} is not a valid name")
    parts.port  # noqa: B018 - ValueError for a port that is not a number
    path, query = (urllib.parse.quote(x, safe=_KEEP) for x in (parts.path, parts.query))
    return urllib.parse.urlunsplit((parts.scheme.lower(), netloc, path or "/", query, ""))


def refusal_reason(url) -> str | None:
    """Why a URL will not be downloaded, or None when it is an http(s) URL a request can be made of."""
    if url is None:
        return "no_url"
    u = str(url).strip()
    if not u:
        return "no_url"
    scheme = u.split(":", 1)[0].lower() if ":" in u else ""
    if scheme in ("http", "https"):
        if not (len(u) > len(scheme) + 3 and u[len(scheme):len(scheme) + 3] == "://"):
            return "malformed_url"
        try:
            browser_url(u)
        except ValueError:
            return "malformed_url"
        return None
    if scheme in ("file", "ftp", "data", "s3", "gs"):
        return f"scheme_{scheme}"
    return "malformed_url"


def _json_ready(t: pa.DataType) -> bool:
    """Whether img2dataset can write a value of this type into a sample's json (json.dumps of its Python value)."""
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _json_ready(t.value_type)
    if pa.types.is_struct(t):
        return all(_json_ready(f.type) for f in t)
    return (pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_null(t) or pa.types.is_string(t)
            or pa.types.is_large_string(t) or (pa.types.is_floating(t) and not pa.types.is_float16(t)))


def _extra_columns(path: Path, table: pa.Table) -> pa.Table:
    """The extra columns of one file, categorical ones as their values; a column a json cannot hold is an error."""
    for i, name in enumerate(table.column_names):
        col = table.column(i)
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        elif pa.types.is_float16(col.type):
            col = col.cast(pa.float32())
        if not _json_ready(col.type):
            raise SiclipError(f"{path}: column {name!r} is {col.type}, which a sample's json cannot hold; "
                              "save_additional_columns keeps text, numbers, booleans and lists of them")
        table = table.set_column(i, name, col)
    return table


def _concat_extras(parts: list[tuple[Path, pa.Table]]) -> pa.Table:
    """The extra columns of every file as one table; a column whose type differs between files is an error."""
    try:
        return pa.concat_tables([t for _, t in parts], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        (p0, t0), *rest = parts
        for p, t in rest:
            for name in t0.column_names:
                a, b = t0.schema.field(name).type, t.schema.field(name).type
                if a != b:
                    try:
                        pa.concat_tables([t0.select([name]), t.select([name])], promote_options="permissive")
                    except (pa.ArrowInvalid, pa.ArrowTypeError):
                        raise SiclipError(f"{p}: column {name!r} is {b} but {a} in {p0}; the files of one list "
                                          "must agree on each column kept") from None
        raise


def read_url_list(path, url_col: str = "url", caption_col: str = "caption", allow_non_http: bool = False,
                  max_samples: int = 0, drop_duplicates: bool = False, input_format: str = "auto",
                  extra_columns: list[str] = ()) -> UrlList:
    """Validate a URL list (a file, or a folder or glob of files read in file-name order): columns present in
    every file, rows counted, non-http(s) URLs refused and counted by reason, rows repeating an earlier row's
    URL counted (and dropped, with `drop_duplicates`). `extra_columns` are kept beside url and caption."""
    files = list_files(path, input_format)
    extra_columns = list(extra_columns)
    urls: list = []
    caps: list = []
    parts: list[tuple[Path, pa.Table]] = []
    for p, fmt in files:
        if fmt == "txt":
            if extra_columns:
                raise SiclipError(f"{p}: a .txt list is one URL per line, with no column {extra_columns[0]!r} to keep "
                                  "(save_additional_columns)")
            lines = read_lines(p)
            urls += lines
            caps += [None] * len(lines)
            continue
        table = read_table(p, fmt, list(dict.fromkeys(c for c in (url_col, caption_col, *extra_columns) if c)))
        urls += table.column(url_col).to_pylist()
        caps += table.column(caption_col).to_pylist() if caption_col else [None] * table.num_rows
        if extra_columns:
            parts.append((p, _extra_columns(p, table.select(extra_columns))))
    refused: collections.Counter = collections.Counter()
    keep: list[int] = []
    seen: set[str] = set()
    duplicates = 0
    for i, u in enumerate(urls):
        reason = refusal_reason(u)
        if reason is not None and not (allow_non_http and reason.startswith("scheme_")):
            refused[reason] += 1
            continue
        u = urls[i] = str(u).strip()
        if u in seen:
            duplicates += 1
            if drop_duplicates:
                refused["duplicate_url"] += 1
                continue
        seen.add(u)
        keep.append(i)
    if max_samples:
        keep = keep[:max_samples]
    out = pa.table({"url": pa.array([urls[i] for i in keep], pa.string()),
                    "caption": pa.array(["" if caps[i] is None else str(caps[i]) for i in keep], pa.string())})
    if parts:
        extras = _concat_extras(parts).take(pa.array(keep, pa.int64())).combine_chunks()
        for name in extra_columns:
            out = out.append_column(name, extras.column(name))
    return UrlList(out, len(urls), dict(refused), duplicates, len(files))
