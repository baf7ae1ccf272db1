"""download: fetch each row's ``url`` into ``out_dir``; record size and sha256.

- direct links (``http(s)://`` ending in a video extension, or ``method=http``): urllib with retries,
  exponential back-off and HTTP ``Range`` resume from a ``.part`` file that survives crashes and re-runs;
- anything else (site pages): yt-dlp through its Python API (never a shell command); with
  ``ytdlp_sections``, only the time range that holds a dataset source's clips (:func:`dataset_section`), recorded
  as ``download_section_start_s`` / ``download_section_end_s`` for split to shift the spans by;
- a row without a ``url`` (a folder input's ``path``): copied.

A ``url`` means a remote URL: ``file://`` and bare paths are refused unless ``allow_local``, and so is any
host that resolves to a loopback, link-local, private or otherwise non-global address unless
``allow_private_hosts`` - checked on the addresses the connection then uses, for every redirect too, before
any connection is made. A refusal rejects the row with the reason (:class:`Refused`). A source that is gone for good (HTTP 404 / 410, a
private, deleted or removed video by yt-dlp's words) is rejected as :class:`~data_pipeline.rows.Vanished`:
``vanished: <why>``, counted apart in the summary and not retried; a timeout or a 5xx stays a failure.

File names are ``<hash of url>_<sanitised name>``: no separators (no path traversal), and two URLs that end
in the same name cannot overwrite each other. Finished files appear by ``os.replace`` only.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import http.client
import ipaddress
import json
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
from data_pipeline.rows import Reject, Row, Vanished, is_missing
from opensora.data.manifest import row_id
from opensora.utils import atomic_write_path, file_sha256

USER_AGENT = "opensora-lite-data-pipeline/0.1"
# HTTP statuses of a resource that is gone, not of a server having a bad moment (5xx, 429: retried).
GONE_STATUS = (404, 410)
# yt-dlp's words for a video that is gone for good (its extractors' messages): private, deleted, removed, an
# account terminated, or the page itself answering 404 / 410. A timeout, a 5xx or an age gate matches none of
# them and stays a failure (retry_failed tries it again); so does a geo-block (YOUTUBE_GEO), which YouTube also
# words "Video unavailable": the video is there, for another machine.
YTDLP_GONE = re.compile(r"Private video|Video unavailable|This video (?:has been removed|is no longer available|"
                        r"does not exist|is private)|account associated with this video has been terminated|"
                        r"HTTP Error 4(?:04|10)\b", re.IGNORECASE)
YOUTUBE_GEO = re.compile(r"in your country|geo.?restrict", re.IGNORECASE)


class DownloadError(RuntimeError):
    """A download that cannot succeed (4xx, too large, gave up after retries); the message says why."""


class Refused(Reject):
    """A URL this configuration does not fetch (a local file, a private address): the row is rejected with why."""


def address_refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """What kind of non-public address ``ip`` is (``"link-local"``, ``"private"``...), or None for a global one."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("loopback", "link_local", "private", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-global"


def resolve_host(host: str, port: int, cfg: DownloadConfig) -> list[tuple]:
    """``getaddrinfo`` of ``host``; raises :class:`Refused` when one of its addresses is not public (unless
    ``cfg.allow_private_hosts``). Resolving makes no connection to the host."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise DownloadError(f"cannot resolve {host}: {err}") from err
    if not cfg.allow_private_hosts:
        for *_, sockaddr in infos:
            ip = ipaddress.ip_address(sockaddr[0].split("%")[0])
            kind = address_refusal(ip)
            if kind is not None:
                where = f"{host} resolves to {ip}" if host.strip("[]") != str(ip) else str(ip)
                raise Refused(f"refused: {where}, a {kind} address (download.allow_private_hosts is off)")
    return infos


def _guarded_connect(cfg: DownloadConfig, address: tuple, timeout=socket._GLOBAL_DEFAULT_TIMEOUT,
                     source_address=None, *args) -> socket.socket:
    """``socket.create_connection`` that connects only to addresses :func:`resolve_host` let through (the
    same lookup: a second one could answer differently)."""
    host, port = address
    last: OSError | None = None
    for family, type_, proto, _, sockaddr in resolve_host(host, port, cfg):
        sock = socket.socket(family, type_, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            sock.close()
            last = err
    raise last if last is not None else OSError(f"no address for {host}")


def _guarded(connection_class: type, cfg: DownloadConfig):
    """A factory of ``connection_class`` instances (HTTP or HTTPS) that connect through :func:`_guarded_connect`."""
    def make(*args, **kwargs):
        conn = connection_class(*args, **kwargs)
        conn._create_connection = functools.partial(_guarded_connect, cfg)
        return conn
    return make


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, cfg: DownloadConfig):
        super().__init__()
        self.cfg = cfg

    def http_open(self, req):
        return self.do_open(_guarded(http.client.HTTPConnection, self.cfg), req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, cfg: DownloadConfig):
        super().__init__()
        self.cfg = cfg

    def https_open(self, req):
        return self.do_open(_guarded(http.client.HTTPSConnection, self.cfg), req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) only (each one's host is checked when it connects)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlparse(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise Refused(f"refused: redirect to a {scheme or 'local'} URL: {newurl[:200]}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def opener(cfg: DownloadConfig) -> urllib.request.OpenerDirector:
    """urllib with the host checks on every connection, redirects included. No proxy from the environment:
    through a proxy, the address checked would be the proxy's, not the host's."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), _GuardedHTTPHandler(cfg),
                                       _GuardedHTTPSHandler(cfg), _RedirectHandler())


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


