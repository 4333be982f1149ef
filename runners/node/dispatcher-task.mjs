// A small client of the dispatcher's task API for Node UDFs (`context.task`).
// It holds the invocation's capability token and refreshes it from the
// runner's host before it expires, so it keeps working for a task longer
// than one token's lifetime. Node 20's global fetch; no dependencies.
import crypto from "node:crypto";

export class TaskError extends Error {
  constructor(status, code, message) {
    super(`${status} ${code}: ${message}`);
    Object.assign(this, { status, code });
  }
}

function expiry(token) {
  try {
    return JSON.parse(Buffer.from(token.split(".")[1], "base64url").toString()).exp ?? 0;
  } catch {
    return 0;
  }
}

const ndjson = (rows) => Buffer.from(rows.map((r) => JSON.stringify(r) + "\n").join(""));
const sha256 = (buf) => crypto.createHash("sha256").update(buf).digest("hex");

export class Task {
  constructor(envelope) {
    const d = envelope.dispatcher ?? {};
    const t = envelope.task ?? {};
    this.url = (d.url ?? "").replace(/\/+$/, "");
    this._token = d.token ?? "";
    this._tokenUrl = d.token_url;
    Object.assign(this, {
      taskId: t.task_id, jobId: t.job_id, key: t.key, attempt: t.attempt,
      objectPrefix: t.object_prefix ?? "", outputs: t.outputs ?? [], reads: t.reads ?? [],
    });
    this._seq = 0;
    // As a Lambda function there is no host to ask (ADR 0026): the token
    // is refreshed here by a heartbeat of the attempt's own, every
    // `refresh_seconds`, while the invocation runs.
    if (!this._tokenUrl && d.refresh_seconds) {
      this._refresher = setInterval(async () => {
        try {
          this._token = (await this.call("/v1/task/heartbeat", {})).capability_token;
        } catch {
          this.close(); // stale or gone: the attempt is over
        }
      }, d.refresh_seconds * 1000);
      this._refresher.unref();
    }
  }

  /** Ends the invocation's token refresh. */
  close() {
    if (this._refresher) clearInterval(this._refresher);
    this._refresher = undefined;
  }

  async token(refresh = false) {
    if (this._tokenUrl && (refresh || expiry(this._token) - Date.now() / 1000 < 60)) {
      try {
        const r = await fetch(this._tokenUrl);
        if (r.ok) this._token = (await r.json()).token;
      } catch {}
    }
    return this._token;
  }

  async call(path, body) {
    for (const attempt of [1, 2]) {
      const r = await fetch(this.url + path, {
        method: "POST",
        headers: {
          authorization: `Bearer ${await this.token(attempt === 2)}`,
          "content-type": "application/json",
          // The invocation's trace context: the dispatcher's span of this
          // call joins the task's trace.
          ...(process.env.TRACEPARENT ? { traceparent: process.env.TRACEPARENT } : {}),
        },
        body: JSON.stringify(body),
      });
      const text = await r.text();
      if (r.ok) return text ? JSON.parse(text) : null;
      if (r.status === 401 && attempt === 1) continue;
      let err = {};
      try { err = JSON.parse(text).error ?? {}; } catch {}
      throw new TaskError(r.status, err.code ?? "unknown", err.message ?? text.slice(0, 500));
    }
  }

  emit(kind, payload) {
    const seq = this._seq++;
    return this.call("/v1/task/events", { events: [{ seq, kind, payload }] });
  }

  async objectUrls(keys, method = "PUT") {
    return (await this.call("/v1/task/objects", { method, keys })).urls;
  }

  async putObject(name, data) {
    const [u] = await this.objectUrls([name], "PUT");
    const r = await fetch(u.url, { method: "PUT", body: data });
    if (!r.ok) throw new TaskError(r.status, "upload_failed", await r.text());
    return u.key;
  }

  async getObject(key) {
    const [u] = await this.objectUrls([key], "GET");
    const r = await fetch(u.url);
    if (!r.ok) throw new TaskError(r.status, "download_failed", await r.text());
    return Buffer.from(await r.arrayBuffer());
  }

  async stage(dataset, rows, part = 0) {
    const body = ndjson(rows);
    const key = await this.putObject(`${dataset}/part-${part}.jsonl`, body);
    return this.call("/v1/task/dataset-stage", {
      dataset, parts: [{ key, rows: rows.length, sha256: sha256(body), bytes: body.length }],
    });
  }

  async publish(dataset, rows, batchId = crypto.randomUUID()) {
    const body = ndjson(rows);
    const key = await this.putObject(`buffers/${batchId}.jsonl`, body);
    return this.call("/v1/task/buffer-publish", {
      batch_id: batchId, dataset, object_key: key, rows: rows.length, sha256: sha256(body),
    });
  }

  query(dataset, { where, select, order_by, limit, version } = {}) {
    const body = { dataset };
    Object.entries({ where, select, order_by, limit, version })
      .filter(([, v]) => v !== undefined)
      .forEach(([k, v]) => { body[k] = v; });
    return this.call("/v1/query", body);
  }
}
