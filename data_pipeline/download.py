"""download: fetch each row's ``url`` into ``out_dir``; record size and sha256.

- direct links (``http(s)://`` ending in a video extension, or ``method=http``): urllib with retries,
  exponential back-off and HTTP ``Range`` resume from a ``.part`` file that survives crashes and re-runs;
- ``file://`` URLs and plain local paths: copied;
- anything else (site pages): yt-dlp through its Python API (never a shell command).

File names are ``<hash of url>_<sanitised name>``: no separators (no path traversal), and two URLs that end
in the same name cannot overwrite each other. Finished files appear by ``os.replace`` only.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from data_pipeline.config import DownloadConfig
from data_pipeline.media import safe_name
from data_pipeline.rows import Row, is_missing
from opensora.data.manifest import row_id
from opensora.utils import atomic_write_path, file_sha256

USER_AGENT = "opensora-lite-data-pipeline/0.1"


class DownloadError(RuntimeError):
    """A download that cannot succeed (4xx, too large, gave up after retries); the message says why."""


class _Transient(Exception):
    """An error worth retrying (connection dropped, timeout, 5xx, 429)."""


def target_name(url: str) -> str:
    """``<10 hex of sha1(url)>_<sanitised last path component>`` (keeps the extension)."""
    parsed = urllib.parse.urlparse(url)
    base = urllib.parse.unquote(os.path.basename(parsed.path.rstrip("/"))) or "video"
    return f"{row_id(url)[:10]}_{safe_name(base, 100)}"


def _inside(path: Path, folder: Path) -> Path:
    path, folder = path.resolve(), folder.resolve()
    if folder != path.parent:
        raise DownloadError(f"refusing to write outside {folder}: {path}")
    return path


def _content_total(resp, offset: int) -> int | None:
    """Total file size from Content-Range (206) or Content-Length (200)."""
    content_range = resp.headers.get("Content-Range")
    if content_range:
        match = re.match(r"bytes\s+\d+-\d+/(\d+)", content_range)
        if match:
            return int(match.group(1))
    length = resp.headers.get("Content-Length")
    return int(length) + offset if length is not None else None


def _http_attempt(url: str, part: Path, cfg: DownloadConfig) -> None:
    """One GET (with Range when ``part`` has bytes); raises :class:`_Transient` for retryable failures."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=cfg.timeout_s) as resp:
            if have and resp.status != 206:  # the server ignored Range: start over
                have = 0
            total = _content_total(resp, have)
            if cfg.max_bytes and total is not None and total > cfg.max_bytes:
                raise DownloadError(f"file is {total} bytes, more than max_bytes={cfg.max_bytes}")
            with open(part, "ab" if have else "wb") as f:
                while True:
                    chunk = resp.read(cfg.chunk_bytes)
                    if not chunk:
                        break
                    f.write(chunk)
                    if cfg.max_bytes and f.tell() > cfg.max_bytes:
                        raise DownloadError(f"more than max_bytes={cfg.max_bytes} bytes")
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            if total is not None and size < total:
                raise _Transient(f"connection closed at {size} of {total} bytes")
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to fetch, or a stale part: compare with the real size
            content_range = err.headers.get("Content-Range") or ""
            match = re.match(r"bytes\s+\*/(\d+)", content_range)
            if match and int(match.group(1)) == have:
                return
            part.unlink()
            raise _Transient("range not satisfiable; restarting") from err
        if err.code in (408, 425, 429) or err.code >= 500:
            raise _Transient(f"HTTP {err.code} {err.reason}") from err
        raise DownloadError(f"HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(err, urllib.error.URLError) and isinstance(reason, (ValueError, FileNotFoundError)):
            raise DownloadError(f"bad URL: {reason}") from err
        raise _Transient(f"{type(err).__name__}: {reason}") from err


def http_download(url: str, dest: Path, cfg: DownloadConfig) -> None:
    """Downloads ``url`` to ``dest`` with retries, back-off and Range resume (``.<name>.part`` next to it).

    Args:
        url: an http(s) URL.
        dest: the final path; it appears only when the whole file is there.
        cfg: retries, back-off, timeout, chunk size, size limit.
    """
    part = dest.with_name(f".{dest.name}.part")
    last = ""
    for attempt in range(cfg.retries + 1):
        if attempt:
            time.sleep(cfg.backoff_s * 2 ** (attempt - 1))
        try:
            _http_attempt(url, part, cfg)
        except _Transient as err:
            last = str(err)
            continue
        os.replace(part, dest)
        return
    raise DownloadError(f"gave up after {cfg.retries + 1} attempts: {last}")


def file_copy(src: Path, dest: Path) -> None:
    """Copies a local file into place atomically."""
    if not src.is_file():
        raise DownloadError(f"no such file: {src}")
    with atomic_write_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def ytdlp_download(url: str, out_dir: Path, cfg: DownloadConfig) -> Path:
    """Downloads a site URL with yt-dlp's Python API; returns the file it wrote."""
    import yt_dlp

    options = {
        "outtmpl": str(out_dir / f"{row_id(url)[:10]}_%(id).80s.%(ext)s"),
        "format": cfg.ytdlp_format,
        "restrictfilenames": True,
        "noplaylist": True,
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "retries": cfg.retries,
        "continuedl": True,
        "socket_timeout": cfg.timeout_s,
        "max_filesize": cfg.max_bytes or None,
    }
    try:
        with yt_dlp.YoutubeDL(options) as ydl:
            info = ydl.extract_info(url, download=True)
            downloads = info.get("requested_downloads") or []
            path = downloads[0]["filepath"] if downloads else ydl.prepare_filename(info)
    except yt_dlp.utils.DownloadError as err:
        raise DownloadError(f"yt-dlp: {err}") from err
    path = Path(path)
    if not path.is_file():
        raise DownloadError(f"yt-dlp finished without a file for {url}")
    return _inside(path, out_dir)


def _method(url: str, cfg: DownloadConfig) -> str:
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        return "file"
    if cfg.method != "auto":
        return cfg.method
    if scheme in ("http", "https"):
        path = urllib.parse.urlparse(url).path.lower()
        if any(path.endswith(ext) for ext in cfg.video_extensions):
            return "http"
    return "ytdlp"


def download(row: Row, cfg: DownloadConfig) -> list[Row]:
    """Stage function: fetches ``row['url']`` and sets ``path``, ``source``, ``download_size``, ``download_sha256``."""
    url = row.get("url")
    if is_missing(url):
        if is_missing(row.get("path")):
            raise DownloadError("row has neither url nor path")
        url = row["path"]
    url = str(url).strip()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    method = _method(url, cfg)
    if method == "ytdlp":
        dest = ytdlp_download(url, out_dir, cfg)
    else:
        dest = _inside(out_dir / target_name(url), out_dir)
        if not dest.exists():  # the name embeds the URL hash: an existing file is this URL's, finished
            if method == "file":
                parsed = urllib.parse.urlparse(url)
                src = Path(urllib.request.url2pathname(parsed.path)) if parsed.scheme == "file" else Path(url)
                file_copy(src, dest)
            else:
                http_download(url, dest, cfg)
    size = dest.stat().st_size
    if size == 0:
        raise DownloadError("downloaded file is empty")
    return [{
        **row,
        "path": str(dest),
        "source": url,
        "download_method": method,
        "download_size": size,
        "download_sha256": file_sha256(dest),
    }]