def _range_start(resp) -> int | None:
    """First byte of a 206 response by its Content-Range (``bytes START-END/TOTAL``), None if it has none."""
    match = re.match(r"bytes\s+(\d+)-\d+/(?:\d+|\*)", resp.headers.get("Content-Range") or "")
    return int(match.group(1)) if match else None


def _check_deadline(deadline: float | None, cfg: DownloadConfig) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise DownloadError(f"took longer than max_seconds={cfg.max_seconds:g}")


def _http_attempt(url: str, part: Path, cfg: DownloadConfig, deadline: float | None = None) -> None:
    """One GET (with Range when ``part`` has bytes); raises :class:`_Transient` for retryable failures.
    Reads what has arrived (``read1``), so a trickling server meets ``deadline`` within one ``timeout_s``."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        with opener(cfg).open(request, timeout=cfg.timeout_s) as resp:
            if have and resp.status != 206:  # the server ignored Range: start over
                have = 0
            elif have and _range_start(resp) != have:  # appending would splice two different offsets
                part.unlink()
                raise _Transient(f"asked for bytes from {have}, the response's Content-Range is "
                                 f"{resp.headers.get('Content-Range')!r}; restarting")
            total = _content_total(resp, have)
            if cfg.max_bytes and total is not None and total > cfg.max_bytes:
                raise DownloadError(f"file is {total} bytes, more than max_bytes={cfg.max_bytes}")
            with open(part, "ab" if have else "wb") as f:
                while True:
                    chunk = resp.read1(cfg.chunk_bytes)
                    if not chunk:
                        break
                    f.write(chunk)
                    _check_deadline(deadline, cfg)
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
        if err.code in GONE_STATUS:
            raise Vanished(f"HTTP {err.code} {err.reason}") from err
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
    deadline = time.monotonic() + cfg.max_seconds if cfg.max_seconds else None
    for attempt in range(cfg.retries + 1):
        if attempt:
            time.sleep(cfg.backoff_s * 2 ** (attempt - 1))
        _check_deadline(deadline, cfg)
        try:
            _http_attempt(url, part, cfg, deadline)
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


def dataset_section(row: Row, cfg: DownloadConfig) -> tuple[float, float] | None:
    """The one time range (seconds) of a source that holds all of its dataset clips, widened by
    ``cfg.ytdlp_section_margin_s``; None when the whole source is wanted (``ytdlp_sections`` off, a row without
    spans, or a whole-video clip). One range, not one per clip: yt-dlp writes a file per range, each with its own
    time base, and a source's clips often overlap or lie close together."""
    if not cfg.ytdlp_sections or is_missing(row.get("dataset_clips")):
        return None
    spans = json.loads(row["dataset_clips"])
    if not spans or any(span["end"] is None for span in spans):
        return None
    start = max(0.0, min(float(span["start"]) for span in spans) - cfg.ytdlp_section_margin_s)
    end = max(float(span["end"]) for span in spans) + cfg.ytdlp_section_margin_s
    return round(start, 3), round(end, 3)  # the recorded offset is exactly what yt-dlp was asked for


