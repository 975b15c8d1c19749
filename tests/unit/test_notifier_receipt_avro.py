"""The notifier's receipts (one per message) are written by ``libs.serde``'s direct writer for
flat records, not fastavro's, and give fastavro's bytes: the receipts topic's readers (other
replicas' tables, ``python -m services.notifier receipt``, the registry's schema) see no
difference."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta, timezone

import fastavro
import pytest

from libs.serde import AvroSerializer, SlackDeliveryReceipt
from libs.serde.avro import SCHEMA_DIR
from libs.serde.registry import InMemorySchemaRegistry

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)

RECEIPTS = [
    SlackDeliveryReceipt("m-1", "C123", "DELIVERED", 1, T0, "1700000000.000100"),
    SlackDeliveryReceipt("m-2", "U123", "FAILED", 3, T0, None, "channel_not_found"),
    SlackDeliveryReceipt("m-3", "C1", "DRY_RUN", 0, T0),
    # attempts at the int's bounds and at varint boundaries
    *(
        SlackDeliveryReceipt("m-4", "C1", "DELIVERED", n, T0, "1.2")
        for n in (63, 64, -64, -65, 8191, 8192, 2**31 - 1, -(2**31))
    ),
    # times: before the epoch, sub-millisecond (truncated), another zone, far out
    *(
        SlackDeliveryReceipt("m-5", "C1", "DELIVERED", 1, stamp, "1.2")
        for stamp in (
            datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
            datetime(2026, 6, 1, 12, 0, 0, 999, tzinfo=timezone(timedelta(hours=-9))),
            datetime(2262, 1, 1, 0, 0, 0, 1500, tzinfo=UTC),
        )
    ),
    # strings: empty, multi-byte, lengths at the one- and two-byte length boundaries
    SlackDeliveryReceipt("", "", "", 1, T0, "", ""),
    SlackDeliveryReceipt("é" * 32, "日本🚀", "FAILED", 2, T0, None, "x" * 63),
    SlackDeliveryReceipt("m-6", "C1", "FAILED", 2, T0, "y" * 64, "z" * 8191),
    SlackDeliveryReceipt("m-7", "C1", "FAILED", 2, T0, None, "q" * 8192 + "\u00e9"),
]


def _fastavro(receipt: SlackDeliveryReceipt) -> bytes:
    schema = fastavro.parse_schema(json.loads((SCHEMA_DIR / receipt.SCHEMA).read_text()))
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, receipt.to_avro())
    return buf.getvalue()


@pytest.mark.parametrize("receipt", RECEIPTS, ids=range(len(RECEIPTS)))
def test_a_receipt_is_written_directly_with_fastavros_bytes(
    receipt: SlackDeliveryReceipt, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = _fastavro(receipt)
    encode = AvroSerializer(InMemorySchemaRegistry(), SlackDeliveryReceipt)

    def not_fastavro(*args: object, **kwargs: object) -> None:
        raise AssertionError("a receipt went through fastavro's writer")

    monkeypatch.setattr(fastavro, "schemaless_writer", not_fastavro)
    framed = encode("slack-message-receipts", receipt)
    assert framed[:1] == b"\x00" and framed[5:] == expected
