"""Retry a Hub request with exponential backoff on transient failures only."""

import logging
import time

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
    """The Hub kept failing with server or connection errors until the retry budget ran out."""


def is_transient(error):
    """Whether retrying could help: a connection or protocol failure, HTTP 429 or any 5xx.

    Client errors (401, 403, 404, 400, ...) are permanent: retrying an auth error only repeats it.

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
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        return status == 429 or status >= 500
    return False


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
):
    """Call `operation()` and retry it with exponential backoff while it fails transiently.

    Waits `initial_delay`, then twice as long after each failure, capped at `max_delay`. Errors
    that `is_transient` rejects (auth, not found, bad request) propagate at once, unchanged.

    Args:
        operation: a function of no argument performing one Hub request (or a few).
        description: what the operation does, for messages ("create_repo glam-org/tiny").
        endpoint: the Hub endpoint, named in messages.
        max_retries: retries after the first attempt (0: no retry).
        initial_delay: seconds before the first retry.
        max_delay: cap on any single wait, in seconds.
        secrets: strings (tokens) removed from every message this function writes.
        sleep: the waiting function (tests pass a recorder).

    Returns:
        What `operation()` returns.

    Raises:
        HubUnavailableError: the operation still failed transiently after `max_retries` retries;
            the message names the endpoint, the attempts and the last error, which is chained.

    Example:
    ```python
    api = huggingface_hub.HfApi()
    user = call_with_retries(
        lambda: api.whoami()["name"], description="whoami", endpoint=api.endpoint
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
            if not is_transient(error):
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
            logger.warning(
                "%s on %s failed (attempt %d of %d): %s. Retrying in %.2g s.",
                description,
                endpoint,
                attempt,
                max_retries + 1,
                summary,
                wait,
            )
            sleep(wait)
            delay *= 2
