"""What every benchmark's main() does around its work: signals, exit codes, cleanup."""

import signal
import sys
from collections.abc import Callable
from types import FrameType

from orchestrator.children import uninterruptible


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(body: Callable[[], None], cleanup: Callable[[], None]) -> int:
    """Run ``body`` and then ``cleanup``, whatever happened, uninterruptibly; an exit code.

    Ctrl-C and SIGTERM are raised wherever the loop is (exit 130), rather than left to
    asyncio's SIGINT handling, which cancels the main task: nats-py turns that cancellation
    into TooManyStalledMsgsError. An expected failure prints one line (exit 1).
    """
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)
    try:
        body()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        with uninterruptible():
            cleanup()
