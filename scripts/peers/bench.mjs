// The peers' burn-down for scripts/bench: N no-op jobs queued first, then
// W concurrent workers in one process take them until none is left.
// graphile-worker and pg-boss, each unbatched and batched, each on a fresh
// database of the same Postgres server (dropped after). Prints one JSON
// line per run: {"system", "mode", "tasks", "seconds", "tasks_per_s"}.
//
//   node bench.mjs --url postgres://... --tasks N --workers W --batch B
import { parseArgs } from "node:util";
import pg from "pg";
import { run, makeWorkerUtils, Logger } from "graphile-worker";
import PgBoss from "pg-boss";

const { values } = parseArgs({
  options: {
    url: { type: "string" },
    tasks: { type: "string", default: "20000" },
    workers: { type: "string", default: "10" },
    batch: { type: "string", default: "50" },
  },
});
const base = new URL(values.url ?? process.env.DATABASE_URL);
const tasks = Number(values.tasks);
const workers = Number(values.workers);
const batch = Number(values.batch);

async function admin(sql) {
  const c = new pg.Client({ connectionString: base.toString() });
  await c.connect();
  try {
    await c.query(sql);
  } finally {
    await c.end();
  }
}

/** Runs `body(url)` on a database of its own, dropped after. */
async function withDatabase(body) {
  const name = `bench_peer_${process.pid}_${Date.now()}`;
  await admin(`CREATE DATABASE ${name}`);
  const url = new URL(base);
  url.pathname = `/${name}`;
  try {
    return await body(url.toString());
  } finally {
    // Let the library's pools close their connections before the drop
    // (FORCE would end them, and a pool without a listener then throws).
    for (let i = 0; i < 100; i++) {
      const c = new pg.Client({ connectionString: base.toString() });
      await c.connect();
      const { rows } = await c.query(
        "SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = $1",
        [name],
      );
      await c.end();
      if (rows[0].n === 0) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    await admin(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
  }
}

/** Polls `left()` until it answers 0; returns the seconds since `t0`. */
async function untilDone(t0, left) {
  for (;;) {
    if ((await left()) === 0) return (performance.now() - t0) / 1000;
    await new Promise((r) => setTimeout(r, 10));
  }
}

async function count(url, sql) {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    return Number((await c.query(sql)).rows[0].n);
  } finally {
    await c.end();
  }
}

async function graphile(batched) {
  return withDatabase(async (url) => {
    const utils = await makeWorkerUtils({ connectionString: url });
    await utils.migrate();
    for (let i = 0; i < tasks; i += 1000) {
      const n = Math.min(1000, tasks - i);
      await utils.addJobs(
        Array.from({ length: n }, () => ({ identifier: "noop", payload: {} })),
      );
    }
    await utils.release();
    const probe = new pg.Pool({ connectionString: url, max: 1 });
    let handled = 0;
    const t0 = performance.now();
    const runner = await run({
      connectionString: url,
      concurrency: workers,
      noHandleSignals: true,
      pollInterval: 1000,
      logger: quietLogger(),
      taskList: { noop: async () => { handled++; } },
      preset: batched
        ? { worker: { localQueue: { size: batch }, completeJobBatchDelay: 0, failJobBatchDelay: 0 } }
        : {},
    });
    const seconds = await untilDone(t0, async () =>
      Number((await probe.query("SELECT count(*) AS n FROM graphile_worker.jobs")).rows[0].n),
    );
    await runner.stop();
    await probe.end();
    if (handled < tasks) throw new Error(`graphile-worker handled ${handled} of ${tasks}`);
    return seconds;
  });
}

async function pgBoss(batched) {
  return withDatabase(async (url) => {
    const boss = new PgBoss({ connectionString: url, schedule: false, supervise: false, max: workers + 2 });
    boss.on("error", (e) => console.error("pg-boss:", e.message));
    await boss.start();
    await boss.createQueue("noop");
    for (let i = 0; i < tasks; i += 1000) {
      const n = Math.min(1000, tasks - i);
      await boss.insert(Array.from({ length: n }, () => ({ name: "noop", data: {} })));
    }
    const probe = new pg.Pool({ connectionString: url, max: 1 });
    let handled = 0;
    const t0 = performance.now();
    // W loops of fetch, then complete: `work()` would wait its polling
    // interval (at least 0.5 s) after every fetch, so it measures the
    // interval, not the queue.
    const size = batched ? batch : 1;
    const loops = Array.from({ length: workers }, async () => {
      for (;;) {
        const jobs = await boss.fetch("noop", { batchSize: size });
        if (!jobs || jobs.length === 0) return;
        handled += jobs.length;
        await boss.complete("noop", jobs.map((j) => j.id));
      }
    });
    const seconds = await untilDone(t0, async () =>
      Number((await probe.query(
        "SELECT count(*) AS n FROM pgboss.job WHERE name = 'noop' AND state <> 'completed'",
      )).rows[0].n),
    );
    await Promise.all(loops);
    await boss.stop({ graceful: false, wait: true, close: true });
    await probe.end();
    if (handled < tasks) throw new Error(`pg-boss handled ${handled} of ${tasks}`);
    return seconds;
  });
}

/** Errors only: the runs would otherwise log every job. */
function quietLogger() {
  return new Logger(() => (level, message) => {
    if (level === "error") console.error(message);
  });
}

const runs = [
  ["graphile-worker", "unbatched", () => graphile(false)],
  ["graphile-worker", `batched (localQueue ${batch}, completeJobBatchDelay 0)`, () => graphile(true)],
  ["pg-boss", "single (fetch 1, complete 1)", () => pgBoss(false)],
  ["pg-boss", `batched (fetch ${batch}, complete ${batch})`, () => pgBoss(true)],
];
for (const [system, mode, f] of runs) {
  const seconds = await f();
  console.log(JSON.stringify({ system, mode, tasks, seconds, tasks_per_s: tasks / seconds }));
}
