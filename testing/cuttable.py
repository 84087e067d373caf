"""A TCP link between two processes on 127.0.0.1 that a test can cut and mend, as a network
that drops: every connection through it closed at once, new ones refused until it is mended."""
import socket
import threading
from typing import List


class CuttableLink:
    """Listens on 127.0.0.1:port (chosen free) and joins each connection to 127.0.0.1:target."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.sockets: List[socket.socket] = []
        self.up = True
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            self.up = False
            self._close_all()

    def mend(self) -> None:
        with self.lock:
            self.up = True

    def close(self) -> None:
        self.cut()
        self.listener.close()

    def _close_all(self) -> None:
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # (already closed by its other end)
            sock.close()
        self.sockets.clear()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                far = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                far.settimeout(None)
            except OSError:
                near.close()
                continue
            with self.lock:
                if not self.up:
                    near.close()
                    far.close()
                    continue
                self.sockets += [near, far]
            for source, sink in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass  # cut
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
