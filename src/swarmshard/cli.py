"""Command-line interface: serve, bootstrap, generate, chat, status, demo."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help="swarmshard: run LLMs on a swarm of machines.")
err = Console(stderr=True)

PEERS_HELP = "Multiaddress of a swarm peer to join through (repeatable), as printed by `serve` or `bootstrap`."


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@app.command()
def serve(
    model: str = typer.Option("smollm2-135m", help="Model name or local path (transformers dir or .gguf)."),
    blocks: str = typer.Option(..., help="Span of blocks to serve, START:END (END exclusive), e.g. 10:20."),
    initial_peers: list[str] = typer.Option([], "--initial-peers", help=PEERS_HELP),
    new_swarm: bool = typer.Option(False, "--new-swarm", help="Start a new swarm (no initial peers)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(0, help="TCP port to listen on (0: any free port)."),
    cache_tokens: int = typer.Option(16384, help="KV-cache budget in tokens across all sessions."),
    announce_period: float = typer.Option(10.0, help="Seconds between DHT announcements."),
    idle_timeout: float = typer.Option(600.0, help="Free a session's cache after this many idle seconds."),
    home: Optional[str] = typer.Option(None, help="Model store directory (default $SWARMSHARD_HOME or ~/.cache/swarmshard)."),
    json_events: bool = typer.Option(False, "--json-events", help="Print machine-readable JSON events."),
) -> None:
    """Serve a contiguous span of a model's blocks until SIGINT/SIGTERM."""
    from swarmshard.core.shard import parse_span
    from swarmshard.core.store import ModelStore
    from swarmshard.server.node import ServerSettings, serve as run

    _quiet_transformers()
    if not initial_peers and not new_swarm:
        raise typer.BadParameter("give --initial-peers ADDR (join a swarm) or --new-swarm", param_hint="--initial-peers")
    try:
        manifest = ModelStore(home).resolve(model, progress=not json_events)
        start, end = parse_span(blocks, manifest.n_blocks)
    except (ValueError, FileNotFoundError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    settings = ServerSettings(
        model=model, start=start, end=end, initial_peers=list(initial_peers), host=host, port=port,
        cache_tokens=cache_tokens, announce_period=announce_period, record_ttl=3 * announce_period,
        idle_timeout=idle_timeout, home=home,
    )
    run(settings, json_events=json_events)


@app.command()
def bootstrap(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(0, help="TCP port (0: any free port)."),
    json_events: bool = typer.Option(False, "--json-events", help="Print machine-readable JSON events."),
) -> None:
    """Run a DHT-only peer that others join through (serves no model)."""
    from swarmshard.server.node import run_bootstrap

    run_bootstrap(host, port, json_events)


def _open_client(model: str, initial_peers: list[str], home: Optional[str]):
    from swarmshard.client.model import DistributedModelForCausalLM

    if not initial_peers:
        raise typer.BadParameter("give at least one --initial-peers ADDR", param_hint="--initial-peers")
    _quiet_transformers()
    return DistributedModelForCausalLM.from_pretrained(model, initial_peers=initial_peers, home=home)


@app.command()
def generate(
    prompt: str = typer.Option(..., help="The prompt (sent as a chat turn when the model has a chat template)."),
    model: str = typer.Option("smollm2-135m", help="Model name or local path."),
    initial_peers: list[str] = typer.Option([], "--initial-peers", help=PEERS_HELP),
    max_new_tokens: int = typer.Option(64, help="How many tokens to generate at most."),
    temperature: float = typer.Option(0.0, help="0 for greedy decoding, > 0 to sample."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling."),
    raw: bool = typer.Option(False, "--raw", help="Do not apply the chat template."),
    home: Optional[str] = typer.Option(None, help="Model store directory."),
) -> None:
    """Generate a reply through the swarm, streaming tokens."""
    import torch

    from swarmshard.demo import TimingStreamer, chat_input_ids, wait_for_route

    client = _open_client(model, initial_peers, home)
    try:
        wait_for_route(client, timeout=30)
        tok = client.tokenizer
        ids = tok(prompt, return_tensors="pt")["input_ids"] if raw else chat_input_ids(tok, prompt)
        if seed is not None:
            torch.manual_seed(seed)
        streamer = TimingStreamer(on_token=lambda t: print(tok.decode(t[0]), end="", flush=True))
        client.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None, top_p=top_p, streamer=streamer,
        )
        print()
        route = " → ".join(f"{h.peer_id[:10]}…[{h.start}:{h.end}]" for h in client.last_route)
        err.print(f"route: {route}\n{len(streamer.times)} tokens, {streamer.decode_tokens_per_s:.1f} tok/s")
    finally:
        client.close()


@app.command()
def chat(
    model: str = typer.Option("smollm2-135m", help="Model name or local path."),
    initial_peers: list[str] = typer.Option([], "--initial-peers", help=PEERS_HELP),
    max_new_tokens: int = typer.Option(256, help="Tokens per reply at most."),
    max_length: int = typer.Option(2048, help="Session length (prompt + replies) kept on the servers."),
    temperature: float = typer.Option(0.0, help="0 for greedy decoding."),
    home: Optional[str] = typer.Option(None, help="Model store directory."),
) -> None:
    """Interactive chat through the swarm; the servers keep the conversation's KV cache."""
    import torch

    from swarmshard.demo import TimingStreamer, wait_for_route

    client = _open_client(model, initial_peers, home)
    tok = client.tokenizer
    messages: list[dict] = []
    try:
        wait_for_route(client, timeout=30)
        with client.inference_session(max_length=max_length) as session:
            sent: list[int] = []  # tokens the session holds (plus its pending token)
            while True:
                try:
                    user = input("you> ").strip()
                except EOFError:
                    break
                if user in {"", "/quit", "/exit"}:
                    break
                messages.append({"role": "user", "content": user})
                ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
                if ids[: len(sent)] != sent:
                    raise typer.BadParameter("the chat template rewrote earlier turns; restart the chat")
                new = ids[len(sent):]
                if session.pending is not None:
                    new = new[1:]  # the pending token is the first of the new suffix
                print("bot> ", end="", flush=True)
                streamer = TimingStreamer(on_token=lambda t: print(tok.decode(t[0]), end="", flush=True))
                out = client.generate(
                    torch.tensor([new]), max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else None, streamer=streamer,
                )
                reply = out[0, len(new):].tolist()
                print()
                sent = ids + reply
                messages.append({"role": "assistant", "content": tok.decode(reply, skip_special_tokens=True)})
    finally:
        client.close()


@app.command()
def status(
    model: str = typer.Option("smollm2-135m", help="Model name or local path."),
    initial_peers: list[str] = typer.Option([], "--initial-peers", help=PEERS_HELP),
    home: Optional[str] = typer.Option(None, help="Model store directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Peers serving a model: spans, throughput, cache left, and which blocks are covered."""
    from swarmshard.aio import LoopThread
    from swarmshard.core.routing import missing_blocks
    from swarmshard.core.store import ModelStore
    from swarmshard.transport.p2p import SwarmNode

    if not initial_peers:
        raise typer.BadParameter("give at least one --initial-peers ADDR", param_hint="--initial-peers")
    store = ModelStore(home)
    model_id = store.model_id_for(model)
    loop = LoopThread()

    async def look():
        node = await SwarmNode.create(initial_peers=initial_peers, client_mode=True)
        try:
            return await node.fetch(model_id)
        finally:
            await node.shutdown()

    try:
        records = loop.run(look(), timeout=60)
    finally:
        loop.stop()
    n_blocks = records[0].n_blocks if records else 0
    try:
        n_blocks = store.resolve(model, progress=False).n_blocks
    except (FileNotFoundError, ValueError):
        pass
    gaps = missing_blocks([r for r in records], n_blocks) if n_blocks else []
    if as_json:
        print(json.dumps({"model": model_id, "n_blocks": n_blocks, "covered": bool(records) and not gaps,
                          "missing": gaps, "servers": [r.model_dump() for r in records]}))
        return
    table = Table(title=f"{model_id}: {len(records)} server(s)")
    for column in ("peer", "blocks", "tok/s", "cache left", "version"):
        table.add_column(column)
    for r in sorted(records, key=lambda r: (r.start, r.end)):
        table.add_row(r.peer_id, f"{r.start}:{r.end}", f"{r.throughput:.1f}",
                      f"{r.cache_tokens_left}/{r.cache_tokens_total}", r.version)
    Console().print(table)
    if not records:
        Console().print("[red]no servers found[/red]")
    elif gaps:
        Console().print(f"[red]blocks not covered:[/red] {gaps}")
    else:
        Console().print(f"[green]all {n_blocks} blocks covered[/green]")


@app.command()
def demo(
    model: str = typer.Option("smollm2-135m", help="Model name or local path."),
    servers: int = typer.Option(3, help="How many server processes to start."),
    prompt: str = typer.Option("Explain in two sentences why the sky is blue.", help="Chat prompt."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate."),
    home: Optional[str] = typer.Option(None, help="Model store directory."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a report."),
) -> None:
    """Start a private swarm here, chat through it, compare with local generation, stop it."""
    from swarmshard.demo import run_demo

    _quiet_transformers()
    console = Console()

    def on_event(kind: str, payload) -> None:
        if as_json:
            return
        if kind == "starting":
            console.print(f"starting a bootstrap peer and {len(payload['spans'])} servers: {payload['spans']}")
        elif kind == "swarm":
            console.print("swarm ready; reply:")
        elif kind == "token":
            print(payload, end="", flush=True)
        elif kind == "reference":
            print()
            console.print("swarm stopped; computing the same reply locally in one process…")

    report = run_demo(model, servers, prompt, max_new_tokens, home, on_event)
    if as_json:
        print(json.dumps(report))
        return
    table = Table(title="route")
    table.add_column("peer")
    table.add_column("blocks")
    for hop in report["route"]:
        table.add_row(hop["peer"], f"{hop['start']}:{hop['end']}")
    console.print(table)
    console.print(f"swarm: {report['new_tokens']} tokens, {report['tokens_per_s']} tok/s")
    console.print(f"local: {report['reference_tokens_per_s']} tok/s; reply: {report['reference_text']!r}")
    console.print("[green]identical to local greedy output[/green]" if report["identical"]
                  else "[red]differs from local greedy output[/red]")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
