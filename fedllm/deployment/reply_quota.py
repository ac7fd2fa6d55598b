"""How many bytes one node's reply may push through the gateway (issue 25, finding 5).

A Flower 1.42 node sends a reply in two kinds of call: ``push-messages`` carries the message
and its object tree (the content-addressed ids of every record, array and array chunk in it),
then one ``push-object`` per object carries the bytes. The gateway's body limit applies to each
call, so a registered node could send a 768 MiB reply in 5 MiB pieces, and the ServerApp read
it whole (2.2 GiB peak) before rejecting it.

Here the gateway learns each reply's object ids from the ``push-messages`` call the SuperLink
accepted (so the node that sent it was authenticated), and refuses (413, never forwarded) any
``push-object`` that would take that reply past ``max_bytes``. A reply that cannot be completed
never reaches the ServerApp: the round counts that node as not answering. Objects of no tracked
reply are forwarded unchanged (the SuperLink refuses objects no message announced).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from flwr.proto.fleet_pb2 import PushMessagesRequest
from flwr.proto.message_pb2 import ObjectTree, PushObjectRequest
from google.protobuf.message import DecodeError

MAX_REPLY_BYTES = 128 * 2**20  # a 7B model's all-linear rank-16 LoRA adapter in fp32 is ~160 MB: raise for such
MAX_TRACKED_REPLIES = 4096  # replies remembered at once (oldest forgotten first)
MAX_OBJECTS_PER_REPLY = 100_000  # a tree with more object ids is not tracked past this many
REPLY_TTL_S = 3600.0  # a reply not completed within this long is forgotten


@dataclass
class _Reply:
    """One announced reply: its object ids and the bytes pushed for it so far."""

    objects: frozenset[str]
    announced: float
    pushed: int = 0


@dataclass
class Ticket:
    """A ``push-object`` the quota let through, charged to its reply until the SuperLink answers."""

    reply: tuple[int, str] | None  # (run id, message object id), or None when no reply is tracked
    size: int = 0


@dataclass
class ReplyQuota:
    """The bytes pushed for each announced reply, against one limit."""

    max_bytes: int = MAX_REPLY_BYTES
    clock: Callable[[], float] = time.monotonic
    replies: OrderedDict[tuple[int, str], _Reply] = field(default_factory=OrderedDict)
    owner: dict[tuple[int, str], tuple[int, str]] = field(default_factory=dict)  # (run, object id) -> its reply
    refused: int = 0

    def announce(self, body: bytes) -> None:
        """Track the replies of an accepted ``push-messages`` body (one that cannot be parsed: none)."""
        try:
            request = PushMessagesRequest.FromString(body)
        except DecodeError:
            return
        for message, tree in zip(request.messages_list, request.message_object_trees, strict=False):
            run_id = message.metadata.run_id
            objects = frozenset(_object_ids(tree, MAX_OBJECTS_PER_REPLY))
            key = (run_id, tree.object_id)
            self._forget(key)
            self.replies[key] = _Reply(objects, self.clock())
            for object_id in objects:
                self.owner[(run_id, object_id)] = key
        self._expire()

    def take(self, body: bytes) -> Ticket | None:
        """Charge a ``push-object`` body to its reply; None when it would pass the limit."""
        try:
            request = PushObjectRequest.FromString(body)
        except DecodeError:
            return Ticket(None)
        key = self.owner.get((request.run_id, request.object_id))
        reply = self.replies.get(key) if key is not None else None
        if reply is None:
            return Ticket(None)
        size = len(request.object_content)
        if reply.pushed + size > self.max_bytes:
            self.refused += 1
            return None
        reply.pushed += size
        return Ticket(key, size)

    def refund(self, ticket: Ticket) -> None:
        """The SuperLink did not store the object: its bytes no longer count."""
        reply = self.replies.get(ticket.reply) if ticket.reply is not None else None
        if reply is not None:
            reply.pushed -= ticket.size

    def _expire(self) -> None:
        now = self.clock()
        while self.replies:
            key, oldest = next(iter(self.replies.items()))
            if len(self.replies) <= MAX_TRACKED_REPLIES and now - oldest.announced < REPLY_TTL_S:
                return
            self._forget(key)

    def _forget(self, key: tuple[int, str]) -> None:
        reply = self.replies.pop(key, None)
        if reply is None:
            return
        for object_id in reply.objects:
            if self.owner.get((key[0], object_id)) == key:
                del self.owner[(key[0], object_id)]


def _object_ids(tree: ObjectTree, limit: int) -> Iterator[str]:
    """The object ids in ``tree`` (its root included), at most ``limit``, without recursion."""
    stack, seen = [tree], 0
    while stack and seen < limit:
        node = stack.pop()
        seen += 1
        yield node.object_id
        stack.extend(node.children)
