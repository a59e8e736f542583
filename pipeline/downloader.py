"""img2dataset's Downloader with stage 1's fetch: `download_shard` is overridden (img2dataset's own
looks its fetch up by name in its module) and fetches each row with pipeline.fetch (a deadline per
try, a byte cap, public addresses only). img2dataset's resizer, writer, keys and stats are used as
they are. Import this module only after `download.worker_env` is in the environment.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import sys
import time
from multiprocessing.pool import ThreadPool
from threading import Semaphore

import exifread
import fsspec
import pyarrow as pa
from img2dataset.downloader import Downloader, compute_key
from img2dataset.logger import CappedCounter, write_stats

from siclip.manifests.messages import one_line
from siclip.pipeline.fetch import FetchPolicy, fetch_with_retries

OUTCOME_COLUMNS = [("key", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
                   ("width", pa.int32()), ("height", pa.int32()), ("original_width", pa.int32()),
                   ("original_height", pa.int32())]


def _unraisable_in_one_line(info) -> None:
    """A file img2dataset left open that fails to flush when collected: one line, not a traceback."""
    print(f"shards: img2dataset: {one_line(info.exc_value)} (while closing a file it left open)", file=sys.stderr,
          flush=True)


class GuardedDownloader(Downloader):
    """img2dataset's Downloader, fetching each row with pipeline.fetch under `policy`; a shard that
    fails leaves its reason in one line (`last_error`) instead of a traceback. Hash verification and
    blurring (img2dataset's verify_hash_type, blurring_bbox_col) are not used by stage 1."""

    def __init__(self, policy: FetchPolicy, **kwargs):
        super().__init__(**kwargs)
        self.policy = policy
        self.last_error: str | None = None

    def __call__(self, row):
        self.last_error = None
        theirs, sys.unraisablehook = sys.unraisablehook, _unraisable_in_one_line
        try:
            try:
                self.download_shard(row)
                return True, row
            except Exception as e:  # noqa: BLE001 - the shard fails, by name, and the job goes on
                self.last_error = one_line(e)
                return False, row
        finally:
            if self.last_error:  # its half-written files are collected here, under the one-line hook
                gc.collect()
            sys.unraisablehook = theirs

    def _fetch(self, key_url):
        key, url = key_url
        body, error = fetch_with_retries(url, self.timeout, self.retries, self.policy, self.user_agent_token,
                                         self.disallowed_header_directives)
        return key, body, error

    def download_shard(self, row):
        """Download the rows of one input file into a shard: tar and parquet, then its stats (written
        last: a shard with stats is whole); a sample that cannot be written fails the shard."""
        shard_id, shard_file = row
        start = time.time()
        fs, shard_path = fsspec.core.url_to_fs(shard_file)
        with fs.open(shard_path, "rb") as f:
            table = pa.ipc.open_file(f).read_all()
        schema = table.schema
        for name, type_ in OUTCOME_COLUMNS + [("exif", pa.string())] * bool(self.extract_exif):
            schema = schema.append(pa.field(name, type_))
        if self.compute_hash is not None and self.compute_hash not in schema.names:
            schema = schema.append(pa.field(self.compute_hash, pa.string()))
        columns = table.select(self.column_list).to_pydict()
        samples = list(zip(*(columns[c] for c in self.column_list)))
        del table, columns
        url_at = self.column_list.index("url")
        writer = self.sample_writer_class(shard_id, self.output_folder, self.save_caption, self.oom_shard_count,
                                          schema, self.encode_format)
        oom_samples = math.ceil(math.log10(self.number_sample_per_shard))
        counts, status = {"success": 0, "failed_to_download": 0, "failed_to_resize": 0}, CappedCounter()
        unwritten: list[str] = []
        ready = Semaphore(self.thread_count * 2)  # at most twice the threads' samples wait to be resized

        def keyed_urls():
            for key, sample in enumerate(samples):
                ready.acquire()  # pylint: disable=consider-using-with
                yield key, sample[url_at]

        with ThreadPool(self.thread_count) as pool:
            for key, body, error in pool.imap_unordered(self._fetch, keyed_urls()):
                try:
                    outcome, message = self._write_sample(writer, samples[key],
                                                          compute_key(key, shard_id, oom_samples, self.oom_shard_count),
                                                          body, error)
                    counts[outcome] += 1
                    status.increment(message)
                except Exception as e:  # noqa: BLE001 - every sample is tried; the shard fails below
                    unwritten.append(one_line(e))
                finally:
                    ready.release()
            writer.close()
            pool.terminate()
            pool.join()
        if unwritten:
            raise OSError(f"{len(unwritten)} sample(s) could not be written ({unwritten[0]})")
        write_stats(self.output_folder, shard_id, len(samples), counts["success"], counts["failed_to_download"],
                    counts["failed_to_resize"], start, time.time(), status, self.oom_shard_count)
        fs.rm(shard_path)

    def _write_sample(self, writer, sample: tuple, key: str, body, error: str | None) -> tuple[str, str]:
        """Resize and write one fetched row (or its failure); (outcome, status message)."""
        meta = {**dict(zip(self.column_list, sample)), "key": key, "status": None, "error_message": error,
                "width": None, "height": None, "original_width": None, "original_height": None}
        if self.extract_exif:
            meta["exif"] = None
        if self.compute_hash is not None:
            meta[self.compute_hash] = None
        caption = meta.get("caption")
        if error is None:
            body.seek(0)
            img, width, height, original_width, original_height, error = self.resizer(body, None)
            outcome = "failed_to_resize"
            meta["error_message"] = error
        else:
            outcome = "failed_to_download"
        if error is not None:
            if body is not None:
                body.close()
            meta["status"] = outcome
            writer.write(None, key, caption, meta)
            return outcome, error
        raw = body.getvalue()
        if self.extract_exif:
            body.seek(0)
            try:
                meta["exif"] = json.dumps({k: str(v).strip() for k, v in exifread.process_file(body, details=False).items()
                                           if v is not None})
            except Exception:  # noqa: BLE001 - as img2dataset: no EXIF
                meta["exif"] = None
        if self.compute_hash is not None:
            meta[self.compute_hash] = getattr(hashlib, self.compute_hash)(raw).hexdigest()
        meta.update(status="success", width=width, height=height, original_width=original_width,
                    original_height=original_height)
        body.close()
        writer.write(img, key, caption, meta)
        return "success", "success"