def ytdlp_download(url: str, out_dir: Path, cfg: DownloadConfig, section: tuple[float, float] | None = None) -> Path:
    """Downloads a site URL with yt-dlp's Python API; returns the file it wrote.

    Args:
        url: the page.
        out_dir: where the file goes.
        cfg: format, retries, limits.
        section: (start, end) seconds: only that range, its first frame at ``start`` (re-encoded at the cuts,
            so the file starts on the frame asked for and not on the keyframe before it); None: the whole video.
    """
    import yt_dlp

    name = f"{row_id(url)[:10]}_%(id).80s" + (f"_{section[0]:g}-{section[1]:g}s" if section else "")
    options = {
        "outtmpl": str(out_dir / f"{name}.%(ext)s"),
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
    start = time.monotonic()

    def deadline_hook(progress: dict) -> None:  # yt-dlp has no limit on the whole download
        if cfg.max_seconds and time.monotonic() - start > cfg.max_seconds:
            raise DownloadError(f"took longer than max_seconds={cfg.max_seconds:g}")

    # A playlist or channel is not expanded (entries stay flat: nothing of them is downloaded), but refused:
    # a row is one video. A live stream never ends, so it is refused too.
    options.update(extract_flat="in_playlist", progress_hooks=[deadline_hook])
    if section is not None:
        options.update(download_ranges=yt_dlp.utils.download_range_func(None, [section]),
                       force_keyframes_at_cuts=True)
    try:
        with yt_dlp.YoutubeDL(options) as ydl:
            info = ydl.extract_info(url, download=False)
            if info.get("_type") in ("playlist", "multi_video"):
                raise Refused(f"refused: a playlist or channel ({len(info.get('entries') or [])} entries); "
                              "list its videos one per line")
            if info.get("is_live") or info.get("live_status") in ("is_live", "is_upcoming"):
                raise Refused(f"refused: a live stream ({info.get('live_status') or 'is_live'})")
            info = ydl.process_ie_result(info, download=True)
            downloads = info.get("requested_downloads") or []
            path = downloads[0]["filepath"] if downloads else ydl.prepare_filename(info)
    except yt_dlp.utils.DownloadError as err:
        if YTDLP_GONE.search(str(err)) and not YOUTUBE_GEO.search(str(err)):
            raise Vanished(f"yt-dlp: {err}") from err
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


@contextlib.contextmanager
def _url_lock(out_dir: Path, url: str):
    """An exclusive ``flock`` on ``out_dir/.<hash of url>.lock`` while the block runs (across processes)."""
    path = out_dir / f".{row_id(url)[:16]}.lock"
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _check_url(url: str, method: str, cfg: DownloadConfig) -> None:
    """Raises :class:`Refused` for a URL-list entry this configuration does not fetch: a local file (unless
    ``allow_local``), a scheme other than http(s), a host with a non-public address (unless
    ``allow_private_hosts``; yt-dlp's own requests after the page URL are not checked)."""
    if method == "file":
        if not cfg.allow_local:
            raise Refused("refused: a local file in a URL list (a folder input, or download.allow_local: true)")
        return
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme.lower() not in ("http", "https"):
        raise Refused(f"refused: {parsed.scheme}: URLs are not downloaded (http and https only)")
    if not parsed.hostname:
        raise DownloadError(f"bad URL: no host in {url[:200]}")
    try:
        port = parsed.port or (443 if parsed.scheme.lower() == "https" else 80)
    except ValueError as err:
        raise DownloadError(f"bad URL: {err}") from err
    resolve_host(parsed.hostname, port, cfg)


def download(row: Row, cfg: DownloadConfig) -> list[Row]:
    """Stage function: fetches ``row['url']`` and sets ``path``, ``source``, ``download_size``, ``download_sha256``."""
    url = row.get("url")
    from_list = not is_missing(url)  # a URL list means remote URLs; a folder input's rows carry a path
    if not from_list:
        if is_missing(row.get("path")):
            raise DownloadError("row has neither url nor path")
        url = row["path"]
    url = str(url).strip()
    method = _method(url, cfg)
    if from_list:
        _check_url(url, method, cfg)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    section = None  # a direct link is fetched whole: an HTTP Range counts bytes, not seconds
    # One download per distinct URL: rows of the same URL (ids X, X#1) take its lock in turn, so the second
    # finds the first's finished file and points to it instead of appending to the same .part.
    with _url_lock(out_dir, url):
        if method == "ytdlp":
            section = dataset_section(row, cfg)
            dest = ytdlp_download(url, out_dir, cfg, section)
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
    if section is not None:  # the file's time 0 is the source's section start: split shifts the spans by it
        row = {**row, "download_section_start_s": section[0], "download_section_end_s": section[1]}
    return [{
        **row,
        "path": str(dest),
        "source": url,
        "download_method": method,
        "download_size": size,
        "download_sha256": file_sha256(dest),
    }]
