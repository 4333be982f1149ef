// The Node runner: a Lambda custom-runtime loop on Node's standard library
// (aws-lambda-ric needs Node 22 or a native build; see ADR 0013).
//
// Runs under the worker wrapper's local Runtime API and, unchanged, as a
// Lambda function's bootstrap. Loads `_HANDLER` (`file.export`, the file
// `.mjs`, `.js` or `.cjs` under LAMBDA_TASK_ROOT) once, then serves
// invocations one at a time: `await handler(inputs, context)`, where
// `context.task` is a client of the task API holding the invocation's
// capability token.
import http from "node:http";
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";
import { Task } from "./dispatcher-task.mjs";

const [host, port] = process.env.AWS_LAMBDA_RUNTIME_API.split(":");
const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
const PREFIX = "/2018-06-01";

function call(method, p, body, headers = {}) {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host, port, method, path: PREFIX + p, agent, headers },
      (res) => {
        const chunks = [];
        res.on("data", (c) => chunks.push(c));
        res.on("end", () =>
          resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }),
        );
      },
    );
    req.on("error", reject);
    if (body !== undefined) req.write(body);
    req.end();
  });
}

function errorBody(err, type) {
  const e = err instanceof Error ? err : new Error(String(err));
  return JSON.stringify({
    errorType: type ?? e.name ?? "Error",
    errorMessage: e.message,
    trace: String(e.stack ?? "").split("\n"),
  });
}

async function initFailed(err, type) {
  await call("POST", "/runtime/init/error", errorBody(err, type), {
    "Lambda-Runtime-Function-Error-Type": type,
    "Content-Type": "application/json",
  });
  process.stderr.write(`${type}: ${err?.message ?? err}\n`);
  process.exit(1);
}

async function loadHandler() {
  const spec = process.env._HANDLER ?? "";
  const dot = spec.lastIndexOf(".");
  if (dot <= 0) {
    return initFailed(new Error(`bad handler ${JSON.stringify(spec)}: expected FILE.EXPORT`),
      "Runtime.MalformedHandlerName");
  }
  const root = process.env.LAMBDA_TASK_ROOT ?? ".";
  const base = spec.slice(0, dot);
  const name = spec.slice(dot + 1);
  const file = [".mjs", ".js", ".cjs"].map((ext) => path.join(root, base + ext)).find((f) => fs.existsSync(f));
  if (!file) {
    return initFailed(new Error(`no ${base}.mjs, .js or .cjs in the bundle`), "Runtime.ImportModuleError");
  }
  let mod;
  try {
    mod = await import(pathToFileURL(file).href);
  } catch (err) {
    return initFailed(err, err instanceof SyntaxError ? "Runtime.UserCodeSyntaxError" : "Runtime.ImportModuleError");
  }
  const handler = mod[name] ?? mod.default?.[name];
  if (typeof handler !== "function") {
    return initFailed(new Error(`${base} exports no function ${name}`), "Runtime.HandlerNotFound");
  }
  return handler;
}

let inFlight = null;

// An exception outside the handler's promise: report it, then exit (as
// Lambda's Node runtime does); the wrapper starts a fresh runner.
process.on("uncaughtException", async (err) => {
  if (inFlight) {
    try {
      await call("POST", `/runtime/invocation/${inFlight}/error`, errorBody(err, "Runtime.UncaughtException"), {
        "Lambda-Runtime-Function-Error-Type": "Runtime.UncaughtException",
        "Content-Type": "application/json",
      });
    } catch {}
  }
  process.stderr.write(`uncaught: ${err?.stack ?? err}\n`);
  process.exit(129);
});

const handler = await loadHandler();
for (;;) {
  const next = await call("GET", "/runtime/invocation/next");
  if (next.status !== 200) {
    process.stderr.write(`next answered ${next.status}: ${next.body.toString().slice(0, 200)}\n`);
    process.exit(1);
  }
  const id = next.headers["lambda-runtime-aws-request-id"];
  const deadline = Number(next.headers["lambda-runtime-deadline-ms"] ?? 0);
  // The invocation's trace context, for the handler's own tracing (W3C,
  // and X-Ray's form as AWS's runtime clients set it).
  for (const [name, variable] of [["traceparent", "TRACEPARENT"], ["lambda-runtime-trace-id", "_X_AMZN_TRACE_ID"]]) {
    if (next.headers[name]) process.env[variable] = next.headers[name];
    else delete process.env[variable];
  }
  inFlight = id;
  let out;
  let task;
  try {
    const envelope = JSON.parse(next.body.toString("utf8"));
    const context = {
      awsRequestId: id,
      invokedFunctionArn: next.headers["lambda-runtime-invoked-function-arn"],
      functionName: process.env.AWS_LAMBDA_FUNCTION_NAME,
      memoryLimitInMB: process.env.AWS_LAMBDA_FUNCTION_MEMORY_SIZE,
      deadlineMs: deadline,
      getRemainingTimeInMillis: () => Math.max(0, deadline - Date.now()),
      task: (task = new Task(envelope)),
    };
    const result = await handler(envelope.inputs ?? {}, context);
    out = JSON.stringify(result === undefined ? null : result);
  } catch (err) {
    task?.close();
    await call("POST", `/runtime/invocation/${id}/error`, errorBody(err), {
      "Lambda-Runtime-Function-Error-Type": "Unhandled",
      "Content-Type": "application/json",
    });
    inFlight = null;
    continue;
  }
  task.close();
  const answer = await call("POST", `/runtime/invocation/${id}/response`, out, {
    "Content-Type": "application/json",
  });
  if (answer.status >= 400) {
    process.stderr.write(`response refused (${answer.status}): ${answer.body.toString().slice(0, 200)}\n`);
  }
  inFlight = null;
}
