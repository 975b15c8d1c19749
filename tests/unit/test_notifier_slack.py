"""The notifier's Slack port: one contract suite for slack-sdk over the fake Slack and the twin."""

from __future__ import annotations

import gc
import logging
import os
import resource
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

import pytest
from slack_sdk.errors import SlackApiError

from services.notifier.core import (
    HISTORY_WINDOW_EXCEEDED,
    Found,
    NotFound,
    Posted,
    PostRequest,
    RateLimited,
    Rejected,
    Rendered,
    Unavailable,
    Updated,
    UpdateRequest,
)
from services.notifier.keepalive import KeepAliveWebClient
from services.notifier.slack import (
    STORE_LATE,
    STORE_THEN_TIMEOUT,
    DryRunNotifier,
    FakeNotifier,
    Notifier,
    SlackWebNotifier,
)
from tests.support.fake_slack import FakeSlack
from tests.support.kafka import wait_until

TOKEN = "xoxb-test"
LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)


def request(message_id: str, channel: str = "C1") -> PostRequest:
    return PostRequest(
        channel=channel,
        text=f"alert {message_id}",
        blocks=[{"type": "section", "text": {"type": "mrkdwn", "text": f"*{message_id}*"}}],
        metadata={
            "event_type": "field_alert",
            "event_payload": {"message_id": message_id, "pipeline": "p1"},
        },
    )


class Script(Protocol):
    def rate_limit(self, channel: str, seconds: int) -> None: ...
    def slack_error(self, channel: str, code: str) -> None: ...
    def server_error(self, channel: str, status: int) -> None: ...
    def store_then_timeout(self, channel: str) -> None: ...
    def history_unavailable(self, channel: str) -> None: ...
    def update_rate_limit(self, channel: str, seconds: int) -> None: ...
    def update_error(self, channel: str, code: str) -> None: ...
    def update_server_error(self, channel: str, status: int) -> None: ...
    def update_store_then_timeout(self, channel: str) -> None: ...


@dataclass
class Subject:
    notifier: Notifier
    script: Script


class WebScript:
    def __init__(self, fake: FakeSlack) -> None:
        self.fake = fake

    def rate_limit(self, channel: str, seconds: int) -> None:
        self.fake.rate_limit(channel, retry_after_s=seconds)

    def slack_error(self, channel: str, code: str) -> None:
        self.fake.slack_error(channel, code)

    def server_error(self, channel: str, status: int) -> None:
        self.fake.server_error(channel, status=status)

    def store_then_timeout(self, channel: str) -> None:
        self.fake.slow(channel, delay_s=5, then_store=True)

    def history_unavailable(self, channel: str) -> None:
        self.fake.server_error(channel, status=503, method="conversations.history")

    def update_rate_limit(self, channel: str, seconds: int) -> None:
        self.fake.rate_limit(channel, retry_after_s=seconds, method="chat.update")

    def update_error(self, channel: str, code: str) -> None:
        self.fake.slack_error(channel, code, method="chat.update")

    def update_server_error(self, channel: str, status: int) -> None:
        self.fake.server_error(channel, status=status, method="chat.update")

    def update_store_then_timeout(self, channel: str) -> None:
        self.fake.slow(channel, delay_s=5, then_store=True, method="chat.update")


class TwinScript:
    def __init__(self, twin: FakeNotifier) -> None:
        self.twin = twin

    def rate_limit(self, channel: str, seconds: int) -> None:
        self.twin.script(channel, RateLimited(seconds))

    def slack_error(self, channel: str, code: str) -> None:
        self.twin.script(channel, Rejected(code))

    def server_error(self, channel: str, status: int) -> None:
        self.twin.script(channel, Unavailable(f"http {status}: internal_error", in_doubt=True))

    def store_then_timeout(self, channel: str) -> None:
        self.twin.script(channel, STORE_THEN_TIMEOUT)

    def history_unavailable(self, channel: str) -> None:
        self.twin.script(channel, Unavailable("http 503", in_doubt=True), method="history")

    def update_rate_limit(self, channel: str, seconds: int) -> None:
        self.twin.script(channel, RateLimited(seconds), method="update")

    def update_error(self, channel: str, code: str) -> None:
        self.twin.script(channel, Rejected(code), method="update")

    def update_server_error(self, channel: str, status: int) -> None:
        outcome = Unavailable(f"http {status}: internal_error", in_doubt=True)
        self.twin.script(channel, outcome, method="update")

    def update_store_then_timeout(self, channel: str) -> None:
        self.twin.script(channel, STORE_THEN_TIMEOUT, method="update")


