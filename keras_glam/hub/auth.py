"""Hugging Face tokens: where they come from, and whether one may write to a repository.

A token is secret: nothing in this module logs it, prints it or puts it in an exception message.
"""

import functools
import re
from dataclasses import dataclass

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError

from keras_glam.hub.retry import HubUnavailableError
from keras_glam.hub.retry import call_with_retries
from keras_glam.hub.retry import is_rate_limited
from keras_glam.hub.retry import redact
from keras_glam.hub.retry import retry_after

HF_SCHEME = "hf://"
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
# Organisation roles that may create and write repositories (whoami-v2's `roleInOrg`).
_WRITING_ORG_ROLES = ("admin", "write", "contributor")


class HubAuthError(PermissionError):
    """No usable token, or a token without write access to the target repository."""


@dataclass(frozen=True)
class WriteAccess:
    """The result of a successful `check_write_access`.

    Attributes:
        repo_id: "namespace/name" (the namespace defaults to the token's user).
        user: the token's user name.
        token_role: "write" or "fineGrained".
        endpoint: the Hub endpoint that was asked.
    """

    repo_id: str
    user: str
    token_role: str
    endpoint: str


def parse_hf_handle(handle):
    """Split "hf://namespace/name" (or "hf://name") into `(namespace or None, name)`.

    Args:
        handle: a Hugging Face preset handle, as `from_preset` takes it.

    Example:
    ```python
    parse_hf_handle("hf://glam-org/glam-tiny")  # ("glam-org", "glam-tiny")
    ```
    """
    if not isinstance(handle, str) or not handle.startswith(HF_SCHEME):
        raise ValueError(
            f"Expected a Hugging Face handle 'hf://namespace/name', got {handle!r}. "
            "Prefix the repository id with 'hf://'."
        )
    parts = handle[len(HF_SCHEME) :].split("/")
    if len(parts) not in (1, 2) or not all(_REPO_PART.fullmatch(part) for part in parts):
        raise ValueError(
            f"Invalid Hugging Face handle {handle!r}: expected 'hf://namespace/name' (or "
            "'hf://name' for the token's own namespace), each part made of letters, digits, "
            "'-', '_' or '.'."
        )
    return (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def resolve_token(token=None):
    """The token to use: `token`, else the one the Hub client itself would use.

    That is `huggingface_hub.get_token()`, in its order: a CI token exchanged through OIDC when
    `HF_OIDC_RESOURCE` is set, `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`, the stored login
    (`hf auth login`), Google Colab's secret. Returns None when there is none; blank strings
    count as none.

    Args:
        token: an explicit token, or None.

    Example:
    ```python
    token = resolve_token()  # from HF_TOKEN or `hf auth login`, or None
    ```
    """
    if token is not None and not isinstance(token, str):
        raise TypeError(f"token must be a string or None, got {type(token).__name__}.")
    if token is not None and token.strip():
        return token.strip()
    return huggingface_hub.get_token()


@functools.cache
def _hub_api(endpoint):
    """One client per endpoint for the whole process, so that its `whoami` cache is shared."""
    return huggingface_hub.HfApi(endpoint=endpoint)


def _write_refusal(whoami, namespace, repo_id):
    """Why this token may not write `repo_id`, or None when it may."""
    user = whoami.get("name")
    access_token = (whoami.get("auth") or {}).get("accessToken") or {}
    role = access_token.get("role")
    token_name = access_token.get("displayName") or "unnamed"
    if role == "read":
        return (
            f"the token '{token_name}' of user '{user}' is read-only. Create a token with the "
            "'write' role (or a fine-grained token with 'repo.write' on this namespace) at "
            "https://huggingface.co/settings/tokens"
        )
    if role == "write":
        if namespace == user:
            return None
        org_roles = {org.get("name"): org.get("roleInOrg") for org in whoami.get("orgs") or []}
        if namespace not in org_roles:
            return f"user '{user}' is not a member of the organization '{namespace}'"
        if org_roles[namespace] not in (None, *_WRITING_ORG_ROLES):
            return (
                f"user '{user}' has the '{org_roles[namespace]}' role in '{namespace}', which "
                "cannot write repositories; ask an admin for the 'write' role"
            )
        return None
    if role == "fineGrained":
        scoped = (access_token.get("fineGrained") or {}).get("scoped") or []
        for grant in scoped:
            entity = grant.get("entity") or {}
            names_target = (
                entity.get("type") in ("user", "org") and entity.get("name") == namespace
            ) or (entity.get("type") == "model" and entity.get("name") == repo_id)
            if names_target and "repo.write" in (grant.get("permissions") or []):
                return None
        return (
            f"the fine-grained token '{token_name}' has no 'repo.write' permission on "
            f"'{namespace}' or '{repo_id}'; edit its permissions at "
            "https://huggingface.co/settings/tokens"
        )
    return f"the token's role {role!r} is not one that can write ('write' or 'fineGrained')"


def check_write_access(
    handle, *, token=None, endpoint=None, max_retries=4, initial_retry_delay=1.0
):
    """Fail early, before any upload, unless the token may write the repository `handle`.

    Asks the Hub's `whoami` who the token belongs to and reads its role: a "write" token writes
    its user's namespace and the organizations where the user has a writing role; a
    "fineGrained" token writes where a scoped grant holds "repo.write"; a "read" token writes
    nowhere. The Hub rate-limits `whoami`, so it is asked once per token and endpoint in a
    process (the answer is cached), retried on connection and server errors but never on
    HTTP 429.

    Args:
        handle: "hf://namespace/name" or "hf://name" (the token's own namespace).
        token: the token; None resolves it with `resolve_token`.
        endpoint: the Hub endpoint; None uses `HF_ENDPOINT` (huggingface.co by default).
        max_retries: retries of `whoami` on transient failures.
        initial_retry_delay: seconds before the first retry; doubles after each.

    Returns:
        A `WriteAccess` naming the resolved repository id.

    Raises:
        HubAuthError: offline mode, no token, a token the Hub rejects, or one without write
            access.
        HubUnavailableError: the Hub could not be reached within the retry budget, or
            rate-limits `whoami` (HTTP 429).

    Example:
    ```python
    access = check_write_access("hf://glam-org/glam-tiny")
    access.repo_id  # "glam-org/glam-tiny"
    ```
    """
    namespace, name = parse_hf_handle(handle)
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    if constants.is_offline_mode():
        raise HubAuthError(
            f"Cannot publish {handle}: HF_HUB_OFFLINE is set, and publishing needs the Hub at "
            f"{endpoint}. Unset HF_HUB_OFFLINE."
        )
    token = resolve_token(token)
    if token is None:
        raise HubAuthError(
            f"No Hugging Face token found to write {handle}. Pass token=..., set the HF_TOKEN "
            "environment variable, or log in with `hf auth login`; the token needs write access."
        )
    api = _hub_api(endpoint)
    try:
        whoami = call_with_retries(
            lambda: api.whoami(token=token, cache=True),
            description="whoami (token check)",
            endpoint=endpoint,
            max_retries=max_retries,
            initial_delay=initial_retry_delay,
            secrets=(token,),
            retry_rate_limited=False,
        )
    except HfHubHTTPError as error:
        if is_rate_limited(error):
            wait = retry_after(error)
            raise HubUnavailableError(
                f"The Hub at {endpoint} rate-limits the token check (HTTP 429 on whoami), which "
                "a retry would only prolong. Start again "
                + (f"in {wait:g} s" if wait is not None else "in a few minutes")
                + "."
            ) from None
        if error.response is not None and error.response.status_code == 401:
            raise HubAuthError(
                f"The Hub at {endpoint} rejected the token (HTTP 401: invalid or expired). "
                "Create a new token at https://huggingface.co/settings/tokens."
            ) from None
        raise HubAuthError(
            redact(f"Token check failed at {endpoint}: {error}", (token,))
        ) from error
    namespace = namespace or whoami.get("name")
    repo_id = f"{namespace}/{name}"
    refusal = _write_refusal(whoami, namespace, repo_id)
    if refusal is not None:
        raise HubAuthError(f"Cannot publish to hf://{repo_id} at {endpoint}: {refusal}.")
    role = whoami["auth"]["accessToken"]["role"]
    return WriteAccess(repo_id=repo_id, user=whoami.get("name"), token_role=role, endpoint=endpoint)
