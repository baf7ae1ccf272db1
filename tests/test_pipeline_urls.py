"""URL lists: remote URLs only, no private hosts, bounded downloads, one download per URL (issue 24, items 3-5).

The network cases use a local HTTP server on 127.0.0.1 (so they set ``allow_private_hosts``, or let loopback
through a patched check); nothing else is contacted: refusals of other addresses happen before any connection,
which the ``connections`` fixture asserts.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from data_helpers import local_http_server

from data_pipeline import download as dl
from data_pipeline.config import DownloadConfig, RunnerConfig
from data_pipeline.pipeline import make_stage
from data_pipeline.runner import run_stage
from opensora.data.manifest import read_manifest

PAYLOAD = bytes(range(256)) * 64  # 16 KiB


class Handler(BaseHTTPRequestHandler):
    """By path: /ok.mp4, /redirect-*.mp4 (302 to the query string's URL), /slow.mp4 (half, a pause, the rest),
    /badrange.mp4 (the first GET stops half-way; a Range request then gets a 206 from byte 0)."""

    hits: dict = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        name, _, query = self.path.strip("/").partition("?")
        Handler.hits[name] = Handler.hits.get(name, 0) + 1
        if name == "slow.mp4":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.wfile.flush()
            time.sleep(1.0)
            self.wfile.write(PAYLOAD[len(PAYLOAD) // 2 :])
            return
        if name == "trickle.mp4":  # 100 bytes every 50 ms: each read is quick, the whole never ends (5 s here)
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"x" * 100)
                self.wfile.flush()
                time.sleep(0.05)
            return
        if name == "feed.rss":  # a feed: yt-dlp's generic extractor makes it a playlist
            base = f"http://127.0.0.1:{self.server.server_address[1]}"
            items = "".join(f"<item><title>v{i}</title><enclosure url='{base}/ok{i}.mp4' type='video/mp4'/></item>"
                            for i in range(3))
            body = f"<?xml version='1.0'?><rss version='2.0'><channel><title>c</title>{items}</channel></rss>".encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/rss+xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if name == "badrange.mp4":
            if self.headers.get("Range"):  # a 206 that ignores the asked offset and sends the whole file
                self.send_response(206)
                self.send_header("Content-Range", f"bytes 0-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD if self.headers.get("Range") or Handler.hits[name] > 1 else PAYLOAD[:5000])
            return
        if name.startswith("redirect"):
            self.send_response(302)
            self.send_header("Location", query)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)


@pytest.fixture()
def server():
    Handler.hits = {}
    with local_http_server(Handler) as url:
        yield url


@pytest.fixture()
def connections(monkeypatch):
    """Every address a client socket connects to; a connection anywhere but 127.0.0.1 fails the test."""
    seen: list = []
    original = socket.socket.connect

    def connect(self, address):
        seen.append(address)
        assert address[0] == "127.0.0.1", f"a connection to {address} was made"
        return original(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


def _cfg(tmp_path, **kw) -> DownloadConfig:
    return DownloadConfig(out_dir=str(tmp_path / "videos"), retries=1, backoff_s=0.01, timeout_s=2.0, **kw)


def _run(tmp_path, urls: list[str], cfg: DownloadConfig, workers: int = 0):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
    out = tmp_path / "d.parquet"
    summary = run_stage(make_stage("download", cfg, out), _manifest(tmp_path / "urls.txt"), out,
                        RunnerConfig(workers=workers, progress=False))
    return summary, read_manifest(out, usable_only=False)


def _manifest(path: Path):
    from data_pipeline.sources import resolve_input

    return resolve_input(path)


def test_a_url_list_does_not_reach_local_files(tmp_path, connections):
    secret = tmp_path / "home" / ".ssh" / "id_rsa"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(b"-----BEGIN PRIVATE KEY-----")
    urls = [secret.as_uri(), str(secret)]
    summary, df = _run(tmp_path, urls, _cfg(tmp_path, method="http"))
    assert (summary.done, summary.rejected) == (0, 2)
    assert df["download_status"].tolist() == ["rejected", "rejected"]
    assert all(e.startswith("refused: a local file in a URL list") for e in df["download_error"])
    assert not (tmp_path / "videos").exists() or not any((tmp_path / "videos").iterdir())
    # An explicit allow_local copies them (a different setting: the rows are redone, not kept rejected).
    summary, df = _run(tmp_path, urls, _cfg(tmp_path, method="http", allow_local=True))
    assert summary.done == 2 and Path(df["path"][0]).read_bytes() == secret.read_bytes()
    assert connections == []


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/iam.mp4", "http://10.0.0.1/a.mp4",
                                 "http://127.0.0.1:9/a.mp4", "http://[::1]:9/a.mp4", "https://192.168.1.1/x",
                                 "http://0.0.0.0/a.mp4", "http://[::ffff:10.0.0.1]/a.mp4"])
@pytest.mark.parametrize("method", ["http", "auto"])
def test_private_and_internal_hosts_are_refused_before_any_connection(tmp_path, connections, url, method):
    summary, df = _run(tmp_path, [url], _cfg(tmp_path, method=method))
    assert summary.rejected == 1, df["download_error"].tolist()
    assert df["download_error"][0].startswith("refused: ") and "allow_private_hosts" in df["download_error"][0]
    assert connections == []


def test_other_schemes_are_refused(tmp_path, connections):
    summary, df = _run(tmp_path, ["ftp://example.invalid/a.mp4", "ytsearch:cats"], _cfg(tmp_path))
    assert summary.rejected == 2 and all(e.startswith("refused: ") for e in df["download_error"])
    assert connections == []


def test_loopback_allowed_when_set_and_redirects_are_checked(tmp_path, server, connections, monkeypatch):
    summary, df = _run(tmp_path, [f"{server}/ok.mp4"], _cfg(tmp_path, allow_private_hosts=True))
    assert summary.done == 1 and Path(df["path"][0]).read_bytes() == PAYLOAD
    # With the check on and loopback let through (the test server), a redirect to a private address is
    # refused before connecting to it, and so is one to a local file or to another scheme.
    real = dl.address_refusal
    monkeypatch.setattr(dl, "address_refusal", lambda ip: None if ip.is_loopback else real(ip))
    urls = [f"{server}/redirect-a.mp4?http://10.0.0.1/a.mp4", f"{server}/redirect-b.mp4?http://169.254.169.254/b.mp4",
            f"{server}/redirect-c.mp4?file:///etc/passwd", f"{server}/redirect-d.mp4?{server}/ok.mp4",
            f"{server}/redirect-e.mp4?ftp://10.0.0.1/e.mp4"]
    summary, df = _run(tmp_path / "2", urls, _cfg(tmp_path / "2"))
    errors = df.set_index("url")["download_error"]
    assert errors[urls[0]].startswith("refused: 10.0.0.1, a private address")
    assert errors[urls[1]].startswith("refused: 169.254.169.254, a link-local address")
    assert "file:///etc/passwd' is not allowed" in errors[urls[2]]  # urllib's own check, before ours
    assert errors[urls[4]].startswith("refused: redirect to a ftp URL")
    assert df.set_index("url")["download_status"][urls[3]] == "done"
    assert {a[0] for a in connections} == {"127.0.0.1"}


def test_a_duplicate_url_is_downloaded_once_and_both_rows_point_to_it(tmp_path, server, connections):
    """Two rows of one URL (ids X and X#1) on two workers: one GET, one file, both rows name it, and its
    sha256 is the payload's (two writers of one .part mixed the file)."""
    import hashlib

    url = f"{server}/slow.mp4"
    out = tmp_path / "d.parquet"
    (tmp_path / "urls.csv").write_text(f"url\n{url}\n{url}\n")
    cfg = _cfg(tmp_path, allow_private_hosts=True)
    summary = run_stage(make_stage("download", cfg, out), _manifest(tmp_path / "urls.csv"), out,
                        RunnerConfig(workers=2, progress=False))
    df = read_manifest(out, usable_only=False)
    assert summary.done == 2 and df["id"].nunique() == 2
    assert Handler.hits["slow.mp4"] == 1
    assert df["path"].nunique() == 1 and Path(df["path"][0]).read_bytes() == PAYLOAD
    assert set(df["download_sha256"]) == {hashlib.sha256(PAYLOAD).hexdigest()}


def test_a_206_from_another_offset_than_asked_is_not_appended(tmp_path, server, connections):
    cfg = dataclasses.replace(_cfg(tmp_path, allow_private_hosts=True), retries=3)
    [row] = dl.download({"id": "a", "url": f"{server}/badrange.mp4"}, cfg)
    assert Path(row["path"]).read_bytes() == PAYLOAD
    assert Handler.hits["badrange.mp4"] == 3  # cut short, the wrong 206 (thrown away), a fresh whole GET


def test_downloads_are_bounded_by_default_and_a_trickling_server_times_out(tmp_path, server, connections):
    assert DownloadConfig().max_bytes > 0 and DownloadConfig().max_seconds > 0  # limits unless turned off
    cfg = dataclasses.replace(_cfg(tmp_path, allow_private_hosts=True), max_seconds=1.0, timeout_s=2.0)
    start = time.monotonic()
    with pytest.raises(dl.DownloadError, match="took longer than max_seconds=1"):
        dl.download({"id": "t", "url": f"{server}/trickle.mp4"}, cfg)
    assert time.monotonic() - start < 1.0 + cfg.timeout_s


def test_a_playlist_is_refused_and_nothing_of_it_downloaded(tmp_path, server, connections):
    summary, df = _run(tmp_path, [f"{server}/feed.rss"], _cfg(tmp_path, method="ytdlp", allow_private_hosts=True))
    assert summary.rejected == 1 and df["download_error"][0].startswith("refused: a playlist or channel (3 entries)")
    assert not any(name.startswith("ok") for name in Handler.hits)
    assert [p for p in (tmp_path / "videos").iterdir() if not p.name.endswith(".lock")] == []


def test_a_live_stream_is_refused(tmp_path, monkeypatch, connections):
    import yt_dlp

    def live(self, url, download=True, **kwargs):
        assert not download, "a live stream must not start downloading"
        return {"id": "x", "title": "live", "is_live": True, "live_status": "is_live", "url": url}

    monkeypatch.setattr(yt_dlp.YoutubeDL, "extract_info", live)
    monkeypatch.setattr(dl, "resolve_host", lambda host, port, cfg: [])  # the site's host is not looked up
    summary, df = _run(tmp_path, ["https://video.example/live/123"], _cfg(tmp_path, method="ytdlp"))
    assert summary.rejected == 1 and df["download_error"][0] == "refused: a live stream (is_live)"
