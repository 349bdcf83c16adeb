"""The batching log handler behind the access log, and the cached address check."""

from __future__ import annotations

import io
import ipaddress
import logging
import os
import select
import time
from collections.abc import Iterator

import pytest

from authproxy.addresses import in_networks
from authproxy.serve.logs import BatchingStreamHandler

from .support import wait_until


class Recording(io.StringIO):
    """A stream that remembers each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    log = logging.getLogger(f"test.batching.{time.monotonic_ns()}")
    log.propagate = False
    log.setLevel(logging.INFO)
    yield log
    for handler in log.handlers[:]:
        log.removeHandler(handler)
        handler.close()


def test_lines_logged_together_arrive_in_one_write(logger: logging.Logger) -> None:
    stream = Recording()
    logger.addHandler(BatchingStreamHandler(stream, flush_interval=1.0))
    for n in range(3):
        logger.info("line %d", n)
    assert stream.writes == []  # not yet: the batch is still open
    wait_until(lambda: stream.writes, timeout=10, what="the batch to be written")
    assert stream.writes == ["line 0\nline 1\nline 2\n"]


@pytest.mark.parametrize("buffer_size", [64 * 1024, 500], ids=["by-time", "by-size-too"])
def test_lines_from_many_threads_are_each_written_once(
    logger: logging.Logger, buffer_size: int
) -> None:
    """Threads log without a lock: no line may be lost, doubled or cut into another."""
    import threading

    stream = Recording()
    handler = BatchingStreamHandler(stream, flush_interval=0.01, buffer_size=buffer_size)
    logger.addHandler(handler)

    def log_many(thread: int) -> None:
        for n in range(2000):
            logger.info("thread %d line %d", thread, n)

    threads = [threading.Thread(target=log_many, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    handler.flush()
    lines = stream.getvalue().splitlines()
    assert sorted(lines) == sorted(f"thread {t} line {n}" for t in range(8) for n in range(2000))
    assert len(stream.writes) > 1  # written in batches while the threads ran


def test_a_line_after_a_quiet_spell_is_written_too(logger: logging.Logger) -> None:
    stream = Recording()
    logger.addHandler(BatchingStreamHandler(stream, flush_interval=0.05))
    logger.info("first")
    wait_until(lambda: stream.getvalue() == "first\n", timeout=5, what="the first line")
    time.sleep(0.2)
    logger.info("second")
    wait_until(lambda: stream.getvalue() == "first\nsecond\n", timeout=5, what="the second line")
    assert stream.writes == ["first\n", "second\n"]


def test_a_full_buffer_is_written_at_once(logger: logging.Logger) -> None:
    stream = Recording()
    logger.addHandler(BatchingStreamHandler(stream, flush_interval=60, buffer_size=100))
    logger.info("x" * 60)
    assert stream.writes == []
    logger.info("y" * 60)
    assert stream.writes == ["x" * 60 + "\n" + "y" * 60 + "\n"]


def test_flush_writes_what_is_waiting(logger: logging.Logger) -> None:
    stream = Recording()
    handler = BatchingStreamHandler(stream, flush_interval=60)
    logger.addHandler(handler)
    logger.info("pending")
    handler.flush()
    assert stream.getvalue() == "pending\n"
    handler.flush()  # nothing left: no empty write
    assert stream.writes == ["pending\n"]


def _read_line(fd: int, timeout: float) -> str:
    """One line from the pipe *fd*, or what came before *timeout* seconds passed."""
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data.decode()


def test_a_forked_child_writes_its_own_lines(logger: logging.Logger) -> None:
    """gunicorn forks workers from a master whose handlers already exist; the
    flusher thread does not survive a fork, so the child must start its own
    (without one the child's line stays pending until it leaves)."""
    read_fd, write_fd = os.pipe()
    done_read, done_write = os.pipe()
    handler = BatchingStreamHandler(os.fdopen(write_fd, "w"), flush_interval=0.05)
    logger.addHandler(handler)
    logger.info("parent")  # the parent's flusher thread now runs
    try:
        assert _read_line(read_fd, timeout=5) == "parent\n"
        # Wait for the lock the flusher writes under: no lock is held across the fork.
        handler.flush()
        pid = os.fork()
        if pid == 0:  # the child: log, then leave, without any exit flush, once told to
            try:
                logger.info("child")
                os.read(done_read, 1)
            finally:
                os._exit(0)
        try:
            line = _read_line(read_fd, timeout=20)
        finally:
            os.write(done_write, b"x")
            os.waitpid(pid, 0)
        assert line == "child\n"
    finally:
        handler.close()
        handler.stream.close()
        for fd in (read_fd, done_read, done_write):
            os.close(fd)


def test_a_broken_stream_is_reported_not_raised(
    logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise OSError("disk full")

    handler = BatchingStreamHandler(Broken(), flush_interval=60)
    logger.addHandler(handler)
    logger.info("lost")
    handler.flush()  # must not raise
    assert "disk full" in capsys.readouterr().err


NETS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))


@pytest.mark.parametrize(
    ("address", "inside"),
    [
        ("10.1.2.3", True),
        ("10.1.2.3", True),  # a second time: from the cache, same answer
        ("11.1.2.3", False),
        ("::1", True),
        ("::ffff:10.0.0.1", True),
        ("not-an-address", False),
        ("1" * 5000, False),
    ],
)
def test_in_networks(address: str, inside: bool) -> None:
    assert in_networks(address, NETS) is inside
    assert in_networks(address, list(NETS)) is inside  # any iterable of networks
