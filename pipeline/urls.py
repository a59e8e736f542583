"""Reading and validating a URL list before anything downloads."""

from __future__ import annotations

import collections
import gzip
import io
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from siclip.manifests.errors import SiclipError
from siclip.manifests.messages import first_line

FORMATS = ("parquet", "csv", "tsv", "jsonl")


@dataclass
class UrlList:
    """The rows that will be downloaded (`url`, `caption`), what was refused, by reason, and how many
    rows repeat the URL of an earlier one (dropped when asked, as `duplicate_url`)."""

    table: pa.Table
    source_rows: int
    refused: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0


def list_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    fmt = suffixes[-1].lstrip(".") if suffixes else ""
    fmt = {"json": "jsonl", "ndjson": "jsonl", "txt": "tsv"}.get(fmt, fmt)
    if fmt not in FORMATS:
        raise SiclipError(f"{path}: unknown URL list format {''.join(path.suffixes)!r}; use .parquet, .csv, .tsv or .jsonl (optionally .gz)")
    return fmt


def read_table(path: Path) -> pa.Table:
    """Read a parquet/csv/tsv/jsonl(.gz) file into an Arrow table, with a one-line error when it is malformed."""
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise SiclipError(f"URL list {path} does not exist")
    fmt = list_format(path)
    try:
        if fmt == "parquet":
            return pq.read_table(path)
        raw = path.read_bytes()
        if path.suffix.lower() == ".gz":
            raw = gzip.decompress(raw)
        if fmt == "jsonl":
            return pjson.read_json(io.BytesIO(raw))
        delim = "\t" if fmt == "tsv" else ","
        return pcsv.read_csv(io.BytesIO(raw), parse_options=pcsv.ParseOptions(delimiter=delim, newlines_in_values=True),
                             convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
    except (pa.ArrowInvalid, OSError, EOFError) as e:
        raise SiclipError(f"{path}: cannot read as {fmt}: {first_line(e)}") from None


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


def read_url_list(path: Path, url_col: str = "url", caption_col: str = "caption", allow_non_http: bool = False,
                  max_samples: int = 0, drop_duplicates: bool = False) -> UrlList:
    """Validate a URL list: columns present, rows counted, non-http(s) URLs refused and counted by
    reason, rows repeating an earlier row's URL counted (and dropped, with `drop_duplicates`)."""
    table = read_table(path)
    missing = [c for c in (url_col, caption_col) if c and c not in table.column_names]
    if missing:
        raise SiclipError(f"{path}: no column {', '.join(repr(c) for c in missing)}; columns are: {', '.join(table.column_names)}"
                          " (choose them with --url-col/--caption-col)")
    urls = table.column(url_col).to_pylist()
    caps = table.column(caption_col).to_pylist() if caption_col else [None] * len(urls)
    refused: collections.Counter = collections.Counter()
    keep_u, keep_c = [], []
    seen: set[str] = set()
    duplicates = 0
    for u, c in zip(urls, caps):
        reason = refusal_reason(u)
        if reason is not None and not (allow_non_http and reason.startswith("scheme_")):
            refused[reason] += 1
            continue
        u = str(u).strip()
        if u in seen:
            duplicates += 1
            if drop_duplicates:
                refused["duplicate_url"] += 1
                continue
        seen.add(u)
        keep_u.append(u)
        keep_c.append("" if c is None else str(c))
    if max_samples and len(keep_u) > max_samples:
        keep_u, keep_c = keep_u[:max_samples], keep_c[:max_samples]
    out = pa.table({"url": pa.array(keep_u, pa.string()), "caption": pa.array(keep_c, pa.string())})
    return UrlList(out, len(urls), dict(refused), duplicates)
