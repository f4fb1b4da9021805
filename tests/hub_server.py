# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""A Hub-compatible HTTP server on 127.0.0.1 for the tests (stdlib only, in memory).

It implements the endpoints that the real `huggingface_hub` client (2.4) and `transformers` call to create a repo,
push files (preupload, LFS batch + PUT, NDJSON commit) and read them back (model info, tree, paths-info, resolve).
The client is driven unmodified: point it here with `HF_ENDPOINT=<server.url>`, `HF_TOKEN=<one of server.tokens>`,
a temporary `HF_HOME` and `HF_HUB_DISABLE_XET=1` (hf-xet is installed; without that flag LFS files go through Xet).

Not implemented: branches, pull requests, per-revision history (every revision name resolves to the latest
commit), Xet, datasets/spaces. Writes need a valid token (401 otherwise); a request that carries an invalid token is
refused (401) as on the real Hub. `fail(...)` injects HTTP errors, `pause()` / `resume()` take the port down and
back up.

    python tests/hub_server.py --port 8765      # standalone, for trying `push_to_hub` by hand
"""

import argparse
import base64
import hashlib
import json
import re
import socket
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


DEFAULT_TOKEN = "hf_depthstop_test_token"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".gguf", ".msgpack", ".npz", ".zip")
REGULAR_MAX_BYTES = 10 * 1024 * 1024
_REPO = r"(?P<repo>[^/]+/[^/]+?)"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Repo:
    def __init__(self, repo_id: str, private: bool):
        self.repo_id = repo_id
        self.private = private
        self.files: dict[str, dict] = {}  # path -> {"data", "lfs", "sha256", "blob"}
        self.commits: list[dict] = []
        self.created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        self.sha = hashlib.sha1(f"init {repo_id} {time.time_ns()}".encode()).hexdigest()


class HubServer:
    """In-memory Hub. `with HubServer() as hub: ...` or `hub.start()` / `hub.stop()`; `hub.url` is the endpoint.

    Inspect `hub.repos[repo_id].files`, `hub.requests` (method, path, status) after the client ran."""

    def __init__(self, port: int = 0, tokens: tuple[str, ...] = (DEFAULT_TOKEN,), user: str = "tester"):
        self.port = port
        self.tokens = set(tokens)
        self.user = user
        self.repos: dict[str, _Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, int]] = []
        self._faults: list[dict] = []
        self._lock = threading.Lock()
        self._connections: set = set()  # open client sockets, closed by stop() so "down" means down
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "HubServer":
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = self._thread = None
            with self._lock:
                connections, self._connections = list(self._connections), set()
            for sock in connections:  # kept-alive connections would otherwise go on being served
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    pause = stop  # the port stops answering (connection refused); the stored repos stay

    def resume(self) -> None:
        """Listen again on the same port, with the same repos."""
        self.start()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ test controls
    def fail(self, pattern: str, status: int = 500, times: int = 1, method: str | None = None) -> None:
        """The next `times` requests whose path matches the regex `pattern` (and `method`, if given) get `status`."""
        with self._lock:
            self._faults.append({"pattern": re.compile(pattern), "status": status, "times": times, "method": method})

    def file(self, repo_id: str, path: str) -> bytes:
        return self.repos[repo_id].files[path]["data"]

    def _take_fault(self, method: str, path: str) -> int | None:
        with self._lock:
            for fault in self._faults:
                if fault["times"] > 0 and fault["pattern"].search(path) and fault["method"] in (None, method):
                    fault["times"] -= 1
                    return fault["status"]
        return None


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet; see `hub.requests`
        pass

    def setup(self):
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self):
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body=b"", headers: dict | None = None, head: bool = False) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        elif isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self.hub.requests.append((self.command, self.path, status))

    def _error(self, status: int, message: str, code: str | None = None, head: bool = False) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers, head=head)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

    def _authorized(self, write: bool) -> bool:
        """Writes need a known token; any request with an unknown token is refused (as on the Hub)."""
        token = self._token()
        if token is None:
            return not write
        return token in self.hub.tokens

    def _repo(self, repo_id: str, head: bool = False) -> _Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and self._token() not in self.hub.tokens):
            self._error(404, f"Repository Not Found for {repo_id}", "RepoNotFound", head=head)
            return None
        return repo

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        fault = self.hub._take_fault(method, path)
        if fault is not None:
            self._body()
            self._error(fault, f"injected HTTP {fault}", head=method == "HEAD")
            return
        # Reads: GET/HEAD, paths-info, validate-yaml. The LFS PUT target is a capability URL (presigned on the Hub).
        reads = r"/paths-info/|^/api/validate-yaml$|^/lfs-upload/"
        write = method in ("POST", "PUT", "DELETE") and not re.search(reads, path)
        if not self._authorized(write):
            self._body()
            self._error(401, "Invalid credentials in Authorization header", head=method == "HEAD")
            return
        for route_method, pattern, handler in _ROUTES:
            match = re.fullmatch(pattern, path)
            if route_method == method and match:
                try:
                    handler(self, **{k: unquote(v) for k, v in match.groupdict().items() if v is not None})
                except Exception as exc:  # a server bug must reach the client as an answer, not a dropped connection
                    self._error(500, f"hub_server error: {type(exc).__name__}: {exc}", head=method == "HEAD")
                return
        self._body()
        self._error(404, f"no route for {method} {path}", head=method == "HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # ------------------------------------------------------------------ endpoints
    def whoami(self):
        self._send(200, {"type": "user", "name": self.hub.user, "auth": {"accessToken": {"role": "write"}}})

    def create_repo(self):
        payload = json.loads(self._body() or b"{}")
        if payload.get("type", "model") not in (None, "model"):
            self._error(400, "only model repos are served here")
            return
        name, org = payload.get("name"), payload.get("organization") or self.hub.user
        if not name:
            self._error(400, "name is required")
            return
        repo_id = f"{org}/{name}"
        url = f"{self.hub.url}/{repo_id}"
        with self.hub._lock:
            if repo_id in self.hub.repos:
                message = "You already created this model repo"
                self._send(409, {"error": message, "url": url}, {"X-Error-Message": message})
                return
            self.hub.repos[repo_id] = _Repo(repo_id, payload.get("visibility") == "private" or payload.get("private"))
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def validate_yaml(self):
        self._body()
        self._send(200, {"errors": [], "warnings": []})

    def preupload(self, repo, rev):
        payload = json.loads(self._body())
        repo_obj = self._repo(repo)
        if repo_obj is None:
            return
        files = []
        for item in payload["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = item["path"].endswith(LFS_SUFFIXES) or b"\0" in sample or item["size"] > REGULAR_MAX_BYTES
            stored = repo_obj.files.get(item["path"])
            oid = None
            if stored is not None:
                oid = stored["sha256"] if stored["lfs"] else stored["blob"]
            mode = "lfs" if lfs else "regular"
            files.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": files, "commitOid": repo_obj.sha})

    def lfs_batch(self, repo):
        payload = json.loads(self._body())
        if self._repo(repo) is None:
            return
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_upload(self, oid):
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            self._error(400, f"sha256 mismatch for LFS object {oid}")
            return
        self.hub.lfs_objects[oid] = data
        self._send(200, b"")

    def commit(self, repo, rev):
        body = self._body()
        repo_obj = self._repo(repo)
        if repo_obj is None:
            return
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        new_files = dict(repo_obj.files)
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                content = value["content"]
                data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                new_files[value["path"]] = {
                    "data": data, "lfs": False, "sha256": hashlib.sha256(data).hexdigest(), "blob": git_blob_sha1(data)
                }
            elif key == "lfsFile":
                data = self.hub.lfs_objects.get(value["oid"])
                if data is None:
                    self._error(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                    return
                new_files[value["path"]] = {
                    "data": data, "lfs": True, "sha256": value["oid"], "blob": git_blob_sha1(data)
                }
            elif key == "deletedFile":
                new_files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                new_files = {p: f for p, f in new_files.items() if not p.startswith(prefix)}
            elif key != "header":
                self._error(400, f"unsupported commit operation {key!r}")
                return
        with self.hub._lock:
            repo_obj.files = new_files
            repo_obj.sha = hashlib.sha1(f"{repo_obj.sha} {time.time_ns()} {len(body)}".encode()).hexdigest()
            title = header.get("summary", "")
            repo_obj.commits.append({"oid": repo_obj.sha, "title": title, "files": sorted(new_files)})
        url = f"{self.hub.url}/{repo}/commit/{repo_obj.sha}"
        self._send(200, {"commitUrl": url, "commitOid": repo_obj.sha, "pullRequestUrl": None, "success": True})

    def _entry(self, path: str, stored: dict) -> dict:
        entry = {"type": "file", "path": path, "size": len(stored["data"]), "oid": stored["blob"]}
        if stored["lfs"]:
            entry["lfs"] = {"oid": stored["sha256"], "size": len(stored["data"]), "pointerSize": 134}
        return entry

    def model_info(self, repo, rev=None):
        repo_obj = self._repo(repo)
        if repo_obj is None:
            return
        info = {
            "_id": repo_obj.sha[:24], "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": repo_obj.sha,
            "private": bool(repo_obj.private), "disabled": False, "gated": False, "downloads": 0, "likes": 0,
            "tags": [], "createdAt": repo_obj.created, "lastModified": repo_obj.created,
            "siblings": [{"rfilename": p} for p in sorted(repo_obj.files)],
        }
        self._send(200, info)

    def tree(self, repo, rev, path=""):
        repo_obj = self._repo(repo)
        if repo_obj is None:
            return
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        recursive = parse_qs(urlsplit(self.path).query).get("recursive", ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for file_path in sorted(repo_obj.files):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            entries.append(self._entry(file_path, repo_obj.files[file_path]))
        entries += [{"type": "directory", "path": folder, "size": 0, "oid": "0" * 40} for folder in sorted(folders)]
        self._send(200, entries)

    def paths_info(self, repo, rev):
        body = self._body()
        repo_obj = self._repo(repo)
        if repo_obj is None:
            return
        if (self.headers.get("Content-Type") or "").startswith("application/json"):
            paths = json.loads(body).get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        entries = [self._entry(p, repo_obj.files[p]) for p in paths if p in repo_obj.files]
        self._send(200, entries)

    def resolve(self, repo, rev, path):
        head = self.command == "HEAD"
        repo_obj = self._repo(repo, head=head)
        if repo_obj is None:
            return
        stored = repo_obj.files.get(path)
        if stored is None:
            self._error(404, f"Entry Not Found for {path}", "EntryNotFound", head=head)
            return
        etag = f'"{stored["sha256"] if stored["lfs"] else stored["blob"]}"'
        headers = {"X-Repo-Commit": repo_obj.sha, "ETag": etag, "Content-Type": "application/octet-stream"}
        if stored["lfs"]:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": len(stored["data"])})
        self._send(200, stored["data"], headers, head=head)


_ROUTES = [
    ("GET", r"/api/whoami-v2", _Handler.whoami),
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", _Handler.preupload),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", _Handler.lfs_upload),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", _Handler.commit),
    ("GET", rf"/api/models/{_REPO}", _Handler.model_info),
    ("GET", rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)", _Handler.model_info),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", _Handler.tree),
    ("POST", rf"/api/models/{_REPO}/paths-info/(?P<rev>[^/]+)", _Handler.paths_info),
    ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", _Handler.resolve),
    ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", _Handler.resolve),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    args = parser.parse_args()
    hub = HubServer(port=args.port, tokens=(args.token,)).start()
    print(f"Hub at {hub.url}; use HF_ENDPOINT={hub.url} HF_TOKEN={args.token} HF_HUB_DISABLE_XET=1 (Ctrl-C stops)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":
    main()
