"""`swarmshard demo`: a private swarm on this machine, one chat reply through it, compared to local."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

import torch

from swarmshard.client.model import DistributedModelForCausalLM
from swarmshard.core.routing import NoRoute
from swarmshard.core.store import ModelStore
from swarmshard.launch import LocalSwarm, even_spans

DEMO_PROMPT = "Explain in two sentences why the sky is blue."


@dataclass
class TimingStreamer:
    """A transformers-compatible streamer that records when each new token arrived."""

    on_token: object = None
    times: list[float] = field(default_factory=list)
    _prompt_seen: bool = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        if self.on_token is not None:
            self.on_token(value)

    def end(self) -> None:
        pass

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over the time between the first and the last (prefill excluded)."""
        if len(self.times) < 2:
            return 0.0
        return (len(self.times) - 1) / max(self.times[-1] - self.times[0], 1e-9)


def chat_input_ids(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids of ``prompt`` as a user chat turn when the tokenizer has a chat template."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
        )
        ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return ids.long()


def wait_for_route(model: DistributedModelForCausalLM, timeout: float = 60.0) -> list:
    """Poll the DHT until servers cover every block (announcements take a moment to spread)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return model.plan_route()
        except NoRoute:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@torch.inference_mode()
def local_generate(full_model, input_ids: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy generation in one process with transformers; returns (new tokens, decode tok/s)."""
    streamer = TimingStreamer()
    out = full_model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
        do_sample=False, streamer=streamer,
    )
    return out[0, input_ids.shape[1]:], streamer.decode_tokens_per_s


def run_demo(
    model: str = "smollm2-135m",
    servers: int = 3,
    prompt: str = DEMO_PROMPT,
    max_new_tokens: int = 64,
    home: str | None = None,
    on_event=None,
    wire_codec: str = "none",
    quant: str = "none",
    replicas: int = 1,
    kill_after: int | None = None,
) -> dict:
    """Start the swarm, generate through it, compare with local, stop everything; returns the report.

    ``wire_codec`` (the client's activation codec) and ``quant`` (the servers' weights) are lossy
    when not "none": the reply may then differ from the local float32 one.
    """
    emit = on_event or (lambda kind, payload: None)
    store = ModelStore(home)
    manifest = store.resolve(model)
    spans = even_spans(manifest.n_blocks, servers) * replicas
    emit("starting", {"spans": spans})
    with LocalSwarm(model, spans, home=home, server_args=["--quant", quant]) as swarm:
        emit("swarm", {"servers": [(s.info.get("start"), s.info.get("end"), s.peer_id) for s in swarm.servers]})
        client = DistributedModelForCausalLM.from_pretrained(model, initial_peers=swarm.initial_peers, home=home,
                                                             wire_codec=wire_codec)
        try:
            wait_for_route(client)
            input_ids = chat_input_ids(client.tokenizer, prompt)
            killer = TokenKiller(swarm, kill_after)
            streamer = TimingStreamer(on_token=lambda t: (emit("token", client.tokenizer.decode(t[0])), killer.tick()))
            with client.inference_session(max_length=input_ids.shape[1] + max_new_tokens) as session:
                killer.session = session
                out = client.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
            swarm_tokens = out[0, input_ids.shape[1]:]
            swarm_speed = streamer.decode_tokens_per_s
            route = client.last_route
        finally:
            client.close()
    emit("reference", {})
    full = store.load_full_model(manifest)
    reference_tokens, reference_speed = local_generate(full, input_ids, max_new_tokens)
    tokenizer = store.load_tokenizer(manifest)
    return {
        "model": manifest.model_id,
        "prompt": prompt,
        "text": tokenizer.decode(swarm_tokens, skip_special_tokens=True),
        "reference_text": tokenizer.decode(reference_tokens, skip_special_tokens=True),
        "identical": swarm_tokens.tolist() == reference_tokens.tolist(),
        "route": [{"peer": hop.peer_id, "start": hop.start, "end": hop.end} for hop in route],
        "new_tokens": int(swarm_tokens.numel()),
        "tokens_per_s": round(swarm_speed, 2),
        "reference_tokens_per_s": round(reference_speed, 2),
        "wire_codec": wire_codec,
        "quant": quant,
        **killer.report(streamer.times),
    }


class TokenKiller:
    """Kills the server of the route's middle hop after ``after`` tokens (the machine dies: SIGKILL)."""

    def __init__(self, swarm: LocalSwarm, after: int | None) -> None:
        self.swarm = swarm
        self.after = after
        self.session = None
        self.tokens = 0
        self.killed: str | None = None
        self.killed_at: float | None = None

    def tick(self) -> None:
        self.tokens += 1
        if self.after is None or self.killed or self.tokens != self.after or self.session is None:
            return
        route = self.session.route
        victim = route[len(route) // 2].peer_id
        node = next(n for n in self.swarm.servers if n.peer_id == victim)
        os.killpg(node.pid, signal.SIGKILL)
        node.popen.wait(timeout=10)
        self.killed, self.killed_at = victim, time.perf_counter()

    def report(self, token_times: list[float]) -> dict:
        if self.after is None:
            return {}
        after_kill = [t for t in token_times if self.killed_at is not None and t > self.killed_at]
        recovery = after_kill[0] - self.killed_at if after_kill else None
        return {"killed": self.killed, "recovery_s": None if recovery is None else round(recovery, 3)}
