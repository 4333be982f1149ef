"""Alert evaluation (Python): reads the per-sensor statistics through the
query service and publishes one alert event per sensor whose maximum
passed the threshold to the stream `alert_events`, as one buffer batch.
The dispatcher's router then sends matching events to the org's webhook
destinations (ADR 0014)."""
from datetime import datetime, timezone


def handler(inputs, context):
    task = context.task
    threshold = float(inputs.get("threshold", 29.0))
    answer = task.query(
        "sensor_stats",
        where={"max": {"gte": threshold}},
        select=["sensor", "max"],
        order_by=[{"column": "max", "desc": True}],
    )
    now = datetime.now(timezone.utc).isoformat()
    alerts = [
        {"ts": now, "rule": "max_above", "sensor": sensor, "value": value,
         "severity": "critical" if value >= threshold + 0.5 else "warning"}
        for sensor, value in answer["rows"]
    ]
    if alerts:
        task.publish("alert_events", alerts)
    return {"alerts": len(alerts), "threshold": threshold}
