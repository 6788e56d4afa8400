"""Retry a Hub request with exponential backoff on transient failures only."""

import datetime
import email.utils
import logging
import time

# The HTTP client of huggingface_hub (its dependency); keras_glam declares it as well, since it
# names its exception classes.
import httpx2
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.errors import OfflineModeIsEnabled

logger = logging.getLogger(__name__)

# Network failures worth another try (the set `huggingface_hub.utils.http_backoff` retries on);
# not a malformed URL, an unsupported scheme or a proxy misconfiguration.
_TRANSIENT_TRANSPORT_ERRORS = (
    httpx2.TimeoutException,
    httpx2.NetworkError,
    httpx2.RemoteProtocolError,
)


class HubUnavailableError(ConnectionError):
    """The Hub kept failing with server or connection errors until the retry budget ran out, or
    rate-limits a request that a retry would only delay further."""


# Statuses worth another try besides 5xx: the server timed out waiting for the request (408),
# too many requests (429).
_TRANSIENT_STATUSES = (408, 429)
_TOO_MANY_REQUESTS = 429


def is_transient(error):
    """Whether retrying could help: a connection or protocol failure, HTTP 408, 429 or any 5xx.

    Other client errors (401, 403, 404, 400, ...) are permanent: retrying an auth error only
    repeats it.

    Args:
        error: the exception a `huggingface_hub` call raised.

    Example:
    ```python
    is_transient(httpx2.ConnectError("connection refused"))  # True
    ```
    """
    if isinstance(error, OfflineModeIsEnabled):
        return False
    if isinstance(error, _TRANSIENT_TRANSPORT_ERRORS):
        return True
    status = _status(error)
    return status is not None and (status in _TRANSIENT_STATUSES or status >= 500)


def is_rate_limited(error):
    """Whether `error` is the Hub's HTTP 429 (too many requests)."""
    return _status(error) == _TOO_MANY_REQUESTS


def retry_after(error):
    """Seconds the server asked to wait before the next request (its `Retry-After` header,
    delay-seconds or an HTTP date), or None when it did not say.

    Args:
        error: the exception a `huggingface_hub` call raised.

    Example:
    ```python
    retry_after(error)  # 30.0 after "HTTP 429" with "Retry-After: 30"
    ```
    """
    response = getattr(error, "response", None)
    value = response.headers.get("Retry-After") if response is not None else None
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:  # An HTTP date is GMT by definition.
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    now = datetime.datetime.now(datetime.timezone.utc)
    return max((moment - now).total_seconds(), 0.0)


def _status(error):
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return error.response.status_code
    return None


def redact(text, secrets):
    """`text` with every non-empty string of `secrets` replaced by "<redacted>"."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    return text


def _summarize(error, secrets):
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return redact(f"{type(error).__name__}: {first_line}", secrets)


def call_with_retries(
    operation,
    *,
    description,
    endpoint,
    max_retries=4,
    initial_delay=1.0,
    max_delay=30.0,
    secrets=(),
    sleep=time.sleep,
    retry_rate_limited=True,
):
    """Call `operation()` and retry it with exponential backoff while it fails transiently.

    Waits `initial_delay`, then twice as long after each failure, capped at `max_delay`; when
    the answer carries `Retry-After` (HTTP 429, 503, ...), waits at least that long, even beyond
    `max_delay`: an earlier request would only be refused again. Errors that `is_transient`
    rejects (auth, not found, bad request) propagate at once, unchanged.

    Args:
        operation: a function of no argument performing one Hub request (or a few).
        description: what the operation does, for messages ("create_repo glam-org/tiny").
        endpoint: the Hub endpoint, named in messages.
        max_retries: retries after the first attempt (0: no retry).
        initial_delay: seconds before the first retry.
        max_delay: cap on any single wait, in seconds.
        secrets: strings (tokens) removed from every message this function writes.
        sleep: the waiting function (tests pass a recorder).
        retry_rate_limited: False lets HTTP 429 propagate at once, for endpoints whose rate
            limit a retry only prolongs (`whoami`).

    Returns:
        What `operation()` returns.

    Raises:
        HubUnavailableError: the operation still failed transiently after `max_retries` retries;
            the message names the endpoint, the attempts and the last error, which is chained.

    Example:
    ```python
    api = huggingface_hub.HfApi()
    files = call_with_retries(
        lambda: api.list_repo_files("glam-org/glam-tiny"),
        description="list_repo_files glam-org/glam-tiny",
        endpoint=api.endpoint,
    )
    ```
    """
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}.")
    if initial_delay < 0 or max_delay < 0:
        raise ValueError(
            f"Retry delays must be >= 0, got initial_delay={initial_delay}, max_delay={max_delay}."
        )
    delay = initial_delay
    for attempt in range(1, max_retries + 2):
        try:
            return operation()
        except Exception as error:
            if not is_transient(error) or (not retry_rate_limited and is_rate_limited(error)):
                raise
            summary = _summarize(error, secrets)
            if attempt > max_retries:
                raise HubUnavailableError(
                    f"{description} failed: the Hugging Face Hub at {endpoint} did not answer "
                    f"successfully in {attempt} attempts ({max_retries} retries with exponential "
                    f"backoff). Last error: {summary}. Check the network and the endpoint "
                    "(HF_ENDPOINT), or retry later with a larger max_retries."
                ) from error
            wait = min(delay, max_delay)
            asked = retry_after(error)
            if asked is not None:
                wait = max(wait, asked)
            logger.warning(
                "%s on %s failed (attempt %d of %d): %s. Retrying in %g s%s.",
                description,
                endpoint,
                attempt,
                max_retries + 1,
                summary,
                wait,
                " (the Hub's Retry-After)" if asked is not None and asked >= wait else "",
            )
            sleep(wait)
            delay *= 2