@pytest.fixture
def fake() -> Iterator[FakeSlack]:
    with FakeSlack(token=TOKEN) as server:
        yield server


@pytest.fixture(params=["slack_sdk", "slack_sdk_per_call", "twin"])
def subject(request: pytest.FixtureRequest, fake: FakeSlack) -> Subject:
    """The twin, and slack-sdk over a kept-alive connection (the default) and per call."""
    if request.param == "twin":
        twin = FakeNotifier()
        return Subject(twin, TwinScript(twin))
    keep_alive_s = 0.0 if request.param == "slack_sdk_per_call" else 30.0
    web = SlackWebNotifier(
        TOKEN, base_url=fake.base_url, timeout_s=1, history_limit=50, keep_alive_s=keep_alive_s
    )
    return Subject(web, WebScript(fake))


# -- the contract ------------------------------------------------------------------------------


def test_post_then_find_by_metadata(subject: Subject) -> None:
    n = subject.notifier
    posted = n.post(request("m1"))
    assert isinstance(posted, Posted)
    assert posted.channel == "C1"
    n.post(request("m2"))
    assert n.find_post("C1", "m1", LONG_AGO) == Found(posted.ts)
    assert n.find_post("C1", "m3", LONG_AGO) == NotFound()
    assert n.find_post("C2", "m1", LONG_AGO) == NotFound()
    later = datetime.fromtimestamp(float(posted.ts), UTC) + timedelta(seconds=60)
    assert n.find_post("C1", "m1", later) == NotFound()


def test_history_window_is_bounded_above_inclusively(subject: Subject) -> None:
    n = subject.notifier
    posted = n.post(request("m1"))
    assert isinstance(posted, Posted)
    at = datetime.fromtimestamp(float(posted.ts), UTC)
    before = at - timedelta(seconds=1)
    assert n.find_post("C1", "m1", LONG_AGO, at) == Found(posted.ts)  # latest is inclusive
    assert n.find_post("C1", "m1", at, at) == Found(posted.ts)  # and so is oldest
    assert n.find_post("C1", "m1", LONG_AGO, before) == NotFound()


def test_rate_limit(subject: Subject) -> None:
    subject.script.rate_limit("C1", 7)
    assert subject.notifier.post(request("m1")) == RateLimited(7)
    assert isinstance(subject.notifier.post(request("m1")), Posted)


@pytest.mark.parametrize(
    "code",
    ["channel_not_found", "invalid_blocks", "not_in_channel", "invalid_auth", "msg_too_long"],
)
def test_slack_errors(subject: Subject, code: str) -> None:
    subject.script.slack_error("C1", code)
    assert subject.notifier.post(request("m1")) == Rejected(code)
    assert subject.notifier.find_post("C1", "m1", LONG_AGO) == NotFound()


@pytest.mark.parametrize("status", [500, 503])
def test_server_error_is_in_doubt(subject: Subject, status: int) -> None:
    subject.script.server_error("C1", status)
    outcome = subject.notifier.post(request("m1"))
    assert isinstance(outcome, Unavailable)
    assert outcome.in_doubt is True
    assert str(status) in outcome.error


def test_timeout_after_the_post_is_in_doubt_and_found(subject: Subject) -> None:
    subject.script.store_then_timeout("C1")
    outcome = subject.notifier.post(request("m1"))
    assert isinstance(outcome, Unavailable) and outcome.in_doubt is True
    assert isinstance(subject.notifier.find_post("C1", "m1", LONG_AGO), Found)


