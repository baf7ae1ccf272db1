"""download against a local HTTP server on 127.0.0.1: plain, dropped half-way, 404/500, slow; file:// and yt-dlp."""

import hashlib
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from data_helpers import local_http_server

from data_pipeline.config import DownloadConfig, RunnerConfig
from data_pipeline.download import DownloadError, download, target_name
from data_pipeline.rows import Vanished
from data_pipeline.pipeline import make_stage
from data_pipeline.runner import run_stage
from opensora.data.manifest import read_manifest

PAYLOAD = bytes(range(256)) * 400  # 100 KiB


class Handler(BaseHTTPRequestHandler):
    """Behaviour by path: /ok, /drop (first GET sends half then hangs up), /404, /500, /flaky (500 twice),
    /slow (stalls longer than the client's timeout once, half-way)."""

    hits: dict = {}
    ranges: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        name = self.path.strip("/").split("/")[0]
        Handler.hits[name] = Handler.hits.get(name, 0) + 1
        first = Handler.hits[name] == 1
        if name in ("404.mp4", "410.mp4"):
            return self.send_error(int(name[:3]))
        if name == "500.mp4" or (name == "flaky.mp4" and Handler.hits[name] <= 2):
            return self.send_error(500)
        start = 0
        if self.headers.get("Range"):
            Handler.ranges.append((name, self.headers["Range"]))
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
        body = PAYLOAD[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in ("drop.mp4", "slow.mp4") and first:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if name == "slow.mp4":
                time.sleep(1.5)  # bounded: longer than the client timeout, then this handler returns
            return  # closing the connection short of Content-Length
        self.wfile.write(body)


@pytest.fixture()
def server():
    Handler.hits, Handler.ranges = {}, []
    with local_http_server(Handler) as url:
        yield url


def _cfg(tmp_path, **kw):
    kw.setdefault("allow_private_hosts", True)  # the server is on 127.0.0.1
    return DownloadConfig(out_dir=str(tmp_path / "videos"), retries=3, backoff_s=0.01, timeout_s=0.5, chunk_bytes=8192, **kw)


def test_plain_download_records_size_and_sha(server, tmp_path):
    [row] = download({"id": "a", "url": f"{server}/ok.mp4"}, _cfg(tmp_path))
    assert Path(row["path"]).read_bytes() == PAYLOAD
    assert row["download_size"] == len(PAYLOAD) and row["download_sha256"] == hashlib.sha256(PAYLOAD).hexdigest()
    assert Path(row["path"]).parent == tmp_path / "videos"


@pytest.mark.parametrize("name", ["drop.mp4", "slow.mp4"])
def test_dropped_and_stalled_connections_resume_with_range(server, tmp_path, name):
    [row] = download({"id": "a", "url": f"{server}/{name}"}, _cfg(tmp_path))
    assert Path(row["path"]).read_bytes() == PAYLOAD
    assert Handler.hits[name] == 2
    # The retry asks only for what is missing (a timed-out read may lose its last partial chunk).
    [(got, header)] = Handler.ranges
    assert got == name and 0 < int(header[len("bytes="):-1]) <= len(PAYLOAD) // 2
    assert not list((tmp_path / "videos").glob(".*part"))


def test_http_errors(server, tmp_path):
    with pytest.raises(Vanished, match="^vanished: HTTP 404"):
        download({"id": "a", "url": f"{server}/404.mp4"}, _cfg(tmp_path))
    assert Handler.hits["404.mp4"] == 1  # a 404 is not retried
    with pytest.raises(DownloadError, match="gave up after 4 attempts: HTTP 500"):
        download({"id": "b", "url": f"{server}/500.mp4"}, _cfg(tmp_path))
    assert Handler.hits["500.mp4"] == 4
    [row] = download({"id": "c", "url": f"{server}/flaky.mp4"}, _cfg(tmp_path))
    assert Path(row["path"]).read_bytes() == PAYLOAD and Handler.hits["flaky.mp4"] == 3
    with pytest.raises(DownloadError, match="max_bytes"):
        download({"id": "d", "url": f"{server}/ok.mp4?big"}, _cfg(tmp_path, max_bytes=1000))


def test_names_are_sanitised_and_distinct():
    evil = target_name("http://h/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd")
    assert "/" not in evil and not evil.startswith(".")
    assert target_name("http://a/x/clip.mp4") != target_name("http://b/y/clip.mp4")
    assert target_name("http://a/x/clip.mp4").endswith("_clip.mp4")


def test_stage_run_with_file_urls_and_failures(server, tmp_path):
    (tmp_path / "local.mp4").write_bytes(b"local video bytes")
    urls = [f"{server}/ok.mp4", f"{server}/404.mp4", (tmp_path / "local.mp4").as_uri(), f"{server}/ok.mp4#2"]
    (tmp_path / "urls.csv").write_text("url\n" + "\n".join(urls) + "\n")
    cfg = _cfg(tmp_path, allow_local=True)
    summary = run_stage(make_stage("download", cfg, tmp_path / "d.parquet"), tmp_path / "urls.csv",
                        tmp_path / "d.parquet", RunnerConfig(workers=0, progress=False))
    assert (summary.done, summary.failed, summary.vanished) == (3, 0, 1)
    df = read_manifest(tmp_path / "d.parquet", usable_only=False).set_index("url")
    assert df.loc[urls[1], "download_status"] == "rejected" and "404" in df.loc[urls[1], "download_error"]
    assert Path(df.loc[urls[2], "path"]).read_bytes() == b"local video bytes"
    assert df.loc[urls[0], "path"] != df.loc[urls[3], "path"]  # same file name, different URLs


def test_ytdlp_path_through_python_api(server, tmp_path):
    [row] = download({"id": "a", "url": f"{server}/ok.mp4"}, _cfg(tmp_path, method="ytdlp"))
    assert Path(row["path"]).read_bytes() == PAYLOAD and row["download_method"] == "ytdlp"


YTDLP_ERRORS = {  # yt-dlp's messages for a source that is gone, and for one it could not reach this time
    "private": "ERROR: [youtube] private: Private video. Sign in if you've been granted access to this video",
    "removed": "ERROR: [youtube] removed: This video has been removed by the uploader",
    "unavailable": "ERROR: [youtube] unavailable: Video unavailable",
    "slow": "ERROR: [youtube] slow: Unable to download webpage: The read operation timed out",
}


def test_vanished_sources_are_rows_with_the_reason_counted_apart_and_never_retried(server, tmp_path, monkeypatch):
    """A 404 / 410, or a private / removed / unavailable video (yt-dlp's DownloadError, monkeypatched: no
    network), is gone for good: a rejected row whose reason starts with ``vanished:``, counted in the summary's
    own ``vanished``, not a failure, and tried again by no re-run (not even ``retry_failed``). A 500 or a
    timeout stays a failure that ``retry_failed`` tries again."""
    import yt_dlp

    calls = []

    def extract_info(self, url, download=True, **kwargs):
        calls.append(url)
        raise yt_dlp.utils.DownloadError(YTDLP_ERRORS[url.rsplit("=", 1)[1]])

    monkeypatch.setattr(yt_dlp.YoutubeDL, "extract_info", extract_info)
    urls = [f"{server}/ok.mp4", f"{server}/404.mp4", f"{server}/410.mp4", f"{server}/500.mp4"]
    urls += [f"{server}/watch?v={name}" for name in YTDLP_ERRORS]  # no video extension: yt-dlp
    (tmp_path / "urls.csv").write_text("url\n" + "\n".join(urls) + "\n")
    cfg = _cfg(tmp_path)

    def run(**kw):
        return run_stage(make_stage("download", cfg, tmp_path / "d.parquet"), tmp_path / "urls.csv",
                         tmp_path / "d.parquet", RunnerConfig(workers=0, progress=False, **kw))

    summary = run()
    assert (summary.done, summary.failed, summary.rejected, summary.vanished) == (1, 2, 0, 5)
    assert "failed 2, rejected 0, vanished 5" in str(summary)
    df = read_manifest(tmp_path / "d.parquet", usable_only=False).set_index("url")
    reasons = df["download_error"].to_dict()
    assert reasons[urls[1]] == "vanished: HTTP 404 Not Found" and reasons[urls[2]] == "vanished: HTTP 410 Gone"
    assert reasons[urls[4]].startswith("vanished: yt-dlp: ERROR: [youtube] private: Private video")
    assert reasons[urls[5]].startswith("vanished: yt-dlp: ") and "has been removed" in reasons[urls[5]]
    assert reasons[urls[6]] == "vanished: yt-dlp: ERROR: [youtube] unavailable: Video unavailable"
    status = df["download_status"].to_dict()
    assert [status[u] for u in urls] == ["done"] + ["rejected"] * 2 + ["failed"] + ["rejected"] * 3 + ["failed"]
    assert df.loc[urls[3], "download_error"] == "DownloadError: gave up after 4 attempts: HTTP 500 Internal Server Error"

    hits, tried = dict(Handler.hits), len(calls)
    again = run(retry_failed=True)  # the failures are tried again, the vanished sources are not
    assert (again.done, again.failed, again.vanished, again.resumed) == (0, 2, 0, 6)
    assert Handler.hits == {**hits, "500.mp4": hits["500.mp4"] + 4}
    assert calls[tried:] == [urls[7]]
