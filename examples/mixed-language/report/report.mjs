// Report (Node): reads the per-sensor statistics through the query
// service and answers a summary, hottest sensor first.
export const handler = async (inputs, context) => {
  const task = context.task;
  const answer = await task.query("sensor_stats", {
    order_by: [{ column: "mean", desc: true }],
    limit: inputs.top ?? 10,
  });
  const rows = answer.rows.map((r) => Object.fromEntries(answer.columns.map((c, i) => [c, r[i]])));
  const lines = rows.map(
    (r) => `${r.sensor}: ${r.readings} readings, mean ${r.mean.toFixed(2)} (min ${r.min}, max ${r.max})`,
  );
  await task.emit("log", { msg: `report of ${rows.length} sensors from version ${answer.version}` });
  return { version: answer.version, hottest: rows[0]?.sensor ?? null, lines };
};