def test_history_unavailable(subject: Subject) -> None:
    subject.script.history_unavailable("C1")
    outcome = subject.notifier.find_post("C1", "m1", LONG_AGO)
    assert isinstance(outcome, Unavailable)


# -- updates -----------------------------------------------------------------------------------


def update_request(message_id: str, ts: str, n: int = 1, channel: str = "C1") -> UpdateRequest:
    return UpdateRequest(
        channel=channel,
        ts=ts,
        text=f"alert {message_id}, update {n}",
        blocks=[],
        metadata={
            "event_type": "field_alert",
            "event_payload": {"message_id": f"{message_id}-u{n}", "update_of": message_id},
        },
        update_of=message_id,
    )


def posted(subject: Subject, message_id: str = "m1") -> str:
    outcome = subject.notifier.post(request(message_id))
    assert isinstance(outcome, Posted)
    return outcome.ts


def test_update_then_check_by_metadata(subject: Subject) -> None:
    n = subject.notifier
    ts, other = posted(subject, "m1"), posted(subject, "m2")
    assert n.find_update("C1", ts, "m1-u1") == NotFound()
    assert n.update(update_request("m1", ts)) == Updated(ts, "C1")
    assert n.find_update("C1", ts, "m1-u1") == Found(ts)
    assert n.find_update("C1", ts, "m1-u2") == NotFound()  # a later update, not applied yet
    assert n.find_update("C1", other, "m1-u1") == NotFound()
    assert n.update(update_request("m1", ts, 2)) == Updated(ts, "C1")
    assert n.find_update("C1", ts, "m1-u2") == Found(ts)
    # the post is still found by its own id, through the update's update_of
    assert n.find_post("C1", "m1", LONG_AGO) == Found(ts)


def test_update_of_a_message_that_is_not_there(subject: Subject) -> None:
    posted(subject)
    assert subject.notifier.update(update_request("m1", "1.000001")) == Rejected(
        "message_not_found"
    )


def test_update_failures(subject: Subject) -> None:
    ts = posted(subject)
    subject.script.update_rate_limit("C1", 4)
    subject.script.update_error("C1", "cant_update_message")
    subject.script.update_server_error("C1", 502)
    n = subject.notifier
    assert n.update(update_request("m1", ts)) == RateLimited(4)
    assert n.update(update_request("m1", ts)) == Rejected("cant_update_message")
    outcome = n.update(update_request("m1", ts))
    assert isinstance(outcome, Unavailable) and outcome.in_doubt is True
    assert n.find_update("C1", ts, "m1-u1") == NotFound()


def test_timeout_after_the_update_is_in_doubt_and_found_applied(subject: Subject) -> None:
    ts = posted(subject)
    subject.script.update_store_then_timeout("C1")
    outcome = subject.notifier.update(update_request("m1", ts))
    assert isinstance(outcome, Unavailable) and outcome.in_doubt is True
    assert subject.notifier.find_update("C1", ts, "m1-u1") == Found(ts)


def test_update_replaces_text_blocks_and_metadata(fake: FakeSlack) -> None:
    web = SlackWebNotifier(TOKEN, base_url=fake.base_url)
    first = web.post(request("m1"))
    assert isinstance(first, Posted)
    assert web.update(update_request("m1", first.ts)) == Updated(first.ts, "C1")
    [stored] = fake.posts()
    # blocks=[] clears the original's blocks (left out, Slack would keep them)
    assert (stored.text, stored.blocks) == ("alert m1, update 1", None)
    assert stored.metadata == update_request("m1", first.ts).metadata
    assert stored.posted_message_id == "m1"
    assert fake.update_counts() == {"m1-u1": 1}


