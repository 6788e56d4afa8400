"""A local Hugging Face Hub for tests: the real `huggingface_hub` client against 127.0.0.1.

No machine here reaches huggingface.co and no package provides a Hub that accepts uploads, so this
module serves the subset of the Hub HTTP API that `huggingface_hub` 2.4 (and through it
`keras_hub`'s `from_preset("hf://...")`) uses to publish and download a model repository:

| client call                          | request                                           |
|--------------------------------------|---------------------------------------------------|
| `whoami`                             | `GET /api/whoami-v2`                              |
| `create_repo`                        | `POST /api/repos/create` (409 + url if it exists) |
| `repo_info` / `model_info`           | `GET /api/models/{repo}[/revision/{rev}]`         |
| `create_branch`                      | `POST /api/models/{repo}/branch/{branch}`         |
| `create_commit` (README check)       | `POST /api/validate-yaml`                         |
| `create_commit` (upload modes)       | `POST /api/models/{repo}/preupload/{rev}`         |
| `create_commit`                      | `POST /api/models/{repo}/commit/{rev}` (NDJSON)   |
| `list_repo_commits`                  | `GET /api/models/{repo}/commits/{rev}`            |
| `list_repo_tree` / `list_repo_files` | `GET /api/models/{repo}/tree/{rev}[/{path}]`      |
| `get_paths_info`                     | `POST /api/models/{repo}/paths-info/{rev}`        |
| `hf_hub_download` / `file_exists`    | `HEAD` and `GET /{repo}/resolve/{rev}/{path}`     |
| `get_token` with `HF_OIDC_RESOURCE`  | `POST /oauth/token` (OIDC token exchange)         |

Preupload always answers the "regular" upload mode (file contents travel base64-encoded inside the
commit); LFS and Xet transfers are not implemented, so `HF_HUB_DISABLE_XET` must be on. Anything
else answers 404 with an `X-Error-Message` saying the test Hub does not implement it.

The server is honest: it checks tokens (401 for an unknown token, 401/403 for writes without a
token or with a read-only one), answers 404 with the `X-Error-Code` the client maps to
`RepositoryNotFoundError`, `RevisionNotFoundError` and `EntryNotFoundError`, validates every
payload (NDJSON commit lines, base64 contents, paths, the README's YAML front matter) and keeps the
full history: every commit id stays downloadable. File contents live in a temporary directory.

Fault injection: `fail_next(kind, times, status, headers=, message=)` answers an HTTP error (with
extra headers such as `Retry-After`, and the error message given), `drop_next(kind, times,
stage)` closes the connection without a (complete) answer, and `stop()` / `start()` (or `with
server.down():`) take the whole server off its port and back. `kind` is one of `REQUEST_KINDS`;
`requests_of(kind)` lists what the server saw, e.g. how often `whoami` was asked.

Trusted publishing: `POST /oauth/token` exchanges `oidc_id_token` (as a CI provider would mint
it) for `oidc_token`, a write token valid for `expires_in=0` seconds, so that the client's
in-process cache never serves it to a later test.

Pointing the client at the server. `huggingface_hub.constants` reads `HF_ENDPOINT` once, at import,
and `import keras` already imports `huggingface_hub` (`keras/src/saving/saving_lib.py`), so that
happens before any conftest code could set the variable (and the port is only known later).
`point_huggingface_hub_at()` therefore patches the copies that exist once the client is imported,
and the `hub_server` fixture checks the result:
- `constants.ENDPOINT` and `constants.HUGGINGFACE_CO_URL_TEMPLATE` (used by `hf_hub_url`, i.e. by
  every download), and any module that copied them with `from ..constants import ENDPOINT`
  (`huggingface_hub.cli.auth`, `huggingface_hub.utils._git_credential`);
- `huggingface_hub.hf_api.api.endpoint`: the module-level `HfApi()` whose bound methods are the
  top-level functions (`huggingface_hub.create_repo`, `upload_folder`, `file_exists`, ... as
  `keras_hub.upload_preset` calls them). `HfApi()` objects built later read `constants.ENDPOINT`.
- `constants.HF_HUB_DISABLE_XET`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE`, `HF_TOKEN_PATH` and
  `HF_STORED_TOKENS_PATH` are read at import too; the fixture patches them, so a developer's own
  login and cache are never touched.
The environment variables are set as well, for subprocesses.
Redirect bookkeeping (`constants.HF_URL_HOSTS`, `utils._http._HUB_ORIGINS`) is left alone: this
server never redirects.

Use from another test file: add `pytest_plugins = ("hub_server",)` to `tests/conftest.py` (or to
the test module) and request the `hub_server` fixture. Test modules import this one for its
constants and helpers before pytest registers it as a plugin; it holds no `assert` (failures raise
explicit errors), so it opts out of assertion rewriting: PYTEST_DONT_REWRITE.
"""

import base64
import collections
import contextlib
import datetime
import hashlib
import itertools
import json
import pathlib
import re
import secrets
import socket
import sys
import threading
import urllib.parse
from dataclasses import dataclass
from dataclasses import field
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer

