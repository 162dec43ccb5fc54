"""Greedy decoding speed: local (one process, transformers) vs swarms of 1, 2 and 3 server processes.

Prints one JSON object per line; all setups run in the same invocation, and every swarm run is
paired with a local run just before it, so each ratio sees the same machine load. Values are
medians over ``--repeats`` pairs; ``ratio_vs_local`` is the median of the per-pair ratios.

    python bench/generate.py [--model smollm2-135m] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# swarmshard before torch: its process settings (OpenMP spin, see swarmshard/__init__.py) then hold
# for this whole process, i.e. for the client and the local baseline alike.
import swarmshard  # noqa: E402, F401
import torch  # noqa: E402
from transformers.utils import logging  # noqa: E402

from swarmshard.client.model import DistributedModelForCausalLM  # noqa: E402
from swarmshard.core.store import ModelStore  # noqa: E402
from swarmshard.demo import TimingStreamer, local_generate, wait_for_route  # noqa: E402
from swarmshard.launch import LocalSwarm, even_spans  # noqa: E402

PROMPT = "The history of the Roman Empire begins"


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--servers", default="1,2,3", help="comma-separated swarm sizes")
    args = parser.parse_args()
    logging.set_verbosity_error()

    store = ModelStore()
    manifest = store.resolve(args.model, progress=False)
    tokenizer = store.load_tokenizer(manifest)
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])

    full = store.load_full_model(manifest)
    reference, _ = local_generate(full, ids, args.new_tokens)  # warm-up, and the tokens to match
    reference = reference.tolist()
    local_runs: list[float] = []
    for n_servers in [int(x) for x in args.servers.split(",")]:
        spans = even_spans(manifest.n_blocks, n_servers)
        with LocalSwarm(args.model, spans) as swarm:
            client = DistributedModelForCausalLM.from_pretrained(args.model, initial_peers=swarm.initial_peers)
            try:
                wait_for_route(client)
                client.generate(ids, max_new_tokens=4)  # warm-up
                speeds, ratios, identical = [], [], True
                for _ in range(args.repeats):
                    # local and swarm back to back, so each ratio sees the same machine load
                    _, local_speed = local_generate(full, ids, args.new_tokens)
                    streamer = TimingStreamer()
                    out = client.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, streamer=streamer)
                    identical &= out[0, ids.shape[1]:].tolist() == reference
                    local_runs.append(local_speed)
                    speeds.append(streamer.decode_tokens_per_s)
                    ratios.append(streamer.decode_tokens_per_s / local_speed)
            finally:
                client.close()
        swarm_speed, local = statistics.median(speeds), statistics.median(local_runs[-args.repeats:])
        setup = f"swarm-{n_servers}"
        emit(name="decode_tokens_per_s", setup=setup, value=round(swarm_speed, 2), unit="tok/s",
             ratio_vs_local=round(statistics.median(ratios), 3), identical=identical,
             runs=[round(x, 2) for x in speeds], local_runs=[round(x, 2) for x in local_runs[-args.repeats:]])
        overhead_ms = (1 / swarm_speed - 1 / local) * 1000 / n_servers
        emit(name="per_hop_overhead_ms", setup=setup, value=round(overhead_ms, 3), unit="ms/token",
             hops=n_servers)
    emit(name="decode_tokens_per_s", setup="local", value=round(statistics.median(local_runs), 2), unit="tok/s",
         new_tokens=len(reference), runs=[round(x, 2) for x in local_runs])
    return 0


if __name__ == "__main__":
    sys.exit(main())
