"""A small client of the dispatcher's task API for Python UDFs.

A `Task` is made by the runner for each invocation (`context.task`). It
holds the attempt's capability token and refreshes it from the runner's
host before it expires, so it keeps working for a task longer than one
token's lifetime. Standard library only.
"""

import base64
import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
import uuid


class TaskError(Exception):
    """A refused call: `status`, and the contract's error `code`."""

    def __init__(self, status, code, message):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def _exp(token):
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        return int(json.loads(base64.urlsafe_b64decode(payload))["exp"])
    except Exception:
        return 0


class Task:
    def __init__(self, envelope, request_id=None):
        d = envelope.get("dispatcher", {})
        t = envelope.get("task", {})
        self.url = d.get("url", "").rstrip("/")
        self._token = d.get("token", "")
        self._token_url = d.get("token_url")
        self.task_id = t.get("task_id")
        self.job_id = t.get("job_id")
        self.key = t.get("key")
        self.attempt = t.get("attempt")
        self.object_prefix = t.get("object_prefix", "")
        self.outputs = t.get("outputs", [])
        self.reads = t.get("reads", [])
        self._seq = 0
        # As a Lambda function there is no host to ask (ADR 0026): the
        # token is refreshed here by a heartbeat of the attempt's own, every
        # `refresh_seconds`, while the invocation runs.
        self._done = threading.Event()
        every = d.get("refresh_seconds")
        if not self._token_url and every:
            threading.Thread(target=self._refresh, args=(float(every),), daemon=True).start()

    def _refresh(self, every):
        while not self._done.wait(every):
            try:
                self._token = self.call("/v1/task/heartbeat", {})["capability_token"]
            except Exception:  # stale or gone: the attempt is over
                return

    def close(self):
        """Ends the invocation's token refresh."""
        self._done.set()

    # -- the token --------------------------------------------------------
    def token(self, refresh=False):
        """The newest capability token: asked of the host when it is within
        a minute of expiry (the wrapper's heartbeats refresh it)."""
        if self._token_url and (refresh or _exp(self._token) - time.time() < 60):
            try:
                with urllib.request.urlopen(self._token_url, timeout=10) as r:
                    self._token = json.loads(r.read())["token"]
            except (urllib.error.URLError, OSError, ValueError, KeyError):
                pass
        return self._token

    def call(self, path, body):
        data = json.dumps(body).encode()
        for attempt in (1, 2):
            headers = {"Authorization": f"Bearer {self.token(refresh=attempt == 2)}",
                       "Content-Type": "application/json"}
            # The invocation's trace context: the dispatcher's span of
            # this call joins the task's trace.
            if os.environ.get("TRACEPARENT"):
                headers["traceparent"] = os.environ["TRACEPARENT"]
            req = urllib.request.Request(self.url + path, data=data, method="POST", headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return json.loads(r.read() or b"null")
            except urllib.error.HTTPError as e:
                raw = e.read()
                if e.code == 401 and attempt == 1:
                    continue
                try:
                    err = json.loads(raw)["error"]
                    raise TaskError(e.code, err.get("code"), err.get("message")) from None
                except (ValueError, KeyError, TypeError):
                    raise TaskError(e.code, "unknown", raw[:500].decode("utf-8", "replace")) from None

    # -- the task API -----------------------------------------------------
    def emit(self, kind, payload):
        """Records one event of this attempt."""
        seq, self._seq = self._seq, self._seq + 1
        return self.call("/v1/task/events", {"events": [{"seq": seq, "kind": kind, "payload": payload}]})

    def object_urls(self, keys, method="PUT"):
        return self.call("/v1/task/objects", {"method": method, "keys": list(keys)})["urls"]

    def put_object(self, name, data):
        """Uploads bytes at `name` under the attempt's prefix; the absolute key."""
        url = self.object_urls([name], "PUT")[0]
        req = urllib.request.Request(url["url"], data=data, method="PUT")
        with urllib.request.urlopen(req, timeout=300):
            pass
        return url["key"]

    def get_object(self, key):
        url = self.object_urls([key], "GET")[0]
        with urllib.request.urlopen(url["url"], timeout=300) as r:
            return r.read()

    @staticmethod
    def _ndjson(rows):
        return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows).encode()

    def stage(self, dataset, rows, part=0):
        """Stages `rows` as one part of a new version of `dataset` (one of
        the task's outputs); committed when the task succeeds."""
        body = self._ndjson(rows)
        key = self.put_object(f"{dataset}/part-{part}.jsonl", body)
        return self.call("/v1/task/dataset-stage", {"dataset": dataset, "parts": [{
            "key": key, "rows": len(rows), "sha256": hashlib.sha256(body).hexdigest(),
            "bytes": len(body)}]})

    def publish(self, dataset, rows, batch_id=None):
        """Publishes `rows` as one buffer batch to the stream `dataset`."""
        batch_id = str(batch_id or uuid.uuid4())
        body = self._ndjson(rows)
        key = self.put_object(f"buffers/{batch_id}.jsonl", body)
        return self.call("/v1/task/buffer-publish", {
            "batch_id": batch_id, "dataset": dataset, "object_key": key,
            "rows": len(rows), "sha256": hashlib.sha256(body).hexdigest()})

    def query(self, dataset, where=None, select=None, order_by=None, limit=None, version=None):
        """Reads one of the task's `reads` through the query service."""
        body = {"dataset": dataset}
        for k, v in (("where", where), ("select", select), ("order_by", order_by),
                     ("limit", limit), ("version", version)):
            if v is not None:
                body[k] = v
        return self.call("/v1/query", body)