import pytest
import yaml

USER = "glam-tester"
WRITABLE_ORG = "glam-org"
READ_ONLY_ORG = "glam-readers"

REQUEST_KINDS = (
    "whoami",
    "create_repo",
    "repo_info",
    "create_branch",
    "validate_yaml",
    "preupload",
    "commit",
    "list_commits",
    "tree",
    "paths_info",
    "file_metadata",  # HEAD .../resolve/...
    "download",  # GET .../resolve/...
    "oidc_exchange",
    "unsupported",
)
DROP_STAGES = ("before_processing", "after_processing", "mid_body")

_INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
_GITATTRIBUTES = (
    b"*.h5 filter=lfs diff=lfs merge=lfs -text\n*.spm filter=lfs diff=lfs merge=lfs -text\n"
)
_SEGMENT = r"[^/]+"
_WRITING_ORG_ROLES = ("admin", "write", "contributor")


@dataclass(frozen=True)
class HubToken:
    """An access token the server accepts, in the shape `whoami-v2` reports it.

    `role` is "read", "write" or "fineGrained"; `scoped` lists fine-grained grants as
    `(entity_type, entity_name, permissions)` with entity types "user", "org" or "model".
    """

    role: str
    display_name: str
    scoped: tuple = ()


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it (no header is kept, so no token is either)."""

    method: str
    path: str
    kind: str
    status: int | None  # None when the connection was dropped without an answer
    user: str | None


@dataclass(frozen=True)
class CommitRecord:
    """A commit as stored by the server."""

    commit_id: str
    parent: str | None
    title: str
    description: str
    author: str
    date: str
    files: dict  # path -> blob id (git SHA-1 of the content)


@dataclass
class _Repo:
    repo_id: str
    private: bool
    created_at: str
    commits: dict = field(default_factory=dict)  # commit id -> CommitRecord
    branches: dict = field(default_factory=dict)  # branch name -> commit id


@dataclass(frozen=True)
class _Fault:
    status: int | None = None
    drop_stage: str | None = None
    headers: tuple = ()  # (name, value) pairs added to an HTTP error's answer
    message: str | None = None


class _HubError(Exception):
    """An API error answer: status, message, and the `X-Error-Code` the client dispatches on."""

    def __init__(self, status, message, code=None, headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


def git_blob_id(content):
    """The git object id of a blob: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _validate_repo_path(path):
    if not isinstance(path, str):
        raise _HubError(400, f"A path must be a string, got {path!r}")
    parts = path.split("/")
    if not path or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
        raise _HubError(400, f"Invalid path in repository: {path!r}")
    if parts[0] == ".git":
        raise _HubError(400, f"Forbidden path: {path!r}")
    return path


class _Route:
    def __init__(self, methods, pattern, kind, handler):
        self.methods = methods
        self.regex = re.compile(pattern)
        self.kind = kind
        self.handler = handler


class _Request:
    """What a route handler sees: query, headers, body, the caller's token, path parameters."""

    def __init__(self, query, headers, body, token):
        self.query = query
        self.headers = headers
        self.body = body
        self.token = token
        self.params = {}

    def json(self):
        try:
            payload = json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _HubError(400, f"Request body is not valid JSON: {error}") from None
        if not isinstance(payload, dict):
            raise _HubError(400, "Request body must be a JSON object")
        return payload


class _ThreadingServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, hub):
        self.hub = hub
        self.live_connections = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self.connections_lock:
            self.live_connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.connections_lock:
            self.live_connections.discard(request)
        super().shutdown_request(request)

    def close_live_connections(self):
        with self.connections_lock:
            connections = list(self.live_connections)
            self.live_connections.clear()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the Hub; every answer carries Content-Length

    def do_GET(self):
        self.server.hub._handle(self)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        """Silent: the server keeps its own request log (`HubServer.requests`)."""


