"""Many sessions on one swarm: aggregate decode throughput, server memory over 500 sessions, failover.

Prints JSON lines, all from one run on one swarm (3 spans × 2 replicas of the default model):
  {"name": "aggregate_tokens_per_s", "sessions": 1|4|16, "value": ..., "unit": "tok/s", ...}
  {"name": "server_rss_mb", "sessions_opened": 0|250|500, "value": ..., ...}
  {"name": "recovery_s", "value": ..., "unit": "s", ...}   (a serving process SIGKILLed mid-generation)

    python bench/concurrency.py [--new-tokens 32] [--repeats 3] [--server-threads 1]

Every repeat runs 1, 4 and 16 sessions back to back; ``value`` is the median over repeats and
``ratio_vs_1`` the median of the repeats' ratios to one session (machine noise hits both sides).

The six servers share this machine's cores and, with many sessions, compute at the same time; by
default each runs with ``--threads 1`` (README: servers sharing a machine). ``--server-threads 0``
leaves torch's default (all cores per server). Every line carries ``server_threads``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import swarmshard  # noqa: E402, F401  (before torch: its OpenMP settings, see swarmshard/__init__.py)
import psutil  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging  # noqa: E402

from swarmshard.client.model import DistributedModelForCausalLM  # noqa: E402
from swarmshard.core.store import ModelStore  # noqa: E402
from swarmshard.demo import TimingStreamer, TokenKiller, wait_for_route  # noqa: E402
from swarmshard.launch import LocalSwarm, even_spans  # noqa: E402

TOPICS = ["rivers", "volcanoes", "bees", "the moon", "bread", "trains", "music", "chess", "rain", "castles",
          "whales", "glass", "maps", "salt", "kites", "clocks"]


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def aggregate(client, prompts: list[torch.Tensor], new_tokens: int) -> tuple[float, int]:
    """All prompts at once, one thread (one session) each: total new tokens over wall time."""
    def one(ids):
        out = client.generate(ids, max_new_tokens=new_tokens, eos_token_id=[])
        return out.shape[1] - ids.shape[1]

    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        produced = sum(pool.map(one, prompts))
    return produced / (time.perf_counter() - began), produced


def rss_mb(pids: list[int]) -> float:
    return sum(psutil.Process(p).memory_info().rss for p in pids) / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sessions", default="1,4,16")
    parser.add_argument("--churn", type=int, default=500, help="sessions opened and closed for the RSS check")
    parser.add_argument("--server-threads", type=int, default=1, help="serve --threads for every server (0: default)")
    args = parser.parse_args()
    logging.set_verbosity_error()

    manifest = ModelStore().resolve(args.model, progress=False)
    spans = even_spans(manifest.n_blocks, 3)
    threads = ["--threads", str(args.server_threads)] if args.server_threads > 0 else []
    with LocalSwarm(args.model, spans * 2, cache_tokens=65536, server_args=threads) as swarm:
        client = DistributedModelForCausalLM.from_pretrained(args.model, initial_peers=swarm.initial_peers)
        try:
            wait_for_route(client)
            tok = client.tokenizer
            prompts = [torch.tensor([tok(f"Here is a long story about {t}:")["input_ids"]]) for t in TOPICS]
            counts = [int(x) for x in args.sessions.split(",")]
            for n in counts:  # warm-up: every session count once
                aggregate(client, prompts[:n], args.new_tokens)
            # Rounds over all session counts, interleaved, so each round's ratios see one machine
            # load; ratio_vs_1 is the median of the per-round ratios (as bench/generate.py pairs runs).
            runs: dict[int, list[float]] = {n: [] for n in counts}
            for _ in range(args.repeats):
                for n in counts:
                    runs[n].append(aggregate(client, prompts[:n], args.new_tokens)[0])
            base = runs[counts[0]]
            for n in counts:
                ratios = [r / b for r, b in zip(runs[n], base)]
                emit(name="aggregate_tokens_per_s", sessions=n, value=round(statistics.median(runs[n]), 2),
                     unit="tok/s", ratio_vs_1=round(statistics.median(ratios), 2),
                     runs=[round(r, 2) for r in runs[n]], ratios=[round(r, 2) for r in ratios],
                     server_threads=args.server_threads or torch.get_num_threads())

            route_pids = [n.pid for n in swarm.servers if n.peer_id in {h.peer_id for h in client.last_route}]
            ids = prompts[0][:, :8]
            emit(name="server_rss_mb", sessions_opened=0, value=round(rss_mb(route_pids), 1), unit="MiB")
            for opened in range(1, args.churn + 1):
                session = client.open_session(max_length=64)
                try:
                    session.step(client.client.embed(ids, torch.arange(8).unsqueeze(0)))
                finally:
                    session.close()
                if opened % (args.churn // 2) == 0:
                    emit(name="server_rss_mb", sessions_opened=opened, value=round(rss_mb(route_pids), 1),
                         unit="MiB")

            killer = TokenKiller(swarm, after=8)
            streamer = TimingStreamer(on_token=lambda t: killer.tick())
            with client.inference_session(max_length=prompts[1].shape[1] + args.new_tokens) as session:
                killer.session = session
                client.generate(prompts[1], max_new_tokens=args.new_tokens, eos_token_id=[], streamer=streamer)
                failovers = session.remote.failovers
            report = killer.report(streamer.times)
            gaps = [b - a for a, b in zip(streamer.times, streamer.times[1:])]
            emit(name="recovery_s", value=report["recovery_s"], unit="s", killed=report["killed"],
                 median_token_gap_s=round(statistics.median(gaps), 4),
                 replayed_steps=[f.replayed_steps for f in failovers])
        finally:
            client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
