"""Extract (Python): makes sensor readings and stages them as a new
version of the dataset `readings`, committed when this task succeeds."""
import random


def handler(inputs, context):
    task = context.task
    sensors = int(inputs.get("sensors", 5))
    per_sensor = int(inputs.get("readings_per_sensor", 20))
    rnd = random.Random(inputs.get("seed", 7))
    rows = [
        {"sensor": f"s{i}", "seq": j, "value": round(rnd.uniform(10.0, 30.0), 3)}
        for i in range(sensors)
        for j in range(per_sensor)
    ]
    task.stage("readings", rows)
    task.emit("log", {"msg": f"extracted {len(rows)} readings of {sensors} sensors"})
    return {"readings": len(rows), "sensors": sensors}
