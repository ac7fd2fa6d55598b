"""Issue 25, finding 5: a registered node's 768 MiB reply went through the gateway in 5 MiB
pieces and the ServerApp read it whole. The gateway now stops a reply's objects at a quota."""

from __future__ import annotations

import asyncio
import ssl

import httpx
import pytest
from flwr.proto.fleet_pb2 import PushMessagesRequest
from flwr.proto.message_pb2 import Message, Metadata, ObjectTree, PushObjectRequest

from fedllm.deployment.fleet_gateway import PUSH_MESSAGES, PUSH_OBJECT, FleetGateway
from fedllm.deployment.reply_quota import ReplyQuota

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:typer")
RUN = 7
CHUNK = 1000


def reply_tree(root: str, leaves: int) -> ObjectTree:
    return ObjectTree(object_id=root, children=[ObjectTree(object_id=f"{root}-chunk-{i}") for i in range(leaves)])


def push_messages(root: str, leaves: int) -> bytes:
    message = Message(metadata=Metadata(run_id=RUN, message_id=root))
    return PushMessagesRequest(
        messages_list=[message], message_object_trees=[reply_tree(root, leaves)]
    ).SerializeToString()


def push_object(object_id: str, size: int = CHUNK, run_id: int = RUN) -> bytes:
    return PushObjectRequest(run_id=run_id, object_id=object_id, object_content=b"x" * size).SerializeToString()


class Link:
    """A stand-in SuperLink: answers ``status`` (per path) and records what reached it."""

    def __init__(self, status: dict[str, int] | None = None):
        self.status, self.seen = status or {}, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.url.path, request.content))
        return httpx.Response(self.status.get(request.url.path, 200), content=b"")


def post(gateway: FleetGateway, path: str, body: bytes) -> int:
    async def go() -> int:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="https://gw") as client:
            return (await client.post(path, content=body)).status_code

    return asyncio.run(go())


def gateway_for(link: Link, max_bytes: int) -> FleetGateway:
    return FleetGateway(
        "127.0.0.1:9093",
        ssl.create_default_context(),
        transport=httpx.MockTransport(link),
        quota=ReplyQuota(max_bytes=max_bytes),
    )


def test_a_reply_larger_than_the_quota_is_stopped_before_the_superlink_stores_it():
    link = Link()
    gateway = gateway_for(link, max_bytes=int(2.5 * CHUNK))
    assert post(gateway, PUSH_MESSAGES, push_messages("big", 3)) == 200
    assert [post(gateway, PUSH_OBJECT, push_object(f"big-chunk-{i}")) for i in range(3)] == [200, 200, 413]
    forwarded = [body for path, body in link.seen if path == PUSH_OBJECT]
    assert len(forwarded) == 2  # the third never reached the SuperLink, so the reply never completes
    assert gateway.quota.refused == 1


def test_each_reply_has_its_own_quota_and_honest_replies_pass():
    link = Link()
    gateway = gateway_for(link, max_bytes=2 * CHUNK)
    for root in ("node-a", "node-b"):
        assert post(gateway, PUSH_MESSAGES, push_messages(root, 2)) == 200
    statuses = [
        post(gateway, PUSH_OBJECT, push_object(f"{root}-chunk-{i}")) for root in ("node-a", "node-b") for i in (0, 1)
    ]
    assert statuses == [200] * 4


def test_objects_the_superlink_did_not_store_do_not_count():
    link = Link({PUSH_OBJECT: 409})
    gateway = gateway_for(link, max_bytes=CHUNK)
    post(gateway, PUSH_MESSAGES, push_messages("r", 1))
    assert post(gateway, PUSH_OBJECT, push_object("r-chunk-0")) == 409
    link.status = {}
    assert post(gateway, PUSH_OBJECT, push_object("r-chunk-0")) == 200  # the retry still fits


def test_a_tree_the_superlink_refused_sets_no_quota_for_anyone():
    # an outsider's push-messages (no valid node signature) must not claim object ids
    link = Link({PUSH_MESSAGES: 401})
    gateway = gateway_for(link, max_bytes=CHUNK)
    assert post(gateway, PUSH_MESSAGES, push_messages("victim", 2)) == 401
    assert gateway.quota.replies == {}


def test_unparseable_or_untracked_bodies_are_left_to_the_superlink():
    link = Link()
    gateway = gateway_for(link, max_bytes=CHUNK)
    assert post(gateway, PUSH_MESSAGES, b"\xff\xff not protobuf") == 200
    assert post(gateway, PUSH_OBJECT, b"\xff\xff not protobuf") == 200
    assert post(gateway, PUSH_OBJECT, push_object("unknown", size=5 * CHUNK)) == 200
    assert len(link.seen) == 3


def test_a_deep_or_wide_tree_costs_bounded_work():
    deep = ObjectTree(object_id="leaf")
    for level in range(90):
        deep = ObjectTree(object_id=f"level-{level}", children=[deep])
    body = PushMessagesRequest(
        messages_list=[Message(metadata=Metadata(run_id=RUN))], message_object_trees=[deep]
    ).SerializeToString()
    quota = ReplyQuota(max_bytes=CHUNK)
    quota.announce(body)
    assert len(quota.owner) == 91
