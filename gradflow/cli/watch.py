"""``gradflow watch STORE``: a live page on 127.0.0.1 that re-reads the store while a Recorder writes it."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated

import typer

from gradflow.cli import app

HOST = "127.0.0.1"  # loopback only: the page is never served to the network


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A browser that closed its connection mid-answer is not an error worth a traceback."""
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


def refuse_unwatchable(store: str):
    """The one-line GradflowError ``gradflow plot`` gives for what never becomes a store to watch: a
    path inside a gradflow store, a file or folder that is not a Zarr store, another tool's Zarr
    store, a damaged store. A store not made yet, an empty group (a sweep about to start its first
    variant) and a run being created are watched (the page waits for them): None; else the store
    opened (``gradflow.open_tree``), which the page's first view shows."""
    import gradflow
    from gradflow.lock import filesystem, lock_root
    from gradflow.paths import path_exists, refuse_inside_store, store_kind

    refuse_inside_store(store, lambda root, inner, kind: f"watch the store: gradflow watch {root}",
                        writing=False)
    fs, path = filesystem(store)
    if not path_exists(store)[0] or store_kind(store) == "empty" \
            or fs.glob(f"{lock_root(path)}/**/creating"):
        return None
    return gradflow.open_tree(store)


def make_server(store: str, port: int = 8765, refresh: float = 3.0) -> ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1:``port`` (0: any free port; the bound one is ``server.server_port``)
    serving ``/`` (the live page) and ``/data`` (:meth:`analyses.live.LiveView.snapshot`).
    GradflowError (one line) for a store that cannot be watched (:func:`refuse_unwatchable`; a
    chunk of what the page shows that does not decode, :func:`gradflow.check.reading`), before
    anything listens. A chunk that goes bad later is said on the page (``status["error"]``)."""
    from gradflow.analyses.live import LiveView, live_page
    from gradflow.check import reading
    from gradflow.errors import GradflowError

    opened = refuse_unwatchable(store)
    view = LiveView(store, opened=opened)
    if opened is not None:  # what the page shows is read (decoded) once before serving it
        with reading(store):
            view.update()
    html = live_page(store, refresh).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                body, kind = html, "text/html; charset=utf-8"
            elif path == "/data":
                body, kind = view.snapshot().encode(), "application/json"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # one line per request would drown the terminal
            pass

    try:
        server = _Server((HOST, port), Handler)
    except OSError as err:
        raise GradflowError(f"--port {port}: cannot listen on {HOST}:{port} ({err.strerror}); choose another --port") from None
    return server


@app.command("watch")
def watch_command(
    store: Annotated[str, typer.Argument(help="The store a Recorder is writing (it may not exist yet).",
                                         metavar="STORE")],
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port on 127.0.0.1 (0: any free port).")] = 8765,
    refresh: Annotated[float, typer.Option(min=0.5, max=86400, help="Seconds between page updates (0.5 to 86400).")] = 3.0,
) -> None:
    """Serve a page on 127.0.0.1 whose heatmaps and curves follow the store as it is written; Ctrl-C stops."""
    server = make_server(store, port, refresh)
    typer.echo(f"watching {store} at http://{HOST}:{server.server_port}/ (every {refresh:g} s); Ctrl-C stops")
    thread = threading.Thread(target=server.serve_forever, name="gradflow-watch", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        typer.echo("stopped")
    finally:
        server.shutdown()
        server.server_close()
