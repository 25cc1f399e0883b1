"""What a driver raises when it cannot converge: the runtime retries, or reports Failed."""


class DriverError(Exception):
    """A failure of a driver; `transient` says whether retrying can help."""

    transient = True


class TransientDriverError(DriverError):
    """Worth retrying: a daemon unreachable, an operation timed out, a race with the kernel."""


class PermanentDriverError(DriverError):
    """Cannot succeed as asked: unknown image, invalid definition, unsupported config."""

    transient = False
