"""A loop with state, run as a process by tests/integration/test_state_changelog.py.

Counts records per key in the partition's state and writes the new count into each output
(``key=count``), so the committed outputs say what the state must be: for every key the
counts 1, 2, 3... with no gap and no repeat, however often the process is killed or its
partitions move. Exits 0 after SIGTERM. Usage:
python -m tests.support.state_loop BOOTSTRAP IN OUT GROUP STATE_DIR INSTANCE GUARANTEE
"""

from __future__ import annotations

import sys
from pathlib import Path

from confluent_kafka import Message

from libs.kafka import Emitter, Guarantee, KafkaSettings, LoopConfig, ProcessingLoop
from libs.runtime import configure_logging, install_stop_handlers
from libs.state.stores import StateStores


def handle(topic_out: str) -> object:
    def counting(msg: Message, out: Emitter) -> None:
        key = msg.key() or b""
        count = int(out.state.get(b"count/" + key) or b"0") + 1
        out.state.put(b"count/" + key, str(count).encode())
        out.produce(topic_out, key, key + b"=" + str(count).encode())

    return counting


def main(argv: list[str]) -> int:
    bootstrap, topic_in, topic_out, group, state_dir, instance, guarantee = argv
    configure_logging("INFO")
    stop = install_stop_handlers()
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    # static membership: a restart after kill -9 takes its partitions back at once instead of
    # waiting out the dead member's session (the restore consumers must not inherit the id)
    consumer_config = kafka.consumer_config(group, **{"group.instance.id": f"{group}-{instance}"})
    stores = StateStores("counts", Path(state_dir), group, consumer_config)
    loop = ProcessingLoop(
        LoopConfig(name="counts", topics=[topic_in], guarantee=Guarantee(guarantee)),
        consumer_config,
        kafka.producer_config(transactional_id=f"{group}-{instance}"),
        handle(topic_out),  # type: ignore[arg-type]
        service="counts",
        stop=stop,
        state=stores,
    )
    stats = loop.run()
    print(
        f"STATS consumed={stats.consumed} restored={stores.restored_records}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
