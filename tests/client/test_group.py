"""Group channels: steps queued for one server together travel as one message, answers split back.

The server side (a real process) is covered in tests/e2e (test_server_robustness, test_concurrency,
test_failover). Here the channel talks to an in-process echo server with the same reply format,
so timing (who is waited for, and how long) can be checked exactly.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from swarmshard.client import group
from swarmshard.client.group import GroupChannel, GroupFailed
from swarmshard.transport.codecs import encode_tensor
from swarmshard.transport.schemas import GroupReply, GroupStep, Message, Reply, parse_meta


class EchoStream:
    """Answers a GroupStep like a server whose span doubles its input; refuses session 'bad'."""

    def __init__(self, log: list[list[str]], fail: bool = False) -> None:
        self.log = log
        self.fail = fail
        self.closed = False

    async def send(self, message: Message) -> Message:
        request = parse_meta(GroupStep, message.meta)
        self.log.append([s.session_id for s in request.steps])
        if self.fail:
            raise ConnectionError("peer went away")
        await asyncio.sleep(0.001)
        results, tensors = [], []
        for entry, wire in zip(request.steps, message.tensors):
            if entry.session_id == "bad-session":
                results.append(Reply(ok=False, error="unknown session bad-session"))
            else:
                results.append(Reply(ok=True, step=entry.step))
                tensors.append(torch.frombuffer(bytearray(wire.buffer), dtype=torch.float32).reshape(wire.shape) * 2)
        return Message(meta=GroupReply(ok=True, results=results).model_dump(exclude_none=True), tensors=tensors,
                       codecs=["none"] * len(tensors))

    async def close(self) -> None:
        self.closed = True


class EchoNode:
    def __init__(self, fail: bool = False) -> None:
        self.log: list[list[str]] = []
        self.fail = fail
        self.opened = 0

    async def open_stream(self, peer_id: str, name: str) -> EchoStream:
        self.opened += 1
        return EchoStream(self.log, self.fail)


def _wire(value: float):
    return encode_tensor(torch.full((1, 1, 4), float(value)))


async def _session(channel: GroupChannel, sid: str, steps: int, delay: float, gap: float) -> list[float]:
    """A session stepping ``steps`` times, ``gap`` seconds apart, starting ``delay`` late each round."""
    out = []
    for step in range(steps):
        await asyncio.sleep(delay)
        reply = await channel.step(sid, step, step, _wire(step + 1))
        out.append(float(reply.tensors[0][0, 0, 0]))
        await asyncio.sleep(gap)
    return out


def test_steps_queued_together_share_a_message_and_answers_split_back():
    async def go():
        node = EchoNode()
        channel = GroupChannel(node, "peer", timeout=5)
        channel.members = 5
        outs = await asyncio.gather(*(_session(channel, f"session-{i:03d}", 3, 0, 0.01) for i in range(5)))
        stream = channel._idle[0]
        for i in range(5):
            channel.leave(f"session-{i:03d}")
        await asyncio.sleep(0.01)
        return node, channel, outs, stream

    node, channel, outs, stream = asyncio.run(go())
    assert outs == [[2.0, 4.0, 6.0]] * 5
    assert [len(m) for m in node.log] == [5, 5, 5]
    assert (channel.messages, channel.steps, node.opened) == (3, 15, 1)  # one stream, reused
    assert channel.members == 0 and stream.closed and not channel._idle  # the last to leave closes it


def test_a_flush_waits_for_sessions_due_but_not_for_long(monkeypatch):
    """Sessions in one rhythm arrive spread out (each samples its token first): after a round or
    two the channel waits for the late ones, so every message carries all of them. A session
    whose rhythm is far off is not waited for, and the wait is bounded."""
    monkeypatch.setattr(group, "MAX_LINGER_S", 0.02)

    async def go(late: float):
        node = EchoNode()
        channel = GroupChannel(node, "peer", timeout=5)
        sessions = [_session(channel, "session-early", 6, 0, 0.05), _session(channel, "session-late0", 6, late, 0.05 - late)]
        loop = asyncio.get_running_loop()
        began = loop.time()
        await asyncio.gather(*sessions)
        return node.log, channel.lingered_s, loop.time() - began

    log, lingered, wall = asyncio.run(go(late=0.008))
    assert [len(m) for m in log[:4]] == [1, 1, 1, 1]  # rhythms not known yet (two steps each): no waits
    assert [len(m) for m in log[4:]] == [2, 2, 2, 2], log  # then the late one is waited for
    assert lingered < 0.02 * len(log)
    log, lingered, wall = asyncio.run(go(late=0.03))  # later than the longest wait: not waited past it
    assert lingered <= 0.021 * len(log) + 0.01 and wall < 1.0


def test_a_session_that_stopped_stepping_is_not_waited_for(monkeypatch):
    """A member idle between turns (its session open, its user typing) must not hold back the
    steps of a session still generating."""
    monkeypatch.setattr(group, "MAX_LINGER_S", 0.05)

    async def go():
        channel = GroupChannel(EchoNode(), "peer", timeout=5)
        await asyncio.gather(_session(channel, "session-idle1", 3, 0, 0.04), _session(channel, "session-busy1", 3, 0, 0.04))
        await _session(channel, "session-busy1", 2, 0, 0.04)  # the other one has stopped: waited for once
        before = channel.lingered_s
        await _session(channel, "session-busy1", 5, 0, 0.04)  # over 1.5 periods since its last step
        return channel.lingered_s - before

    assert asyncio.run(go()) < 0.002


def test_refused_entries_and_lost_connections_fail_only_what_they_concern():
    async def go():
        node = EchoNode()
        channel = GroupChannel(node, "peer", timeout=5)
        good = channel.step("good-session", 0, 0, _wire(1))
        bad = channel.step("bad-session", 0, 0, _wire(1))
        answers = await asyncio.gather(good, bad)
        node.fail = True
        lost = GroupChannel(EchoNode(fail=True), "gone-peer", timeout=5)
        failures = await asyncio.gather(lost.step("session-a01", 0, 0, _wire(1)),
                                        lost.step("session-b01", 0, 0, _wire(1)), return_exceptions=True)
        return answers, failures

    answers, failures = asyncio.run(go())
    assert answers[0].meta["ok"] is True and float(answers[0].tensors[0][0, 0, 0]) == 2.0
    assert answers[1].meta == {"ok": False, "error": "unknown session bad-session"} and answers[1].tensors == []
    assert all(isinstance(f, GroupFailed) and f.peer_id == "gone-peer" for f in failures)
    assert "connection lost: ConnectionError: peer went away" in str(failures[0])


def test_a_malformed_group_answer_fails_the_whole_message():
    channel = GroupChannel(EchoNode(), "peer", timeout=5)
    two = Message(meta={"ok": True, "results": [{"ok": True, "step": 0}]}, tensors=[torch.zeros(1)], codecs=["none"])
    with pytest.raises(GroupFailed, match="group of 2 steps with 1 results"):
        channel._split(two, 2)
    with pytest.raises(GroupFailed, match="malformed GroupReply"):
        channel._split(Message(meta={"ok": "maybe", "extra": 1}), 1)
    with pytest.raises(GroupFailed, match="server busy"):
        channel._split(Message(meta={"ok": False, "error": "server busy"}), 1)


def test_only_servers_announcing_group_steps_get_a_channel():
    """A server of an older version (no ``group_steps`` in its record) keeps every session on its
    own stream: a group stream to it would fail, and that must not look like a dead server."""
    from swarmshard.client.group import StepGroups
    from swarmshard.transport.schemas import ServerRecord

    def record(peer: str, **extra) -> ServerRecord:
        return ServerRecord(peer_id=peer, model_id="m", start=0, end=2, n_blocks=2, block_digests=["a", "b"],
                            throughput=1.0, cache_tokens_left=1, cache_tokens_total=1, **extra)

    groups = StepGroups(EchoNode(), timeout=5)
    groups.note([record("new-server", group_steps=True), record("old-server")])
    assert groups.supported == {"new-server"}
    groups.note([record("new-server")])  # it was replaced by an older version: no longer
    assert groups.supported == set()
