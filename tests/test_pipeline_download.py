"""download against a local HTTP server on 127.0.0.1: plain, dropped half-way, 404/500, slow; file:// and yt-dlp."""

import hashlib
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from data_helpers import local_http_server

from data_pipeline.config import DownloadConfig, RunnerConfig
from data_pipeline.download import DownloadError, download, target_name
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
        if name == "404.mp4":
            return self.send_error(404)
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
    with pytest.raises(DownloadError, match="404"):
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
    assert (summary.done, summary.failed) == (3, 1)
    df = read_manifest(tmp_path / "d.parquet", usable_only=False).set_index("url")
    assert df.loc[urls[1], "download_status"] == "failed" and "404" in df.loc[urls[1], "download_error"]
    assert Path(df.loc[urls[2], "path"]).read_bytes() == b"local video bytes"
    assert df.loc[urls[0], "path"] != df.loc[urls[3], "path"]  # same file name, different URLs


def test_ytdlp_path_through_python_api(server, tmp_path):
    [row] = download({"id": "a", "url": f"{server}/ok.mp4"}, _cfg(tmp_path, method="ytdlp"))
    assert Path(row["path"]).read_bytes() == PAYLOAD and row["download_method"] == "ytdlp"
