"""A TCP proxy in front of the test PostgreSQL (which listens on a Unix socket only), to play
network trouble: refuse connections, or keep them open but stop forwarding (a hanging
network, as when a host vanishes without closing its connections)."""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    """Forward 127.0.0.1:<port> to a Unix socket. `listening` and `forwarding` can be toggled."""

    def __init__(self, unix_socket: str) -> None:
        self.target = unix_socket
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._listener: socket.socket | None = None
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = False

    def url(self, dbname: str, user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def listen(self) -> None:
        """Accept connections (until now they were refused)."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def pause(self) -> None:
        """Keep every connection open but forward nothing: the network hangs."""
        self._forwarding.clear()

    def resume(self) -> None:
        self._forwarding.set()

    def drop(self) -> None:
        """Stop listening and cut every connection (the server is gone)."""
        self._forwarding.set()
        if self._listener:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._closed = True
        self.drop()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            try:
                upstream.connect(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self._forwarding.wait()
                if self._closed:
                    return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            self._forwarding.wait()  # a cut network carries no FIN either
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