class HubServer:
    """A threaded Hub API server on 127.0.0.1 with fault injection; see the module docstring.

    Args:
        storage_dir: directory for file contents (content-addressed blobs).
        port: port to listen on; 0 picks a free one (kept across `stop()` / `start()`).

    Attributes:
        url: the endpoint, e.g. "http://127.0.0.1:41234".
        write_token: a "write" token of user `USER`, a member of `WRITABLE_ORG` (write role) and
            of `READ_ONLY_ORG` (read role).
        read_token: a "read" token of the same user.
        scoped_token: a fine-grained token of the same user that may write only under `USER`.
        oidc_id_token: what a CI provider would mint; `POST /oauth/token` exchanges it for
            `oidc_token`, a write token of the same user.
        requests: every request served, as `RecordedRequest`s.

    Example:
    ```python
    server = HubServer(tmp_path).start()
    huggingface_hub.HfApi(endpoint=server.url).whoami(token=server.write_token)["name"]
    # "glam-tester"
    server.close()
    ```
    """

    def __init__(self, storage_dir, port=0):
        self.storage_dir = pathlib.Path(storage_dir)
        (self.storage_dir / "blobs").mkdir(parents=True, exist_ok=True)
        self.write_token = "hf_write_" + secrets.token_hex(16)
        self.read_token = "hf_read_" + secrets.token_hex(16)
        self.scoped_token = "hf_scoped_" + secrets.token_hex(16)
        self.oidc_id_token = "oidc_id_" + secrets.token_hex(16)
        self.oidc_token = "hf_oidc_" + secrets.token_hex(16)
        self._tokens = {
            self.write_token: HubToken("write", "write-token"),
            self.read_token: HubToken("read", "read-token"),
            self.scoped_token: HubToken(
                "fineGrained",
                "scoped-token",
                scoped=(("user", USER, ("repo.content.read", "repo.write")),),
            ),
            self.oidc_token: HubToken("write", "oidc-token"),
        }
        self._org_roles = {WRITABLE_ORG: "write", READ_ONLY_ORG: "read"}
        self._repos = {}
        self._commit_counter = itertools.count()
        self._faults = collections.defaultdict(collections.deque)
        self._lock = threading.RLock()
        self.requests = []
        self._port = port
        self._httpd = None
        self._thread = None
        self._routes = self._build_routes()

    # ----------------------------------------------------------------------------------------
    # Lifecycle and fault injection.

    @property
    def port(self):
        return self._port

    @property
    def url(self):
        return f"http://127.0.0.1:{self._port}"

    def start(self):
        """Listen (again) on the same port; returns `self`."""
        if self._httpd is not None:
            return self
        self._httpd = _ThreadingServer(("127.0.0.1", self._port), _Handler, self)
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self):
        """Go down: close the listening socket and every open connection (connection refused)."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd.close_live_connections()
        self._thread.join()
        self._httpd = None
        self._thread = None

    @contextlib.contextmanager
    def down(self):
        """The server is down inside the block and back on the same port after it."""
        self.stop()
        try:
            yield self
        finally:
            self.start()

    def close(self):
        self.stop()

    def fail_next(self, kind, times=1, status=500, headers=None, message=None):
        """Answer the next `times` requests of `kind` with HTTP `status`, without acting on them.

        `headers` (a dict, e.g. `{"Retry-After": "3"}`) are added to the answers; `message`
        replaces the error message (the `X-Error-Message` the client puts in its exception).
        """
        fault = _Fault(status=status, headers=tuple((headers or {}).items()), message=message)
        self._queue_faults(kind, times, fault)

    def drop_next(self, kind, times=1, stage="before_processing"):
        """Close the connection on the next `times` requests of `kind`.

        `stage`: "before_processing" (the request is read, nothing is done, no answer),
        "after_processing" (the request takes effect, its answer is lost) or "mid_body" (for
        downloads: the headers and half of the body are sent, then the connection closes).
        """
        if stage not in DROP_STAGES:
            raise ValueError(f"stage must be one of {DROP_STAGES}, got {stage!r}.")
        self._queue_faults(kind, times, _Fault(drop_stage=stage))

    def _queue_faults(self, kind, times, fault):
        if kind not in REQUEST_KINDS:
            raise ValueError(f"kind must be one of {REQUEST_KINDS}, got {kind!r}.")
        with self._lock:
            self._faults[kind].extend([fault] * times)

    def requests_of(self, kind):
        """The recorded requests of one kind, in order."""
        with self._lock:
            return [request for request in self.requests if request.kind == kind]

    # ----------------------------------------------------------------------------------------
    # Server-side views, for assertions.

    def repo_exists(self, repo_id):
        with self._lock:
            return repo_id in self._repos

    def is_private(self, repo_id):
        with self._lock:
            return self._repos[repo_id].private

    def commits(self, repo_id, revision="main"):
        """The history of `revision`, newest first, as `CommitRecord`s."""
        with self._lock:
            repo = self._repos[repo_id]
            commit = repo.commits[self._resolve_revision(repo, revision)]
            history = []
            while commit is not None:
                history.append(commit)
                commit = repo.commits.get(commit.parent)
            return history

    def files(self, repo_id, revision="main"):
        """`{path: bytes}` of the repository at `revision`."""
        with self._lock:
            repo = self._repos[repo_id]
            tree = repo.commits[self._resolve_revision(repo, revision)].files
            return {path: self._read_blob(blob_id) for path, blob_id in tree.items()}

    # ----------------------------------------------------------------------------------------
    # Request handling.

    def _build_routes(self):
        repo = rf"/api/models/(?P<namespace>{_SEGMENT})/(?P<name>{_SEGMENT})"
        revision = rf"(?P<revision>{_SEGMENT})"
        return [
            _Route({"GET"}, r"/api/whoami-v2", "whoami", self._whoami),
            _Route({"POST"}, r"/oauth/token", "oidc_exchange", self._oidc_exchange),
            _Route({"POST"}, r"/api/repos/create", "create_repo", self._create_repo),
            _Route({"POST"}, r"/api/validate-yaml", "validate_yaml", self._validate_yaml),
            _Route({"GET"}, repo, "repo_info", self._repo_info),
            _Route({"GET"}, rf"{repo}/revision/{revision}", "repo_info", self._repo_info),
            _Route(
                {"POST"},
                rf"{repo}/branch/(?P<branch>{_SEGMENT})",
                "create_branch",
                self._create_branch,
            ),
            _Route({"POST"}, rf"{repo}/preupload/{revision}", "preupload", self._preupload),
            _Route({"POST"}, rf"{repo}/commit/{revision}", "commit", self._commit),
            _Route({"GET"}, rf"{repo}/commits/{revision}", "list_commits", self._list_commits),
            _Route({"GET"}, rf"{repo}/tree/{revision}(?:/(?P<path>.+))?", "tree", self._tree),
            _Route({"POST"}, rf"{repo}/paths-info/{revision}", "paths_info", self._paths_info),
            _Route(
                {"HEAD"},
                rf"/(?P<namespace>{_SEGMENT})/(?P<name>{_SEGMENT})/resolve/{revision}/(?P<path>.+)",
                "file_metadata",
                self._resolve,
            ),
            _Route(
                {"GET"},
                rf"/(?P<namespace>{_SEGMENT})/(?P<name>{_SEGMENT})/resolve/{revision}/(?P<path>.+)",
                "download",
                self._resolve,
            ),
        ]

    def _handle(self, handler):
        split = urllib.parse.urlsplit(handler.path)
        method = handler.command
        route, match = self._match(method, split.path)
        kind = route.kind if route else "unsupported"
        body = self._read_body(handler)
        token = self._authenticate(handler.headers)
        with self._lock:
            fault = self._faults[kind].popleft() if self._faults[kind] else None
        if fault is not None and fault.status is not None:
            error = _HubError(
                fault.status,
                fault.message or f"Injected fault: HTTP {fault.status}",
                headers=dict(fault.headers),
            )
            response = self._error_response(error)
        elif fault is not None and fault.drop_stage == "before_processing":
            response = None
        else:
            request = _Request(urllib.parse.parse_qs(split.query), handler.headers, body, token)
            response = self._respond(route, match, request, f"{method} {split.path}")
            if fault is not None and fault.drop_stage == "after_processing":
                response = None
        mid_body = response is not None and fault is not None and fault.drop_stage == "mid_body"
        status = None if response is None or mid_body else response[0]
        # Recorded before answering: a client that has its answer may assert on the record.
        user = USER if token else None
        with self._lock:
            self.requests.append(RecordedRequest(method, split.path, kind, status, user))
        if response is None:
            self._drop(handler)
        elif mid_body:
            status, headers, payload = response
            headers = {**headers, "Content-Length": str(len(payload))}
            self._send(handler, method, status, headers, payload[: len(payload) // 2])
            self._drop(handler)
        else:
            self._send(handler, method, *response)

    def _respond(self, route, match, request, description):
        try:
            if route is None:
                raise _HubError(404, f"{description} is not implemented by the test Hub")
            if request.token is False:
                raise _HubError(401, _INVALID_CREDENTIALS)
            request.params = {
                key: urllib.parse.unquote(value)
                for key, value in match.groupdict().items()
                if value
            }
            return route.handler(request)
        except _HubError as error:
            return self._error_response(error)
        except Exception as error:  # a bug of this server: say so instead of dropping the line
            message = f"Test Hub bug on {description}: {type(error).__name__}: {error}"
            return self._error_response(_HubError(500, message))

    def _match(self, method, path):
        for route in self._routes:
            match = route.regex.fullmatch(path)
            if match and method in route.methods:
                return route, match
        return None, None

    @staticmethod
    def _read_body(handler):
        if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    handler.rfile.readline()
                    return b"".join(chunks)
                chunks.append(handler.rfile.read(size))
                handler.rfile.readline()
        length = int(handler.headers.get("Content-Length") or 0)
        return handler.rfile.read(length) if length else b""

    def _authenticate(self, headers):
        """The caller's `HubToken`, None without a token, False for an unknown one."""
        authorization = headers.get("Authorization")
        if not authorization:
            return None
        scheme, _, value = authorization.partition(" ")
        token = self._tokens.get(value.strip()) if scheme.lower() == "bearer" else None
        return token or False

    @staticmethod
    def _drop(handler):
        handler.wfile.flush()
        handler.close_connection = True
        with contextlib.suppress(OSError):
            handler.connection.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _send(handler, method, status, headers, payload):
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        if "Content-Length" not in headers:
            handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(payload)

    @staticmethod
    def _json(payload, status=200, headers=None):
        return (
            status,
            {"Content-Type": "application/json", **(headers or {})},
            json.dumps(payload).encode(),
        )

    def _error_response(self, error):
        headers = {
            "X-Error-Message": error.message.encode("ascii", "replace").decode(),
            **error.headers,
        }
        if error.code:
            headers["X-Error-Code"] = error.code
        return self._json({"error": error.message}, status=error.status, headers=headers)

    # ----------------------------------------------------------------------------------------
    # Authorization and lookup helpers (call with the lock held where state is read).

    def _writable_namespace(self, token, namespace, repo_id):
        if token.role == "write":
            return namespace == USER or self._org_roles.get(namespace) in _WRITING_ORG_ROLES
        if token.role == "fineGrained":
            return any(
                "repo.write" in permissions
                and (
                    (entity_type in ("user", "org") and entity_name == namespace)
                    or (entity_type == "model" and entity_name == repo_id)
                )
                for entity_type, entity_name, permissions in token.scoped
            )
        return False

    def _require_write(self, request, namespace, repo_id, action):
        if request.token is None:
            raise _HubError(401, f"You must be authenticated to {action}")
        if not self._writable_namespace(request.token, namespace, repo_id):
            raise _HubError(
                403, f'You don\'t have the rights to {action} under the namespace "{namespace}"'
            )

    def _can_read_private(self, token, namespace, repo_id):
        if token is None:
            return False
        if token.role == "fineGrained":
            return any(
                (entity_type in ("user", "org") and entity_name == namespace)
                or (entity_type == "model" and entity_name == repo_id)
                for entity_type, entity_name, _ in token.scoped
            )
        return namespace == USER or namespace in self._org_roles

    def _readable_repo(self, request):
        namespace = request.params["namespace"]
        repo_id = f"{namespace}/{request.params['name']}"
        repo = self._repos.get(repo_id)
        visible = repo is not None and (
            not repo.private or self._can_read_private(request.token, namespace, repo_id)
        )
        if not visible:
            raise _HubError(
                401 if request.token is None else 404,
                f"Repository Not Found for model {repo_id}",
                code="RepoNotFound",
            )
        return repo

    @staticmethod
    def _resolve_revision(repo, revision):
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        raise _HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    def _branch_head(self, repo, branch):
        if branch not in repo.branches:
            raise _HubError(
                404,
                f"Invalid rev id: {branch} is not a branch of {repo.repo_id}",
                code="RevisionNotFound",
            )
        return repo.branches[branch]

    def _write_blob(self, content):
        blob_id = git_blob_id(content)
        path = self.storage_dir / "blobs" / blob_id
        if not path.exists():
            path.write_bytes(content)
        return blob_id

    def _read_blob(self, blob_id):
        return (self.storage_dir / "blobs" / blob_id).read_bytes()

    def _add_commit(self, repo, parent, files, title, description, author):
        tree = "\n".join(f"{path} {blob}" for path, blob in sorted(files.items()))
        serial = next(self._commit_counter)
        seed = f"{repo.repo_id}\n{parent}\n{tree}\n{title}\n{description}\n{serial}"
        commit = CommitRecord(
            commit_id=hashlib.sha1(seed.encode()).hexdigest(),
            parent=parent,
            title=title,
            description=description,
            author=author,
            date=_now(),
            files=dict(files),
        )
        repo.commits[commit.commit_id] = commit
        return commit

    # ----------------------------------------------------------------------------------------
    # Endpoints.

    def _oidc_exchange(self, request):
        payload = request.json()
        if payload.get("subject_token") != self.oidc_id_token or not payload.get("resource"):
            raise _HubError(401, "Invalid OIDC id token or resource")
        # expires_in=0: the client caches an exchanged token until it expires.
        return self._json(
            {"access_token": self.oidc_token, "token_type": "bearer", "expires_in": 0}
        )

    def _whoami(self, request):
        token = request.token
        if token is None:
            raise _HubError(401, "You must be authenticated to call whoami")
        access_token = {
            "displayName": token.display_name,
            "role": token.role,
            "createdAt": "2024-01-01T00:00:00.000Z",
        }
        if token.role == "fineGrained":
            access_token["fineGrained"] = {
                "canReadGatedRepos": False,
                "global": [],
                "scoped": [
                    {
                        "entity": {"_id": f"id-{name}", "type": kind, "name": name},
                        "permissions": list(permissions),
                    }
                    for kind, name, permissions in token.scoped
                ],
            }
        orgs = [
            {"type": "org", "id": f"id-{name}", "name": name, "fullname": name, "roleInOrg": role}
            for name, role in self._org_roles.items()
        ]
        return self._json(
            {
                "type": "user",
                "id": f"id-{USER}",
                "name": USER,
                "fullname": "GLaM Tester",
                "email": None,
                "emailVerified": False,
                "isPro": False,
                "canPay": False,
                "orgs": orgs,
                "auth": {"type": "access_token", "accessToken": access_token},
            }
        )

    def _create_repo(self, request):
        payload = request.json()
        name, organization = payload.get("name"), payload.get("organization")
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]{1,96}", name):
            raise _HubError(400, f"Invalid repository name: {name!r}")
        if payload.get("type", "model") != "model":
            raise _HubError(
                400, f"The test Hub only hosts model repositories, not {payload['type']!r}"
            )
        if payload.get("visibility", "public") not in ("public", "private"):
            raise _HubError(400, f"Invalid visibility: {payload['visibility']!r}")
        namespace = organization if organization is not None else USER
        repo_id = f"{namespace}/{name}"
        with self._lock:
            self._require_write(request, namespace, repo_id, "create a model")
            repo_url = f"{self.url}/{repo_id}"
            if repo_id in self._repos:
                return self._json(
                    {"error": "You already created this model repo", "url": repo_url}, status=409
                )
            repo = _Repo(repo_id, private=payload.get("visibility") == "private", created_at=_now())
            initial = self._add_commit(
                repo,
                None,
                {".gitattributes": self._write_blob(_GITATTRIBUTES)},
                "initial commit",
                "",
                USER,
            )
            repo.branches["main"] = initial.commit_id
            self._repos[repo_id] = repo
        return self._json({"url": repo_url, "name": repo_id, "id": f"id-{repo_id}"})

    def _validate_yaml(self, request):
        payload = request.json()
        content = payload.get("content")
        if not isinstance(content, str):
            raise _HubError(400, "`content` must be a string")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.DOTALL)
        if match is None:
            return self._json(
                {
                    "errors": [],
                    "warnings": [{"message": "Empty or missing yaml metadata in repo card"}],
                }
            )
        try:
            metadata = yaml.safe_load(match.group(1))
        except yaml.YAMLError as error:
            return self._json(
                {"errors": [{"message": f"Invalid YAML: {error}"}], "warnings": []}, status=400
            )
        if not isinstance(metadata, dict):
            return self._json(
                {"errors": [{"message": "YAML metadata must be a mapping"}], "warnings": []},
                status=400,
            )
        return self._json({"errors": [], "warnings": []})

    def _repo_info(self, request):
        with self._lock:
            repo = self._readable_repo(request)
            commit = repo.commits[
                self._resolve_revision(repo, request.params.get("revision", "main"))
            ]
            return self._json(
                {
                    "id": repo.repo_id,
                    "modelId": repo.repo_id,
                    "author": repo.repo_id.split("/")[0],
                    "sha": commit.commit_id,
                    "lastModified": commit.date,
                    "createdAt": repo.created_at,
                    "private": repo.private,
                    "disabled": False,
                    "gated": False,
                    "downloads": 0,
                    "likes": 0,
                    "tags": [],
                    "siblings": [{"rfilename": path} for path in sorted(commit.files)],
                }
            )

    def _create_branch(self, request):
        starting_point = request.json().get("startingPoint") if request.body else None
        with self._lock:
            repo = self._readable_repo(request)
            self._require_write(
                request, request.params["namespace"], repo.repo_id, "create a branch"
            )
            branch = request.params["branch"]
            if branch in repo.branches:
                raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = self._resolve_revision(repo, starting_point or "main")
        return self._json({})

    def _preupload(self, request):
        files = request.json().get("files")
        if not isinstance(files, list) or not files:
            raise _HubError(400, "`files` must be a non-empty list")
        with self._lock:
            repo = self._readable_repo(request)
            self._require_write(request, request.params["namespace"], repo.repo_id, "upload files")
            tree = repo.commits[self._branch_head(repo, request.params["revision"])].files
            answers = []
            for entry in files:
                path = _validate_repo_path(entry.get("path", ""))
                size = entry.get("size")
                try:
                    sample = base64.b64decode(entry.get("sample", ""), validate=True)
                except (ValueError, TypeError):
                    raise _HubError(400, f"`sample` of {path!r} is not base64") from None
                if not isinstance(size, int) or size < len(sample) or len(sample) > 512:
                    raise _HubError(400, f"Inconsistent `size`/`sample` for {path!r}")
                answer = {"path": path, "uploadMode": "regular", "shouldIgnore": False}
                if path in tree:
                    answer["oid"] = tree[path]
                answers.append(answer)
        return self._json(
            {"files": answers, "commitOid": repo.branches[request.params["revision"]]}
        )

    def _commit(self, request):
        if request.headers.get("Content-Type", "").split(";")[0].strip() != "application/x-ndjson":
            raise _HubError(400, "A commit must be sent as application/x-ndjson")
        if "create_pr" in request.query:
            raise _HubError(400, "Pull requests are not implemented by the test Hub")
        try:
            lines = [
                json.loads(line) for line in request.body.decode().splitlines() if line.strip()
            ]
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _HubError(400, f"Invalid NDJSON commit payload: {error}") from None
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "The first NDJSON line of a commit must be its header")
        header = lines[0].get("value") or {}
        title = header.get("summary")
        if not isinstance(title, str) or not title.strip():
            raise _HubError(400, "The commit summary (message) must not be empty")
        description = header.get("description", "")
        with self._lock:
            repo = self._readable_repo(request)
            self._require_write(request, request.params["namespace"], repo.repo_id, "commit")
            branch = request.params["revision"]
            head = self._branch_head(repo, branch)
            if header.get("parentCommit") not in (None, head):
                raise _HubError(
                    412, f"Parent commit {header['parentCommit']} is not the head of {branch}"
                )
            files = dict(repo.commits[head].files)
            for line in lines[1:]:
                self._apply_operation(files, line.get("key"), line.get("value") or {})
            commit = self._add_commit(repo, head, files, title, description, USER)
            repo.branches[branch] = commit.commit_id
        return self._json(
            {
                "success": True,
                "commitOid": commit.commit_id,
                "commitUrl": f"{self.url}/{repo.repo_id}/commit/{commit.commit_id}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _apply_operation(self, files, key, value):
        path = value.get("path", "")
        if key == "deletedFolder" and isinstance(path, str):
            path = path.rstrip("/")  # the client may mark a folder with a trailing slash
        path = _validate_repo_path(path)
        if key == "file":
            if value.get("encoding") != "base64":
                raise _HubError(
                    400, f"Unsupported encoding for {path!r}: {value.get('encoding')!r}"
                )
            try:
                content = base64.b64decode(value.get("content", ""), validate=True)
            except (ValueError, TypeError):
                raise _HubError(400, f"Content of {path!r} is not valid base64") from None
            if any(existing.startswith(path + "/") for existing in files) or any(
                parent in files
                for parent in itertools.accumulate(path.split("/")[:-1], lambda a, b: f"{a}/{b}")
            ):
                raise _HubError(400, f"{path!r} conflicts with a file or folder of the same name")
            files[path] = self._write_blob(content)
        elif key == "deletedFile":
            if path not in files:
                raise _HubError(
                    404, f"A file with this name doesn't exist: {path}", code="EntryNotFound"
                )
            del files[path]
        elif key == "deletedFolder":
            prefix = path + "/"
            doomed = [existing for existing in files if existing.startswith(prefix)]
            if not doomed:
                raise _HubError(
                    404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound"
                )
            for existing in doomed:
                del files[existing]
        elif key == "lfsFile":
            raise _HubError(
                400, "LFS files are not implemented by the test Hub (preupload answers 'regular')"
            )
        else:
            raise _HubError(400, f"Unknown commit operation {key!r}")

    def _list_commits(self, request):
        with self._lock:
            repo = self._readable_repo(request)
            history = self.commits(repo.repo_id, request.params["revision"])
        return self._json(
            [
                {
                    "id": commit.commit_id,
                    "title": commit.title,
                    "message": commit.description,
                    "date": commit.date,
                    "authors": [{"user": commit.author}],
                }
                for commit in history
            ]
        )

    @staticmethod
    def _entries(files, prefix, recursive):
        """Tree entries (files and folders) under `prefix` ("" for the root)."""
        entries = {}
        for path, blob_id in sorted(files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            relative = path[len(prefix) + 1 :] if prefix else path
            parts = relative.split("/")
            depth = len(parts) if recursive else 1
            for level in range(1, min(depth, len(parts)) + 1):
                entry_path = "/".join(filter(None, [prefix, *parts[:level]]))
                if level == len(parts):
                    entries[entry_path] = {"type": "file", "oid": blob_id, "path": entry_path}
                else:
                    folder_id = hashlib.sha1(f"tree {entry_path}".encode()).hexdigest()
                    entries.setdefault(
                        entry_path,
                        {"type": "directory", "oid": folder_id, "size": 0, "path": entry_path},
                    )
        return entries

    def _tree(self, request):
        recursive = request.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = request.params.get("path", "").strip("/")
        with self._lock:
            repo = self._readable_repo(request)
            files = repo.commits[self._resolve_revision(repo, request.params["revision"])].files
            if prefix and prefix in files:
                raise _HubError(400, f"{prefix!r} is a file, not a folder")
            entries = self._entries(files, prefix, recursive)
            if prefix and not entries:
                raise _HubError(404, f"Folder {prefix!r} not found", code="EntryNotFound")
            for entry in entries.values():
                if entry["type"] == "file":
                    entry["size"] = len(self._read_blob(entry["oid"]))
        return self._json(list(entries.values()))

    def _paths_info(self, request):
        form = urllib.parse.parse_qs(request.body.decode())
        paths = form.get("paths", [])
        with self._lock:
            repo = self._readable_repo(request)
            files = repo.commits[self._resolve_revision(repo, request.params["revision"])].files
            everything = self._entries(files, "", recursive=True)
            found = [
                dict(everything[path.strip("/")]) for path in paths if path.strip("/") in everything
            ]
            for entry in found:
                if entry["type"] == "file":
                    entry["size"] = len(self._read_blob(entry["oid"]))
        return self._json(found)

    def _resolve(self, request):
        path = request.params["path"]
        with self._lock:
            repo = self._readable_repo(request)
            commit_id = self._resolve_revision(repo, request.params["revision"])
            blob_id = repo.commits[commit_id].files.get(path)
            if blob_id is None:
                raise _HubError(
                    404,
                    f"Entry not found: {path}",
                    code="EntryNotFound",
                    headers={"X-Repo-Commit": commit_id},
                )
            content = self._read_blob(blob_id)
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{blob_id}"',
            "X-Repo-Commit": commit_id,
            "Accept-Ranges": "bytes",
        }
        byte_range = request.headers.get("Range")
        if byte_range is None:
            return 200, headers, content
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", byte_range.strip())
        start = int(match.group(1)) if match else len(content)
        end = (
            min(int(match.group(2)), len(content) - 1)
            if match and match.group(2)
            else len(content) - 1
        )
        if start >= len(content) or start > end:
            raise _HubError(
                416,
                f"Range not satisfiable: {byte_range}",
                headers={"Content-Range": f"bytes */{len(content)}"},
            )
        headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        return 206, headers, content[start : end + 1]


# --------------------------------------------------------------------------------------------
# Client configuration and the offline cache.


def point_huggingface_hub_at(monkeypatch, url):
    """Make the already-imported `huggingface_hub` talk to `url`; undone by `monkeypatch`.

    Patches every copy of the endpoint listed in the module docstring: module attributes named
    `ENDPOINT` or `HUGGINGFACE_CO_URL_TEMPLATE` in any loaded `huggingface_hub` module (their
    endpoint prefix is replaced) and the module-level `HfApi` instance.
    """
    import huggingface_hub.constants as constants
    import huggingface_hub.hf_api as hf_api

    monkeypatch.setenv("HF_ENDPOINT", url)
    previous = constants.ENDPOINT
    for module_name, module in list(sys.modules.items()):
        if module is None or not (
            module_name == "huggingface_hub" or module_name.startswith("huggingface_hub.")
        ):
            continue
        for attribute in ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE"):
            value = vars(module).get(attribute)  # vars(): never trigger the package's lazy imports
            if isinstance(value, str) and value.startswith(previous):
                monkeypatch.setattr(module, attribute, url + value[len(previous) :])
    monkeypatch.setattr(hf_api.api, "endpoint", url)


def set_hub_offline(monkeypatch, offline=True):
    """Turn `HF_HUB_OFFLINE` on (or off) for the imported client; undone by `monkeypatch`."""
    import huggingface_hub.constants as constants

    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


def build_hub_cache(cache_dir, repo_id, files, *, commit_id=None, revision="main"):
    """Write a Hugging Face cache entry by hand, as `hf_hub_download` would leave it.

    Layout: `models--{org}--{name}/refs/{revision}` holds the commit id (no trailing newline) and
    `models--{org}--{name}/snapshots/{commit_id}/{path}` the files.

    Args:
        cache_dir: the cache root (`HF_HUB_CACHE`).
        repo_id: "org/name".
        files: `{path: bytes}`.
        commit_id: 40 hex digits; derived from the contents when None.
        revision: the branch whose ref points at the commit.

    Returns:
        The commit id.
    """
    if commit_id is None:
        listing = "".join(
            f"{path}\n{git_blob_id(content)}\n" for path, content in sorted(files.items())
        )
        commit_id = hashlib.sha1(listing.encode()).hexdigest()
    repo_dir = pathlib.Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit_id)
    for path, content in files.items():
        target = repo_dir / "snapshots" / commit_id / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return commit_id


@pytest.fixture
def hub_server(tmp_path_factory, monkeypatch):
    """A running `HubServer` with `huggingface_hub` pointed at it.

    Sets `HF_ENDPOINT`, `HF_HUB_DISABLE_XET=1`, `HF_TOKEN` (the server's write token), a fresh
    `HF_HUB_CACHE` and an empty stored-login location, in the environment and in the imported
    client; everything is restored and the server stopped after the test.
    """
    import huggingface_hub
    import huggingface_hub.constants as constants

    root = tmp_path_factory.mktemp("hub")
    server = HubServer(root / "storage").start()
    point_huggingface_hub_at(monkeypatch, server.url)
    set_hub_offline(monkeypatch, offline=False)
    settings = {
        "HF_HUB_DISABLE_XET": ("1", True),
        "HF_HUB_CACHE": (str(root / "cache"), str(root / "cache")),
        "HF_TOKEN_PATH": (str(root / "home" / "token"), str(root / "home" / "token")),
    }
    for name, (environment_value, constant_value) in settings.items():
        monkeypatch.setenv(name, environment_value)
        monkeypatch.setattr(constants, name, constant_value)
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(root / "home" / "stored_tokens"))
    monkeypatch.setenv("HF_TOKEN", server.write_token)
    for name in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)

    addressed = {
        "hf_hub_url": huggingface_hub.hf_hub_url("org/name", "config.json"),
        "huggingface_hub.create_repo": huggingface_hub.create_repo.__self__.endpoint,
        "HfApi()": huggingface_hub.HfApi().endpoint,
    }
    missed = {entry: url for entry, url in addressed.items() if not url.startswith(server.url)}
    if missed:
        server.close()
        raise RuntimeError(
            f"huggingface_hub still addresses another endpoint through {missed}: a copy of "
            "constants.ENDPOINT was missed; update point_huggingface_hub_at()."
        )
    try:
        yield server
    finally:
        server.close()