def test_dry_run_update_logs_what_it_would_update(caplog: pytest.LogCaptureFixture) -> None:
    dry = DryRunNotifier()
    with caplog.at_level(logging.INFO, logger="services.notifier.slack"):
        assert dry.update(update_request("m1", "1.000100")) == Rendered()
    [record] = caplog.records
    assert record.getMessage().startswith("dry-run, would update m1 at 1.000100:\nto C1")
    assert dry.find_update("C1", "1.000100", "m1-u1") == NotFound()


# -- slack-sdk specifics -----------------------------------------------------------------------


@pytest.mark.parametrize("keep_alive_s", [30.0, 0.0])
def test_connection_refused_is_not_in_doubt(keep_alive_s: float) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    web = SlackWebNotifier(
        TOKEN, base_url=f"http://127.0.0.1:{port}/api/", timeout_s=1, keep_alive_s=keep_alive_s
    )
    outcome = web.post(request("m1"))
    assert isinstance(outcome, Unavailable)
    assert outcome.in_doubt is False
    assert isinstance(web.check_auth(), Unavailable)


def test_slack_sdk_does_not_retry_by_itself(fake: FakeSlack) -> None:
    web = SlackWebNotifier(TOKEN, base_url=fake.base_url, timeout_s=1)
    fake.rate_limit("C1", retry_after_s=0)
    assert web.post(request("m1")) == RateLimited(0)
    fake.server_error("C1", status=500)
    assert isinstance(web.post(request("m1")), Unavailable)
    assert len(fake.calls("chat.postMessage")) == 2
    assert fake.posts() == []


def test_post_carries_blocks_text_and_metadata(fake: FakeSlack) -> None:
    web = SlackWebNotifier(TOKEN, base_url=fake.base_url)
    web.post(request("m1", channel="U777"))
    [stored] = fake.posts()
    assert stored.channel == "U777"
    assert stored.text == "alert m1"
    assert stored.blocks == request("m1").blocks
    assert stored.metadata == {
        "event_type": "field_alert",
        "event_payload": {"message_id": "m1", "pipeline": "p1"},
    }


def test_user_id_history_falls_back_when_the_dm_cannot_be_opened(fake: FakeSlack) -> None:
    web = SlackWebNotifier(TOKEN, base_url=fake.base_url)
    posted = web.post(request("m1", channel="U777"))
    assert isinstance(posted, Posted)
    fresh = SlackWebNotifier(TOKEN, base_url=fake.base_url)  # knows no DM channel yet
    assert fresh.find_post("U777", "m1", LONG_AGO) == Found(posted.ts)
    # the fake has no conversations.open: it answered unknown_method and the user id was used
    assert [c.method for c in fake.calls()][-2:] == ["conversations.open", "conversations.history"]


def test_history_pages_and_its_limit(fake: FakeSlack) -> None:
    web = SlackWebNotifier(TOKEN, base_url=fake.base_url, history_limit=2, history_max_pages=3)
    first = web.post(request("m0"))
    for i in range(1, 5):
        web.post(request(f"m{i}"))
    assert isinstance(first, Posted)
    assert web.find_post("C1", "m0", LONG_AGO) == Found(first.ts)
    short = SlackWebNotifier(TOKEN, base_url=fake.base_url, history_limit=2, history_max_pages=2)
    assert short.find_post("C1", "m0", LONG_AGO) == Rejected(HISTORY_WINDOW_EXCEEDED)
    assert short.find_post("C1", "m9", LONG_AGO) == Rejected(HISTORY_WINDOW_EXCEEDED)
    assert web.find_post("C1", "m9", LONG_AGO) == NotFound()


