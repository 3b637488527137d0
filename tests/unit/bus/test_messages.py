from __future__ import annotations

import json

import pytest

from blink.bus import messages as m


@pytest.mark.parametrize(
    "msg",
    [
        m.GenerateRequest(
            "r",
            "model",
            m.Sampling(max_tokens=5, stop=("x",)),
            messages=({"role": "user", "content": "hi"},),
            traceparent="00-abc-def-01",
        ),
        m.GenerateRequest("r", "model", m.Sampling(), prompt="hi", tenant="acme", priority=1, prefill_only=True),
        m.Cancel("r", "model"),
        m.Accepted("r", "rep", 12),
        m.TokenEvent("r", 3, "héllo", 4),
        m.Finished("r", m.FinishStatus.ERROR, 1, 2, {"queue_ms": 1.5}, "context_length_exceeded", "too long"),
        m.ReplicaStatus("rep", "model", m.ReplicaState.READY, 1, 2, 2048),
    ],
)
def test_messages_survive_json(msg: m.Message) -> None:
    assert m.from_dict(json.loads(json.dumps(m.to_dict(msg)))) == msg


def test_unknown_kind_and_newer_version_are_rejected() -> None:
    with pytest.raises(ValueError):
        m.from_dict({"kind": "nope"})
    raw = m.to_dict(m.Cancel("r", "model"))
    raw["v"] = m.VERSION + 1
    with pytest.raises(ValueError):
        m.from_dict(raw)


def test_a_request_from_an_older_gateway_has_no_tenant() -> None:
    raw = m.to_dict(m.GenerateRequest("r", "model", m.Sampling(), prompt="hi"))
    del raw["tenant"]
    msg = m.from_dict(raw)
    assert isinstance(msg, m.GenerateRequest) and msg.tenant is None
