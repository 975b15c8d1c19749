"""The fake Slack Web API, driven by the real slack_sdk.WebClient."""

from __future__ import annotations

import json
import re
import selectors
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.error import HTTPError

import pytest
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry import RateLimitErrorRetryHandler
from slack_sdk.web import SlackResponse

from tests.support.fake_slack import Behaviour, FakeSlack

TOKEN = "xoxb-test"
REPO_ROOT = Path(__file__).resolve().parents[2]
TS_FORMAT = re.compile(r"^\d{10}\.\d{6}$")


def section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def metadata(message_id: str) -> dict[str, Any]:
    return {"event_type": "field_alert", "event_payload": {"message_id": message_id}}


def api_error(call: Any, *args: Any, **kwargs: Any) -> SlackResponse:
    """Call, expect SlackApiError, return its response."""
    with pytest.raises(SlackApiError) as raised:
        call(*args, **kwargs)
    response = raised.value.response
    assert isinstance(response, SlackResponse)
    return response


def http(
    method: str,
    url: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """A plain HTTP request with a JSON body; returns (status, decoded JSON body)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), json.loads(response.read())
    except HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


@pytest.fixture
def fake() -> Iterator[FakeSlack]:
    with FakeSlack(token=TOKEN) as server:
        yield server


@pytest.fixture
def client(fake: FakeSlack) -> WebClient:
    return WebClient(token=TOKEN, base_url=fake.base_url, timeout=10)


# ------------------------------------------------------------------------------ basics


def test_base_url_ends_with_api(fake: FakeSlack) -> None:
    assert fake.base_url == f"http://127.0.0.1:{fake.port}/api/"


def test_auth_test_identifies_the_bot(client: WebClient) -> None:
    response = client.auth_test()
    assert response["ok"] is True
    assert response["user_id"] == FakeSlack.BOT_USER_ID
    assert response["team_id"] == FakeSlack.TEAM_ID


def test_post_with_blocks_and_metadata_is_stored_and_found_in_history(
    fake: FakeSlack, client: WebClient
) -> None:
    blocks = [section("*Connector failed* for Acme"), {"type": "divider"}]
    posted = client.chat_postMessage(
        channel="D123", text="Connector failed for Acme", blocks=blocks, metadata=metadata("m-1")
    )

    assert posted["ok"] is True
    assert posted["channel"] == "D123"
    assert TS_FORMAT.match(posted["ts"])
    assert posted["message"]["blocks"] == blocks
    assert posted["message"]["metadata"] == metadata("m-1")

    [stored] = fake.posts("D123")
    assert stored.ts == posted["ts"]
    assert stored.text == "Connector failed for Acme"
    assert stored.blocks == blocks
    assert stored.metadata == metadata("m-1")

    history = client.conversations_history(channel="D123", include_all_metadata=True)
    [message] = history["messages"]
    assert message["ts"] == posted["ts"]
    assert message["metadata"]["event_payload"]["message_id"] == "m-1"


def test_history_leaves_metadata_out_unless_asked(client: WebClient) -> None:
    client.chat_postMessage(channel="C1", text="hello", metadata=metadata("m-2"))

    without = client.conversations_history(channel="C1")
    assert "metadata" not in without["messages"][0]
    explicit_false = client.conversations_history(channel="C1", include_all_metadata=False)
    assert "metadata" not in explicit_false["messages"][0]


def test_ts_values_are_unique_and_increasing(client: WebClient) -> None:
    stamps = [client.chat_postMessage(channel="C1", text=f"n{i}")["ts"] for i in range(20)]
    assert all(TS_FORMAT.match(ts) for ts in stamps)
    assert stamps == sorted(stamps, key=float)
    assert len(set(stamps)) == len(stamps)


def test_form_encoded_post_with_json_string_blocks_and_metadata(
    fake: FakeSlack, client: WebClient
) -> None:
    blocks = [section("from a form")]
    response = client.api_call(
        "chat.postMessage",
        params={
            "channel": "C1",
            "text": "form",
            "blocks": json.dumps(blocks),
            "metadata": json.dumps(metadata("m-form")),
        },
    )
    assert response["ok"] is True
    [stored] = fake.posts()
    assert stored.blocks == blocks
    assert stored.metadata == metadata("m-form")
    [call] = fake.calls("chat.postMessage")
    assert call.content_type == "application/x-www-form-urlencoded"


def test_json_body_with_blocks_as_a_json_string(fake: FakeSlack, client: WebClient) -> None:
    blocks = [section("string blocks")]
    client.chat_postMessage(channel="C1", text="t", blocks=json.dumps(blocks))
    assert fake.posts()[0].blocks == blocks
    assert fake.calls("chat.postMessage")[0].content_type == "application/json"


def test_token_as_a_form_parameter_is_accepted(fake: FakeSlack) -> None:
    request = urllib.request.Request(
        fake.base_url + "auth.test",
        data=f"token={TOKEN}".encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.loads(response.read())["ok"] is True


def test_unknown_method(client: WebClient) -> None:
    assert api_error(client.api_call, "users.list")["error"] == "unknown_method"


# ------------------------------------------------------------------------------ auth


def test_wrong_token_is_invalid_auth(fake: FakeSlack) -> None:
    wrong = WebClient(token="xoxb-wrong", base_url=fake.base_url)
    response = api_error(wrong.chat_postMessage, channel="C1", text="x")
    assert response.status_code == 200
    assert response["error"] == "invalid_auth"
    assert fake.posts() == []


def test_missing_token_is_not_authed(fake: FakeSlack) -> None:
    anonymous = WebClient(base_url=fake.base_url)
    assert api_error(anonymous.auth_test)["error"] == "not_authed"


def test_several_tokens_are_accepted() -> None:
    with FakeSlack(token=["xoxb-a", "xoxb-b"]) as fake:
        for token in ("xoxb-a", "xoxb-b"):
            assert WebClient(token=token, base_url=fake.base_url).auth_test()["ok"] is True


# ------------------------------------------------------------------------------ scripting


def test_rate_limit_answers_429_with_retry_after(fake: FakeSlack, client: WebClient) -> None:
    fake.rate_limit("C1", retry_after_s=7, times=2)

    for _ in range(2):
        response = api_error(client.chat_postMessage, channel="C1", text="x")
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "7"
        assert response["error"] == "ratelimited"
    assert client.chat_postMessage(channel="C1", text="third")["ok"] is True

    assert [c.status for c in fake.calls("chat.postMessage", "C1")] == [429, 429, 200]
    assert [p.text for p in fake.posts()] == ["third"]


def test_rate_limit_is_per_channel(fake: FakeSlack, client: WebClient) -> None:
    fake.rate_limit("C1", retry_after_s=1)
    assert client.chat_postMessage(channel="C2", text="other channel")["ok"] is True
    assert api_error(client.chat_postMessage, channel="C1", text="x").status_code == 429


def test_client_retry_handler_honours_retry_after(fake: FakeSlack) -> None:
    retrying = WebClient(
        token=TOKEN,
        base_url=fake.base_url,
        retry_handlers=[RateLimitErrorRetryHandler(max_retry_count=1)],
    )
    fake.rate_limit("C1", retry_after_s=0)

    assert retrying.chat_postMessage(channel="C1", text="eventually")["ok"] is True
    assert [c.status for c in fake.calls("chat.postMessage")] == [429, 200]
    assert len(fake.posts()) == 1


@pytest.mark.parametrize("status", [500, 503])
def test_server_error(fake: FakeSlack, client: WebClient, status: int) -> None:
    fake.server_error("C1", status=status)
    response = api_error(client.chat_postMessage, channel="C1", text="x")
    assert response.status_code == status
    assert response["ok"] is False
    assert fake.posts() == []
    assert client.chat_postMessage(channel="C1", text="recovered")["ok"] is True


@pytest.mark.parametrize(
    "code",
    ["channel_not_found", "invalid_blocks", "not_in_channel", "invalid_auth", "msg_too_long"],
)
def test_slack_error(fake: FakeSlack, client: WebClient, code: str) -> None:
    fake.slack_error("C1", code)
    response = api_error(client.chat_postMessage, channel="C1", text="x")
    assert response.status_code == 200
    assert response["error"] == code
    assert fake.posts() == []
    [call] = fake.calls()
    assert (call.error, call.behaviour) == (code, "slack_error")


def test_queue_is_consumed_in_order(fake: FakeSlack, client: WebClient) -> None:
    fake.rate_limit("C1", retry_after_s=1)
    fake.server_error("C1", status=503)
    fake.slack_error("C1", "not_in_channel")

    outcomes = []
    for _ in range(4):
        try:
            client.chat_postMessage(channel="C1", text="x")
            outcomes.append("ok")
        except SlackApiError as error:
            outcomes.append(f"{error.response.status_code} {error.response['error']}")
    assert outcomes == ["429 ratelimited", "503 internal_error", "200 not_in_channel", "ok"]


def test_persistent_behaviour_lasts_until_reset(fake: FakeSlack, client: WebClient) -> None:
    fake.slack_error("C1", "channel_not_found", times=None)
    for _ in range(3):
        assert api_error(client.chat_postMessage, channel="C1", text="x")["error"] == (
            "channel_not_found"
        )
    fake.reset()
    assert client.chat_postMessage(channel="C1", text="x")["ok"] is True


def test_queued_behaviour_runs_before_persistent(fake: FakeSlack, client: WebClient) -> None:
    fake.slack_error("C1", "not_in_channel", times=None)
    fake.server_error("C1", status=500)
    assert api_error(client.chat_postMessage, channel="C1", text="x").status_code == 500
    assert api_error(client.chat_postMessage, channel="C1", text="x")["error"] == "not_in_channel"


def test_any_channel_behaviour(client: WebClient, fake: FakeSlack) -> None:
    fake.slack_error(None, "invalid_auth", times=2)
    assert api_error(client.chat_postMessage, channel="C1", text="x")["error"] == "invalid_auth"
    assert api_error(client.chat_postMessage, channel="C2", text="x")["error"] == "invalid_auth"
    assert client.chat_postMessage(channel="C3", text="x")["ok"] is True


def test_behaviour_is_kept_for_its_method(fake: FakeSlack, client: WebClient) -> None:
    fake.slack_error("C1", "not_in_channel")
    assert client.conversations_history(channel="C1")["ok"] is True
    assert api_error(client.chat_postMessage, channel="C1", text="x")["error"] == "not_in_channel"

    fake.server_error("C1", status=503, method="conversations.history")
    assert client.chat_postMessage(channel="C1", text="x")["ok"] is True
    assert api_error(client.conversations_history, channel="C1").status_code == 503


def test_slow_then_store_times_out_but_the_message_exists(
    fake: FakeSlack, client: WebClient
) -> None:
    impatient = WebClient(token=TOKEN, base_url=fake.base_url, timeout=1)
    fake.slow("D1", delay_s=30, then_store=True)

    with pytest.raises(TimeoutError):
        impatient.chat_postMessage(channel="D1", text="in doubt", metadata=metadata("m-slow"))

    # The in-doubt check the notifier makes before re-sending.
    history = client.conversations_history(channel="D1", include_all_metadata=True)
    ids = [m["metadata"]["event_payload"]["message_id"] for m in history["messages"]]
    assert ids == ["m-slow"]
    assert len(fake.calls("chat.postMessage")) == 1


def test_slow_store_after_stores_the_post_after_the_client_gave_up(
    fake: FakeSlack, client: WebClient
) -> None:
    impatient = WebClient(token=TOKEN, base_url=fake.base_url, timeout=1)
    fake.slow("D1", delay_s=0, then_store=True, store_after_s=2.0)
    asked = time.time()
    with pytest.raises(TimeoutError):
        impatient.chat_postMessage(channel="D1", text="late", metadata=metadata("m-late"))
    # right after the timeout the post is not there yet: Slack is still "storing" it
    assert client.conversations_history(channel="D1")["messages"] == []
    [stored] = fake.wait_for_posts(1, timeout_s=10)
    assert float(stored.ts) >= asked + 2.0  # its ts is when it was stored


def test_slow_without_store_answers_503_after_the_delay(fake: FakeSlack, client: WebClient) -> None:
    fake.slow("C1", delay_s=0.2, then_store=False)
    response = api_error(client.chat_postMessage, channel="C1", text="lost")
    assert response.status_code == 503
    assert response["error"] == "service_unavailable"
    assert fake.posts() == []


def test_stop_wakes_a_held_back_answer() -> None:
    fake = FakeSlack(token=TOKEN).start()
    try:
        fake.slow("C1", delay_s=60, then_store=True)
        client = WebClient(token=TOKEN, base_url=fake.base_url, timeout=120)
        results: list[SlackResponse] = []
        poster = threading.Thread(
            target=lambda: results.append(client.chat_postMessage(channel="C1", text="held"))
        )
        poster.start()
        fake.wait_for_posts(1, timeout_s=10)
    finally:
        fake.stop()
    poster.join(timeout=10)
    assert not poster.is_alive()
    assert results[0]["ok"] is True


def test_client_urls_label_calls_and_held_answers_are_visible(fake: FakeSlack) -> None:
    """Two replicas sharing one fake are told apart, and a held answer shows who waits."""
    a = WebClient(token=TOKEN, base_url=fake.client_url("notifier-1"), timeout=1)
    b = WebClient(token=TOKEN, base_url=fake.client_url("notifier-2"), timeout=10)
    assert b.chat_postMessage(channel="C1", text="from b")["ok"] is True
    fake.slow("C1", delay_s=3, then_store=True)
    with pytest.raises(TimeoutError):
        a.chat_postMessage(channel="C1", text="in doubt from a")
    held = fake.held()
    assert [(c.client, c.channel) for c in held] == [("notifier-1", "C1")]
    assert [c.client for c in fake.calls("chat.postMessage")] == ["notifier-2", "notifier-1"]
    deadline = time.monotonic() + 10
    while fake.held() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.held() == []
    assert [p.text for p in fake.posts("C1")] == ["from b", "in doubt from a"]
    with pytest.raises(ValueError):
        fake.client_url("a/b")


def test_enforced_rate_limit(fake: FakeSlack, client: WebClient) -> None:
    for i in range(5):
        client.chat_postMessage(channel="C1", text=f"unlimited {i}")

    fake.enforce_rate_limit(per_channel_per_s=0.01, burst=2)
    assert client.chat_postMessage(channel="C1", text="1")["ok"] is True
    assert client.chat_postMessage(channel="C1", text="2")["ok"] is True
    response = api_error(client.chat_postMessage, channel="C1", text="3")
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) >= 1
    assert client.chat_postMessage(channel="C2", text="another channel")["ok"] is True

    fake.enforce_rate_limit(None)
    assert client.chat_postMessage(channel="C1", text="off again")["ok"] is True


def test_behaviour_validation() -> None:
    with pytest.raises(ValueError):
        Behaviour("server_error", status=404)
    with pytest.raises(ValueError):
        FakeSlack().slow("C1", delay_s=1, times=0)


# ------------------------------------------------------------------------------ chat.update


def test_update_changes_the_stored_message(fake: FakeSlack, client: WebClient) -> None:
    ts = client.chat_postMessage(channel="C1", text="before", metadata=metadata("m-u"))["ts"]

    updated = client.chat_update(channel="C1", ts=ts, text="after", blocks=[section("after")])

    assert updated["ts"] == ts
    assert updated["message"]["text"] == "after"
    [stored] = fake.posts()
    assert (stored.text, stored.blocks, stored.metadata) == (
        "after",
        [section("after")],
        metadata("m-u"),
    )
    [message] = client.conversations_history(channel="C1")["messages"]
    assert message["text"] == "after"
    assert "edited" in message


def test_update_of_unknown_message(client: WebClient) -> None:
    client.chat_postMessage(channel="C1", text="x")
    response = api_error(client.chat_update, channel="C1", ts="1.000001", text="y")
    assert response["error"] == "message_not_found"


def test_updates_are_logged_per_message_and_counted_by_message_id(
    fake: FakeSlack, client: WebClient
) -> None:
    ts = client.chat_postMessage(channel="C1", text="v0", metadata=metadata("m1"))["ts"]
    other = client.chat_postMessage(channel="C1", text="w0", metadata=metadata("m2"))["ts"]
    for n in (1, 2):
        client.chat_update(channel="C1", ts=ts, text=f"v{n}", metadata=metadata(f"m1-u{n}"))
    client.chat_update(channel="C1", ts=ts, text="v2", metadata=metadata("m1-u2"))  # twice

    assert [(u.ts, u.message_id, u.text) for u in fake.updates(ts=ts)] == [
        (ts, "m1-u1", "v1"),
        (ts, "m1-u2", "v2"),
        (ts, "m1-u2", "v2"),
    ]
    assert fake.updates(ts=other) == []
    assert fake.update_counts() == {"m1-u1": 1, "m1-u2": 2}
    # posts are counted by the id they were posted with, whatever the updates left
    assert fake.post_counts() == {"m1": 1, "m2": 1}
    stored = next(p for p in fake.posts() if p.ts == ts)
    assert (stored.posted_message_id, stored.update_count) == ("m1", 3)
    assert stored.metadata == metadata("m1-u2")
    assert len(fake.wait_for_updates(3, channel="C1", timeout_s=1)) == 3
    with pytest.raises(TimeoutError):
        fake.wait_for_updates(4, timeout_s=0.1)


def test_history_of_an_edited_message_carries_its_current_metadata(client: WebClient) -> None:
    ts = client.chat_postMessage(channel="C1", text="v0", metadata=metadata("m1"))["ts"]
    client.chat_postMessage(channel="C1", text="later", metadata=metadata("m2"))
    client.chat_update(channel="C1", ts=ts, text="v1", metadata=metadata("m1-u1"))

    # exactly the message at ts, as the notifier reads it to check an in-doubt update
    history = client.conversations_history(
        channel="C1", oldest=ts, latest=ts, inclusive=True, limit=1, include_all_metadata=True
    )
    [message] = history["messages"]
    assert (message["ts"], message["text"], message["metadata"]) == (ts, "v1", metadata("m1-u1"))
    assert "edited" in message


def test_deleted_and_locked_messages_cannot_be_updated(fake: FakeSlack, client: WebClient) -> None:
    gone = client.chat_postMessage(channel="C1", text="a", metadata=metadata("m1"))["ts"]
    locked = client.chat_postMessage(channel="C1", text="b", metadata=metadata("m2"))["ts"]
    fake.delete("C1", gone)
    fake.lock("C1", locked)
    assert api_error(client.chat_update, channel="C1", ts=gone, text="x")["error"] == (
        "message_not_found"
    )
    assert api_error(client.chat_update, channel="C1", ts=locked, text="x")["error"] == (
        "cant_update_message"
    )
    [left] = client.conversations_history(channel="C1")["messages"]
    assert left["ts"] == locked
    assert fake.updates() == []
    assert fake.post_counts() == {"m1": 1, "m2": 1}  # the deleted one was posted


def test_update_faults_are_scripted_like_posts(fake: FakeSlack, client: WebClient) -> None:
    ts = client.chat_postMessage(channel="C1", text="v0", metadata=metadata("m1"))["ts"]
    fake.rate_limit("C1", retry_after_s=3, method="chat.update")
    fake.server_error("C1", status=503, method="chat.update")
    fake.slack_error("C1", "edit_window_closed", method="chat.update")
    limited = api_error(client.chat_update, channel="C1", ts=ts, text="v1")
    assert (limited.status_code, limited.headers["Retry-After"]) == (429, "3")
    assert api_error(client.chat_update, channel="C1", ts=ts, text="v1").status_code == 503
    assert api_error(client.chat_update, channel="C1", ts=ts, text="v1")["error"] == (
        "edit_window_closed"
    )
    assert fake.updates() == []
    # posts are not touched by update scripts
    assert client.chat_postMessage(channel="C1", text="w")["ok"] is True


def test_slow_update_is_applied_before_its_answer_is_held_back(
    fake: FakeSlack, client: WebClient
) -> None:
    ts = client.chat_postMessage(channel="C1", text="v0", metadata=metadata("m1"))["ts"]
    fake.slow("C1", delay_s=5, then_store=True, method="chat.update")
    quick = WebClient(token="xoxb-test", base_url=fake.base_url, timeout=1)
    with pytest.raises(TimeoutError):
        quick.chat_update(channel="C1", ts=ts, text="v1", metadata=metadata("m1-u1"))
    assert fake.update_counts() == {"m1-u1": 1}
    assert [c.method for c in fake.held()] == ["chat.update"]


def test_update_logs_over_the_control_api(fake: FakeSlack, client: WebClient) -> None:
    ts = client.chat_postMessage(channel="C1", text="v0", metadata=metadata("m1"))["ts"]
    client.chat_update(channel="C1", ts=ts, text="v1", metadata=metadata("m1-u1"))
    with urllib.request.urlopen(fake.control_url + f"updates?channel=C1&ts={ts}") as r:
        [update] = json.loads(r.read())["updates"]
    assert (update["ts"], update["message_id"], update["text"]) == (ts, "m1-u1", "v1")
    with urllib.request.urlopen(fake.control_url + "counts") as r:
        counts = json.loads(r.read())
    assert (counts["posts"], counts["updates"]) == ({"m1": 1}, {"m1-u1": 1})


# ------------------------------------------------------------------------------ validation


def post_raw(client: WebClient, **payload: Any) -> SlackResponse:
    # api_call skips the SDK's missing-text warning, which pytest turns into an error.
    return client.api_call("chat.postMessage", json=payload)


def test_block_count_limit(client: WebClient) -> None:
    blocks = [{"type": "divider"}] * 50
    assert post_raw(client, channel="C1", blocks=blocks)["ok"] is True
    response = api_error(post_raw, client, channel="C1", blocks=[*blocks, {"type": "divider"}])
    assert response["error"] == "invalid_blocks"
    assert "no more than 50 items" in response["errors"][0]


def test_section_text_limit(client: WebClient) -> None:
    assert client.chat_postMessage(channel="C1", text="x", blocks=[section("a" * 3000)])["ok"]
    response = api_error(
        client.chat_postMessage, channel="C1", text="x", blocks=[section("a" * 3001)]
    )
    assert response["error"] == "invalid_blocks"


def test_top_level_text_limit(fake: FakeSlack, client: WebClient) -> None:
    assert client.chat_postMessage(channel="C1", text="a" * 40000)["ok"] is True
    response = api_error(client.chat_postMessage, channel="C1", text="a" * 40001)
    assert response["error"] == "msg_too_long"
    assert len(fake.posts()) == 1


@pytest.mark.parametrize(
    ("blocks", "error"),
    [
        ({"type": "divider"}, "invalid_blocks_format"),
        ("not json", "invalid_blocks_format"),
        ([{"text": "no type"}], "invalid_blocks"),
        (["a string"], "invalid_blocks"),
        ([{"type": "no_such_block"}], "invalid_blocks"),
        ([{"type": "header", "text": {"type": "plain_text", "text": "h" * 151}}], "invalid_blocks"),
        ([{"type": "section"}], "invalid_blocks"),
        (
            [{"type": "divider", "block_id": "a"}, {"type": "divider", "block_id": "a"}],
            "invalid_blocks",
        ),
    ],
)
def test_invalid_blocks(fake: FakeSlack, client: WebClient, blocks: Any, error: str) -> None:
    response = api_error(post_raw, client, channel="C1", text="x", blocks=blocks)
    assert response["error"] == error
    assert fake.posts() == []


def test_required_fields(client: WebClient) -> None:
    assert api_error(post_raw, client, text="no channel")["error"] == "channel_not_found"
    assert api_error(post_raw, client, channel="C1")["error"] == "no_text"
    bad_metadata = {"event_type": "x"}
    response = api_error(post_raw, client, channel="C1", text="x", metadata=bad_metadata)
    assert response["error"] == "invalid_metadata_format"


def test_blocks_without_text_are_accepted(fake: FakeSlack, client: WebClient) -> None:
    assert post_raw(client, channel="C1", blocks=[section("only blocks")])["ok"] is True
    assert fake.posts()[0].text == ""


# ------------------------------------------------------------------------------ history


def test_history_order_limit_bounds_and_cursor(client: WebClient) -> None:
    stamps = [client.chat_postMessage(channel="C1", text=str(i))["ts"] for i in range(5)]
    client.chat_postMessage(channel="C2", text="elsewhere")

    everything = client.conversations_history(channel="C1")
    assert [m["ts"] for m in everything["messages"]] == stamps[::-1]
    assert everything["has_more"] is False

    first = client.conversations_history(channel="C1", limit=2)
    assert [m["text"] for m in first["messages"]] == ["4", "3"]
    assert first["has_more"] is True
    cursor = first["response_metadata"]["next_cursor"]
    second = client.conversations_history(channel="C1", limit=2, cursor=cursor)
    assert [m["text"] for m in second["messages"]] == ["2", "1"]

    window = client.conversations_history(channel="C1", oldest=stamps[1], latest=stamps[4])
    assert [m["text"] for m in window["messages"]] == ["3", "2"]
    inclusive = client.conversations_history(
        channel="C1", oldest=stamps[1], latest=stamps[4], inclusive=True
    )
    assert [m["text"] for m in inclusive["messages"]] == ["4", "3", "2", "1"]


def test_history_cursor_pages_stay_inside_the_window(client: WebClient) -> None:
    """What the in-doubt check relies on: newest first from ``latest`` down to ``oldest``
    (both inclusive), the cursor going on with older messages of the same window, and
    ``has_more`` false on the window's last page."""
    stamps = [client.chat_postMessage(channel="C1", text=str(i))["ts"] for i in range(10)]
    window = {"oldest": stamps[2], "latest": stamps[7], "inclusive": True, "limit": 2}
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        page = client.conversations_history(channel="C1", cursor=cursor, **window)
        pages.append([m["text"] for m in page["messages"]])
        if not page["has_more"]:
            assert not (page.get("response_metadata") or {}).get("next_cursor")
            break
        cursor = page["response_metadata"]["next_cursor"]
    assert pages == [["7", "6"], ["5", "4"], ["3", "2"]]
    exclusive = client.conversations_history(
        channel="C1", oldest=stamps[2], latest=stamps[7], limit=2
    )
    assert [m["text"] for m in exclusive["messages"]] == ["6", "5"]
    # a window with nothing in it
    empty = client.conversations_history(channel="C1", oldest=stamps[9], latest=stamps[9])
    assert (empty["messages"], empty["has_more"]) == ([], False)


def test_history_leaves_out_thread_replies(client: WebClient) -> None:
    parent = client.chat_postMessage(channel="C1", text="parent")["ts"]
    client.chat_postMessage(channel="C1", text="reply", thread_ts=parent)
    client.chat_postMessage(channel="C1", text="broadcast", thread_ts=parent, reply_broadcast=True)

    texts = [m["text"] for m in client.conversations_history(channel="C1")["messages"]]
    assert texts == ["broadcast", "parent"]


def test_history_over_get_with_query_parameters(fake: FakeSlack, client: WebClient) -> None:
    client.chat_postMessage(channel="C1", text="via get", metadata=metadata("m-get"))
    status, body = http(
        "GET",
        fake.base_url + "conversations.history?channel=C1&include_all_metadata=true",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert status == 200
    assert body["messages"][0]["metadata"] == metadata("m-get")

    status, body = http(
        "GET",
        fake.base_url + "chat.postMessage?channel=C1&text=x",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert (status, body["error"]) == (405, "method_not_allowed")


# ------------------------------------------------------------------------------ records


def test_calls_are_recorded_and_filtered(fake: FakeSlack, client: WebClient) -> None:
    client.auth_test()
    client.chat_postMessage(channel="C1", text="a")
    client.chat_postMessage(channel="C2", text="b")
    client.conversations_history(channel="C1")

    assert [c.method for c in fake.calls()] == [
        "auth.test",
        "chat.postMessage",
        "chat.postMessage",
        "conversations.history",
    ]
    assert [c.channel for c in fake.calls(method="chat.postMessage")] == ["C1", "C2"]
    assert [c.method for c in fake.calls(channel="C1")] == [
        "chat.postMessage",
        "conversations.history",
    ]
    post = fake.calls("chat.postMessage", "C2")[0]
    assert (post.status, post.ok, post.params["text"], post.http_verb) == (200, True, "b", "POST")
    assert "token" not in post.params
    assert post.at <= time.time()

    fake.reset()
    assert fake.calls() == []
    assert fake.posts() == []


def test_posts_are_copies(fake: FakeSlack, client: WebClient) -> None:
    client.chat_postMessage(channel="C1", text="original")
    fake.posts()[0].text = "changed"
    assert fake.posts()[0].text == "original"


def test_wait_for_posts(fake: FakeSlack, client: WebClient) -> None:
    poster = threading.Thread(target=lambda: client.chat_postMessage(channel="C9", text="late"))
    poster.start()
    try:
        [message] = fake.wait_for_posts(1, channel="C9", timeout_s=10)
    finally:
        poster.join()
    assert message.text == "late"
    with pytest.raises(TimeoutError):
        fake.wait_for_posts(2, channel="C9", timeout_s=0.05)


# ------------------------------------------------------------------------------ control API


def test_control_api_in_process(fake: FakeSlack, client: WebClient) -> None:
    control = fake.control_url
    script = {"kind": "rate_limit", "channel": "C1", "retry_after_s": 3, "times": 1}
    assert http("POST", control + "script", script) == (200, {"ok": True})

    response = api_error(client.chat_postMessage, channel="C1", text="x")
    assert (response.status_code, response.headers["Retry-After"]) == (429, "3")
    client.chat_postMessage(channel="C1", text="stored", metadata=metadata("m-c"))

    status, body = http("GET", control + "posts?channel=C1")
    assert status == 200
    assert [(p["text"], p["metadata"]) for p in body["posts"]] == [("stored", metadata("m-c"))]
    status, body = http("GET", control + "calls?method=chat.postMessage")
    assert [c["status"] for c in body["calls"]] == [429, 200]

    assert http("POST", control + "rate_limit", {"per_channel_per_s": 0.01, "burst": 1})[0] == 200
    client.chat_postMessage(channel="C5", text="first")
    assert api_error(client.chat_postMessage, channel="C5", text="second").status_code == 429

    assert http("POST", control + "reset", {}) == (200, {"ok": True})
    assert fake.posts() == []
    assert client.chat_postMessage(channel="C5", text="after reset")["ok"] is True


def test_control_api_rejects_bad_requests(fake: FakeSlack) -> None:
    status, body = http("POST", fake.control_url + "script", {"kind": "explode"})
    assert status == 400
    assert body["ok"] is False
    status, _ = http("POST", fake.control_url + "script", {"kind": "server_error", "status": 404})
    assert status == 400
    status, _ = http("GET", fake.control_url + "nothing")
    assert status == 400


# ------------------------------------------------------------------------------ process mode


def read_line(process: subprocess.Popen[str], timeout_s: float) -> str:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            raise TimeoutError("the fake Slack process printed nothing")
    return process.stdout.readline()


def test_process_mode() -> None:
    command = [
        sys.executable,
        "-m",
        "tests.support.fake_slack",
        "--port",
        "0",
        "--token",
        "xoxb-proc",
    ]
    with subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            line = read_line(process, timeout_s=30)
            assert line.startswith("FAKE_SLACK_URL=http://127.0.0.1:")
            base_url = line.strip().split("=", 1)[1]
            assert base_url.endswith("/api/")
            control = base_url.removesuffix("api/") + "_fake/"
            client = WebClient(token="xoxb-proc", base_url=base_url, timeout=10)

            assert client.chat_postMessage(channel="C1", text="hello", metadata=metadata("p"))
            script = {"kind": "slack_error", "channel": "C1", "error": "not_in_channel"}
            assert http("POST", control + "script", script)[0] == 200
            response = api_error(client.chat_postMessage, channel="C1", text="refused")
            assert response["error"] == "not_in_channel"

            _, body = http("GET", control + "posts")
            assert [(p["channel"], p["text"]) for p in body["posts"]] == [("C1", "hello")]
            _, body = http("GET", control + "calls")
            assert [c["error"] for c in body["calls"]] == [None, "not_in_channel"]
        finally:
            process.terminate()
            _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert stderr == ""