def test_a_busy_channel_is_read_from_the_windows_end_not_from_now(fake: FakeSlack) -> None:
    """Issue 11: read newest first from now, the messages posted to the channel after the
    in-doubt post filled the page budget before the post was reached ("window exceeded", then
    posted again). With ``latest`` the reading starts just after the post."""
    web = SlackWebNotifier(TOKEN, base_url=fake.base_url, history_limit=2, history_max_pages=2)
    target = web.post(request("m0"))
    assert isinstance(target, Posted)
    for i in range(1, 9):  # a busy channel: 8 more posts, 4 pages of 2
        assert isinstance(web.post(request(f"m{i}")), Posted)
    at = datetime.fromtimestamp(float(target.ts), UTC)
    assert web.find_post("C1", "m0", at - timedelta(seconds=60)) == Rejected(
        HISTORY_WINDOW_EXCEEDED
    )
    assert web.find_post("C1", "m0", at - timedelta(seconds=60), at) == Found(target.ts)
    calls = fake.calls(method="conversations.history")
    assert calls[-1].params["latest"] == f"{float(target.ts):.6f}"
    assert calls[-1].params["inclusive"] in ("1", "true", True)


def test_history_reading_is_bounded_in_time(fake: FakeSlack) -> None:
    clock = [0.0]

    def monotonic() -> float:
        clock[0] += 4.0  # every look at the clock: 4 s later (a slow Slack)
        return clock[0]

    web = SlackWebNotifier(
        TOKEN,
        base_url=fake.base_url,
        history_limit=1,
        history_max_pages=50,
        history_budget_s=10.0,
        monotonic=monotonic,
    )
    for i in range(10):
        web.post(request(f"m{i}"))
    before = len(fake.calls(method="conversations.history"))
    assert web.find_post("C1", "m0", LONG_AGO) == Rejected(HISTORY_WINDOW_EXCEEDED)
    # the deadline (taken at 4 s, so 14 s) passed at the 4th look (16 s): 3 pages read
    assert len(fake.calls(method="conversations.history")) - before == 3


def test_twin_store_late_misses_the_first_read_only() -> None:
    twin = FakeNotifier()
    twin.script("C1", STORE_LATE)
    outcome = twin.post(request("m1"))
    assert isinstance(outcome, Unavailable) and outcome.in_doubt
    assert twin.find_post("C1", "m1", LONG_AGO) == NotFound()  # Slack still storing it
    assert isinstance(twin.find_post("C1", "m1", LONG_AGO), Found)


def test_check_auth(fake: FakeSlack) -> None:
    assert SlackWebNotifier(TOKEN, base_url=fake.base_url).check_auth() is None
    wrong = SlackWebNotifier("xoxb-wrong", base_url=fake.base_url)
    assert wrong.check_auth() == Rejected("invalid_auth")


def test_dry_run_logs_a_rendering(caplog: pytest.LogCaptureFixture) -> None:
    dry = DryRunNotifier()
    with caplog.at_level(logging.INFO, logger="services.notifier.slack"):
        assert dry.post(request("m1", channel="U9")) == Rendered()
    [record] = caplog.records
    assert record.getMessage() == "dry-run, not posted:\nto U9 (p1, m1)\ntext: alert m1\n*m1*"
    assert dry.find_post("U9", "m1", LONG_AGO) == NotFound()
    assert dry.check_auth() is None
    assert dry.dry_run is True


# -- kept-alive connections ----------------------------------------------------------------------


def test_calls_of_a_thread_share_one_connection(fake: FakeSlack) -> None:
    web = SlackWebNotifier(TOKEN, base_url=fake.base_url, timeout_s=1)
    for i in range(5):
        assert isinstance(web.post(request(f"m{i}")), Posted)
    assert isinstance(web.find_post("C1", "m0", LONG_AGO), Found)
    assert web.check_auth() is None
    assert fake.connections() == (1, 1)
    other = threading.Thread(target=lambda: [web.post(request(f"t{i}")) for i in range(3)])
    other.start()
    other.join(30)
    assert fake.connections()[0] == 2  # a connection per calling thread
    assert len(fake.posts()) == 8


def test_keep_alive_zero_opens_a_connection_per_call_as_slack_sdk(fake: FakeSlack) -> None:
    web = SlackWebNotifier(TOKEN, base_url=fake.base_url, timeout_s=1, keep_alive_s=0)
    for i in range(3):
        assert isinstance(web.post(request(f"m{i}")), Posted)
    assert fake.connections()[0] == 3


