"""The Python runner: a Lambda custom-runtime loop on the standard library.

Runs under the worker wrapper's local Runtime API and, unchanged, as a
Lambda function's bootstrap. Loads `_HANDLER` (`module.function`) from
`LAMBDA_TASK_ROOT` once, then serves invocations one at a time:
`handler(inputs, context)`, where `context.task` is a client of the task
API (`dispatcher_task.Task`) holding the invocation's capability token.
See ADR 0013 for why this is not `awslambdaric`.
"""

import http.client
import importlib
import json
import os
import sys
import time
import traceback

API = os.environ["AWS_LAMBDA_RUNTIME_API"]
PREFIX = "/2018-06-01"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dispatcher_task  # noqa: E402  (beside this file)

_conn = None


def call(method, path, body=None, headers=None):
    """One call of the Runtime API on a kept-alive connection (the `next`
    long poll has no client timeout)."""
    global _conn
    for attempt in (1, 2):
        if _conn is None:
            _conn = http.client.HTTPConnection(API, timeout=None)
        try:
            _conn.request(method, PREFIX + path, body=body, headers=headers or {})
            resp = _conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        except (http.client.HTTPException, OSError):
            _conn = None
            if attempt == 2:
                raise


def error_body(exc, error_type=None):
    return json.dumps({
        "errorMessage": str(exc),
        "errorType": error_type or type(exc).__name__,
        "stackTrace": traceback.format_exception(type(exc), exc, exc.__traceback__),
    }).encode()


def init_failed(exc, error_type):
    body = error_body(exc, error_type)
    call("POST", "/runtime/init/error", body,
         {"Lambda-Runtime-Function-Error-Type": error_type, "Content-Type": "application/json"})
    sys.stderr.write(f"{error_type}: {exc}\n")
    sys.exit(1)


def load_handler():
    spec = os.environ.get("_HANDLER", "")
    module_name, _, function_name = spec.rpartition(".")
    if not module_name:
        init_failed(ValueError(f"bad handler {spec!r}: expected MODULE.FUNCTION"),
                    "Runtime.MalformedHandlerName")
    sys.path.insert(0, os.environ.get("LAMBDA_TASK_ROOT", "."))
    try:
        module = importlib.import_module(module_name.replace("/", "."))
    except SyntaxError as exc:
        init_failed(exc, "Runtime.UserCodeSyntaxError")
    except ImportError as exc:
        init_failed(exc, "Runtime.ImportModuleError")
    except Exception as exc:  # the module raised while loading
        init_failed(exc, "Runtime.InitError")
    handler = getattr(module, function_name, None)
    if not callable(handler):
        init_failed(AttributeError(f"{module_name} has no function {function_name!r}"),
                    "Runtime.HandlerNotFound")
    return handler


class Context:
    def __init__(self, headers, envelope):
        self.aws_request_id = headers.get("Lambda-Runtime-Aws-Request-Id") or \
            headers.get("lambda-runtime-aws-request-id")
        deadline = headers.get("Lambda-Runtime-Deadline-Ms") or headers.get("lambda-runtime-deadline-ms")
        self.deadline_ms = int(deadline or 0)
        self.invoked_function_arn = headers.get("Lambda-Runtime-Invoked-Function-Arn") or \
            headers.get("lambda-runtime-invoked-function-arn")
        self.function_name = os.environ.get("AWS_LAMBDA_FUNCTION_NAME")
        self.function_version = os.environ.get("AWS_LAMBDA_FUNCTION_VERSION")
        self.memory_limit_in_mb = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE")
        self.task = dispatcher_task.Task(envelope, self.aws_request_id)

    def get_remaining_time_in_millis(self):
        return max(0, self.deadline_ms - int(time.time() * 1000))


def main():
    handler = load_handler()
    while True:
        status, headers, body = call("GET", "/runtime/invocation/next")
        if status != 200:
            sys.stderr.write(f"next answered {status}: {body[:200]!r}\n")
            sys.exit(1)
        headers = {k.title(): v for k, v in headers.items()}
        request_id = headers["Lambda-Runtime-Aws-Request-Id"]
        # The invocation's trace context, for the handler's own tracing
        # (W3C, and X-Ray's form as AWS's runtime clients set it).
        for name, var in (("Traceparent", "TRACEPARENT"), ("Lambda-Runtime-Trace-Id", "_X_AMZN_TRACE_ID")):
            if headers.get(name):
                os.environ[var] = headers[name]
            else:
                os.environ.pop(var, None)
        context = None
        try:
            envelope = json.loads(body)
            context = Context(headers, envelope)
            result = handler(envelope.get("inputs", {}), context)
            out = json.dumps(result).encode()
        except Exception as exc:  # the handler failed: report it, stay warm
            if context is not None:
                context.task.close()
            call("POST", f"/runtime/invocation/{request_id}/error", error_body(exc),
                 {"Lambda-Runtime-Function-Error-Type": "Unhandled",
                  "Content-Type": "application/json"})
            continue
        context.task.close()
        status, _, answer = call("POST", f"/runtime/invocation/{request_id}/response", out,
                                 {"Content-Type": "application/json"})
        if status >= 400:
            # 413 and friends: the invocation failed on the host; stay up.
            sys.stderr.write(f"response refused ({status}): {answer[:200]!r}\n")


if __name__ == "__main__":
    main()
