"""A minimal service built on ProcessingLoop, run as a process by the loop tests.

Decodes ``ConnectorStatusChanged`` from the input topic and re-encodes it to the output topic;
anything undecodable is dead-lettered by the loop. Exits 0 after SIGTERM with offsets
committed. Usage: python -m tests.support.echo_loop BOOTSTRAP REGISTRY IN OUT GROUP GUARANTEE
"""

from __future__ import annotations

import sys

from confluent_kafka import Message

from libs.kafka import Emitter, Guarantee, KafkaSettings, LoopConfig, ProcessingLoop
from libs.runtime import configure_logging, install_stop_handlers
from libs.serde import (
    AvroDeserializer,
    AvroSerializer,
    ConfluentSchemaRegistry,
    ConnectorStatusChanged,
)


def main(argv: list[str]) -> int:
    bootstrap, registry_url, topic_in, topic_out, group, guarantee = argv
    configure_logging("INFO")
    stop = install_stop_handlers()
    registry = ConfluentSchemaRegistry(registry_url)
    decode = AvroDeserializer(registry, ConnectorStatusChanged)
    encode = AvroSerializer(registry, ConnectorStatusChanged)

    def handle(msg: Message, out: Emitter) -> None:
        event = decode(
            msg.value(),
            topic=str(msg.topic()),
            partition=int(msg.partition() or 0),
            offset=int(msg.offset() or 0),
        )
        out.produce(topic_out, msg.key(), encode(topic_out, event))

    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    loop = ProcessingLoop(
        LoopConfig(name="echo", topics=[topic_in], guarantee=Guarantee(guarantee)),
        kafka.consumer_config(group),
        kafka.producer_config(transactional_id=f"{group}-tx"),
        handle,
        service="echo",
        stop=stop,
    )
    stats = loop.run()
    print(f"STATS consumed={stats.consumed} dead_lettered={stats.dead_lettered}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
