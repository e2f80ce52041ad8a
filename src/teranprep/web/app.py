"""`prep serve`: JSON API + one HTML page over an index/, on uvicorn.

Safety rules: binds 127.0.0.1 unless told otherwise; image files are served only from under the
image root (resolved paths, so `..` and symlinks that leave the root are 404); queries are
length-limited; requests are only ever parsed as query strings (nothing is unpickled); any
failure of one request is answered with JSON and the server carries on.
"""

from __future__ import annotations

import threading
from pathlib import Path

from ..errors import PrepError
from ..pipeline.search import MAX_QUERY_CHARS, Searcher

STATIC = Path(__file__).parent / "static"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
MAX_RESULTS = 100


def image_under_root(root: Path | None, key: str) -> Path | None:
    """The file `key` names under `root`, or None when it is missing, not an image, or (after
    resolving `..` and symlinks) outside the root."""
    if root is None or not key or "\x00" in key:
        return None
    try:
        target = (root / key).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        return None
    if not target.is_relative_to(root) or not target.is_file() or target.suffix.lower() not in IMAGE_SUFFIXES:
        return None
    return target


def image_href(key: str) -> str:
    """The page's URL of image `key`: percent-encoded, so `#`, `?`, `%`, spaces and non-ASCII
    in keys reach the server as the key (the route decodes it back)."""
    from urllib.parse import quote
    return "/images/" + quote(key, safe="/")


def resolve_image_root(searcher: Searcher, images: Path | None) -> Path | None:
    if images is not None:
        if not Path(images).is_dir():
            raise PrepError(f"--images {images}: not a directory; pass the folder the image keys are relative to")
        return Path(images).resolve()
    recorded = (searcher.store.manifest.get("lineage") or {}).get("features_input_root") or ""
    return Path(recorded).resolve() if recorded and Path(recorded).is_dir() else None


class LiveSearcher:
    """The Searcher of an index folder that notices when the folder is rebuilt (its manifest.json
    replaced: another inode, size or mtime) and reopens it, or says it was removed."""

    def __init__(self, searcher: Searcher, reopen=None):
        self.searcher, self.reopen = searcher, reopen
        self.stamp = self._stamp()

    def _stamp(self):
        try:
            st = (Path(self.searcher.root) / "manifest.json").stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def current(self) -> Searcher:
        stamp = self._stamp()
        if stamp == self.stamp:
            return self.searcher
        if stamp is None:
            raise PrepError(f"{self.searcher.root}: the index folder was removed (or its manifest.json) "
                            "since the server started; rebuild it with `prep index` and restart `prep serve`")
        if self.reopen is None:
            raise PrepError(f"{self.searcher.root}: the index was rebuilt since the server started; "
                            "restart `prep serve`")
        fresh = self.reopen()  # a PrepError (half-written index) leaves the old one in use
        self.searcher.close()
        self.searcher, self.stamp = fresh, stamp
        return fresh


def create_app(searcher: Searcher, images: Path | None = None, reopen=None):
    from fastapi import FastAPI, Query, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

    root = resolve_image_root(searcher, images)
    live = LiveSearcher(searcher, reopen)
    lock = threading.Lock()  # one model and one set of HDF5 handles: one request at a time
    app = FastAPI(title="teranprep search", docs_url=None, redoc_url=None, openapi_url=None)

    def image_url(key: str) -> str | None:
        return image_href(key) if image_under_root(root, key) is not None else None

    @app.exception_handler(PrepError)
    async def prep_error(request: Request, exc: PrepError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    # Every refusal has one shape, 4xx {"error": "..."}: FastAPI's own 422 {"detail": [...]} and
    # 404 {"detail": "Not Found"} are rewritten to it, so the page shows one kind of message.
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', 'invalid')}"
                 for e in exc.errors()]
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception):
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse((STATIC / "index.html").read_text("utf-8"))

    @app.get("/api/info")
    def info():
        with lock:
            searcher = live.current()
        m = searcher.store.manifest
        return {"images": len(searcher.store), "shortlist": m["shortlist"]["faiss"],
                "head": {k: m["shortlist"]["head"].get(k) for k in ("kind", "dim")},
                "warning": searcher.warning, "images_served": root is not None,
                "captions": bool(m.get("captions"))}

    @app.get("/api/search")
    def api_search(q: str = Query(..., min_length=1, max_length=MAX_QUERY_CHARS),
                   k: int = Query(10, ge=1, le=MAX_RESULTS),
                   shortlist: int | None = Query(None, ge=1, le=100_000),
                   exhaustive: bool = False):
        with lock:
            searcher = live.current()
            result = searcher.search(q, k=k, shortlist=shortlist, exhaustive=exhaustive).to_dict()
            for hit in result["results"]:
                size = searcher.image_info(hit["key"])
                hit.update(width=size["width"], height=size["height"], image_url=image_url(hit["key"]))
        result["warning"] = searcher.warning
        return result

    @app.get("/api/alignment")
    def api_alignment(key: str = Query(..., min_length=1, max_length=1000),
                      q: str = Query(..., min_length=1, max_length=MAX_QUERY_CHARS)):
        with lock:
            result = live.current().alignment_of(key, q)
        result["image_url"] = image_url(key)
        return result

    @app.get("/api/captions")
    def api_captions(key: str = Query(..., min_length=1, max_length=1000),
                     k: int = Query(10, ge=1, le=MAX_RESULTS)):
        with lock:
            ranked = live.current().search_captions(key, k)
        return {"key": key, "results": ranked}

    @app.get("/images/{key:path}")
    def image(key: str):
        target = image_under_root(root, key)
        if target is None:
            return JSONResponse({"error": "not found"}, status_code=404)
        return FileResponse(target)

    return app


def refuse_taken_port(host: str, port: int) -> None:
    """One PrepError line when `host:port` cannot be bound (another server has it)."""
    import socket
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
    except OSError as exc:
        raise PrepError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}; "
                        "another server holds it?); pass another --port") from None


def serve(index: Path, *, host: str = "127.0.0.1", port: int = 8000, images: Path | None = None,
          tokenizer: str | None = None, echo=print) -> None:
    import uvicorn
    refuse_taken_port(host, port)  # before the seconds of loading the index and model
    searcher = Searcher(index, tokenizer=tokenizer)
    app = create_app(searcher, images, reopen=lambda: Searcher(index, tokenizer=tokenizer))
    if searcher.warning:
        echo(f"WARNING: {searcher.warning}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        echo(f"WARNING: serving on {host}: anyone who can reach this machine can search the index")
    echo(f"serving {index} ({len(searcher.store)} images) on http://{host}:{port}/  (Ctrl-C stops)")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        searcher.close()  # (a reopened one is closed with the process)
