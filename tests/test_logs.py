"""The batching log handler behind the access log, and the cached address check."""

from __future__ import annotations

import io
import ipaddress
import logging
import os
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
    logger.addHandler(BatchingStreamHandler(stream, flush_interval=0.2))
    for n in range(3):
        logger.info("line %d", n)
    assert stream.writes == []  # not yet: the batch is still open
    wait_until(lambda: stream.writes, timeout=5, what="the batch to be written")
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


def test_a_forked_child_writes_its_own_lines(logger: logging.Logger) -> None:
    """gunicorn forks workers from a master whose handlers already exist; the
    flusher thread does not survive a fork, so the child must start its own
    (without one the child's line stays pending until it leaves)."""
    read_fd, write_fd = os.pipe()
    handler = BatchingStreamHandler(os.fdopen(write_fd, "w"), flush_interval=0.05)
    logger.addHandler(handler)
    logger.info("parent")  # the parent's flusher thread now runs
    wait_until(lambda: not handler._pending, timeout=5, what="the parent's line")
    pid = os.fork()
    if pid == 0:  # the child: log, let the flusher work, leave without any exit flush
        try:
            logger.info("child")
            wait_until(lambda: not handler._pending, timeout=20, what="the child's line")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    handler.close()
    handler.stream.close()  # the parent's write end: the reader then sees the end
    with os.fdopen(read_fd) as reader:
        assert reader.read() == "parent\nchild\n"


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