def test_a_connection_the_server_closed_is_replaced_before_the_post(fake: FakeSlack) -> None:
    web = SlackWebNotifier(TOKEN, base_url=fake.base_url, timeout_s=1)
    assert isinstance(web.post(request("m1")), Posted)
    # the fake marks the connection idle just after writing the answer the client has read
    wait_until(lambda: fake.drop_connections() == 1, timeout_s=30, message="one idle dropped")
    wait_until(lambda: fake.connections()[1] == 0, timeout_s=30, message="connection closed")
    # Sent on the closed connection, the post would be answered by a reset: in doubt.
    assert isinstance(web.post(request("m2")), Posted)
    assert fake.connections()[0] == 2
    assert [p.metadata["event_payload"]["message_id"] for p in fake.posts()] == ["m1", "m2"]


def test_an_answer_lost_is_in_doubt_and_the_next_call_opens_a_new_connection(
    fake: FakeSlack,
) -> None:
    web = SlackWebNotifier(TOKEN, base_url=fake.base_url, timeout_s=1)
    assert isinstance(web.post(request("m1")), Posted)
    fake.slow("C1", delay_s=3, then_store=True)
    outcome = web.post(request("m2"))
    assert isinstance(outcome, Unavailable) and outcome.in_doubt is True
    assert isinstance(web.post(request("m3")), Posted)
    assert fake.connections()[0] == 2


def test_a_connection_idle_for_keep_alive_s_is_not_reused(fake: FakeSlack) -> None:
    now = [100.0]
    client = KeepAliveWebClient(
        token=TOKEN, base_url=fake.base_url, retry_handlers=[], idle_s=5, monotonic=lambda: now[0]
    )
    client.chat_postMessage(channel="C1", text="one")
    now[0] += 4.9
    client.chat_postMessage(channel="C1", text="two")
    assert (fake.connections()[0], client.connections_opened) == (1, 1)
    now[0] += 5.0
    client.chat_postMessage(channel="C1", text="three")
    assert (fake.connections()[0], client.connections_opened) == (2, 2)
    client.close()
    wait_until(lambda: fake.connections()[1] == 0, timeout_s=30, message="closed")


def test_an_http_error_answer_reads_as_through_urllib(fake: FakeSlack) -> None:
    """429 and 5xx come back as slack-sdk's SlackApiError with status, headers and body."""
    client = KeepAliveWebClient(token=TOKEN, base_url=fake.base_url, retry_handlers=[], idle_s=30)
    fake.rate_limit("C1", retry_after_s=7)
    with pytest.raises(SlackApiError) as raised:
        client.chat_postMessage(channel="C1", text="one")
    response = raised.value.response
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"
    assert response["error"] == "ratelimited"
    client.chat_postMessage(channel="C1", text="two")  # the connection is still good
    assert fake.connections()[0] == 1


def test_a_connection_on_a_descriptor_above_1024_is_still_reused(fake: FakeSlack) -> None:
    """The enricher's and notifier's processes hold RocksDB files and Kafka sockets; a check
    with ``select`` fails above descriptor 1024 and reconnected at every call."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard), hard))
    gc.collect()  # clients of earlier tests closing their sockets would free low descriptors
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        client = KeepAliveWebClient(
            token=TOKEN, base_url=fake.base_url, retry_handlers=[], idle_s=30
        )
        client.chat_postMessage(channel="C1", text="one")
        for _ in range(10):
            if client._local.conn.http.sock.fileno() > 1024:
                break
            # a descriptor freed meanwhile (another test's socket closing): fill it, reconnect
            while (fd := os.open(os.devnull, os.O_RDONLY)) <= 1024:
                filler.append(fd)
            filler.append(fd)
            client.close()
            client.chat_postMessage(channel="C1", text="again")
        assert client._local.conn.http.sock.fileno() > 1024
        opened = client.connections_opened
        client.chat_postMessage(channel="C1", text="two")
        client.chat_postMessage(channel="C1", text="three")
        assert client.connections_opened == opened
        client.close()
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
