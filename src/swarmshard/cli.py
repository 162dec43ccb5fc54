"""Command-line interface: serve, bootstrap, generate, chat, status, demo."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help="swarmshard: run LLMs on a swarm of machines.")
err = Console(stderr=True)

GRAPH_HELP = "Graph factory MODULE:FUNCTION returning (model, args[, kwargs]), e.g. swarmshard.examples.graphs:unet."
PEERS_HELP = "Multiaddress of a swarm peer to join through (repeatable), as printed by `serve` or `bootstrap`."
CODEC_HELP = ("Activation codec of the hidden states sent and asked back: none, fp16, blockwise8 or blockwise4 "
              "(lossy, 0.27x / 0.14x of float32); servers must accept it.")
SERVE_CODEC_HELP = ("Activation codec: none, fp16, blockwise8 or blockwise4. Replies use it unless a client asks "
                    "for another; requests may use it or any smaller codec (none accepts all).")
QUANT_HELP = "Weights of the served span: none (as stored, float32) or int8 (LLM.int8() with outlier features)."


def _wire_codec(value: str) -> str:
    from swarmshard.transport.codecs import check_codec

    try:
        return check_codec(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--wire-codec") from None


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@app.command()
def serve(
    model: str = typer.Option("smollm2-135m", help="Model name or local path (transformers dir or .gguf)."),
    blocks: Optional[str] = typer.Option(None, help="Span of blocks to serve, START:END (END exclusive), e.g. 10:20, "
                                         "or auto: size it from memory and place it where the swarm is weakest."),
    initial_peers: list[str] = typer.Option([], "--initial-peers", help=PEERS_HELP),
    new_swarm: bool = typer.Option(False, "--new-swarm", help="Start a new swarm (no initial peers)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(0, help="TCP port to listen on (0: any free port)."),
    cache_tokens: int = typer.Option(16384, help="KV-cache budget in tokens across all sessions."),
    announce_period: float = typer.Option(10.0, help="Seconds between DHT announcements."),
    idle_timeout: float = typer.Option(600.0, help="Free a session's cache after this many idle seconds."),
    home: Optional[str] = typer.Option(None, help="Model store directory (default $SWARMSHARD_HOME or ~/.cache/swarmshard)."),
    json_events: bool = typer.Option(False, "--json-events", help="Print machine-readable JSON events."),
    graph: Optional[str] = typer.Option(None, help=GRAPH_HELP + " Serve a stage of it instead of a span of blocks."),
    plan: Optional[str] = typer.Option(None, help="Plan file written by `swarmshard plan` (with --graph)."),
    stage: Optional[int] = typer.Option(None, help="Index of the plan's stage to serve (with --graph)."),
    quant: str = typer.Option("none", help=QUANT_HELP),
    wire_codec: str = typer.Option("none", "--wire-codec", help=SERVE_CODEC_HELP),
    memory_gb: Optional[float] = typer.Option(None, "--memory-gb", help="GB (1e9 bytes) for weights + KV cache "
                                              "(--blocks auto sizes its span with it; default: 80% of available)."),
    block_speed: Optional[float] = typer.Option(None, "--block-speed", help="Declared decode tokens/s through one "
                                                "block, announced instead of the measured speed."),
    rebalance_period: Optional[float] = typer.Option(None, "--rebalance-period", help="With --blocks auto: mean "
                                                     "seconds between move checks (default 120; 0: never move)."),
    move_threshold: float = typer.Option(1.15, "--move-threshold", help="With --blocks auto: move only if the "
                                         "swarm's bottleneck grows by more than this factor."),
    rtt_period: float = typer.Option(60.0, "--rtt-period", help="Seconds between pings of the other servers "
                                     "(round trips are announced; 0: never)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for this server's compute "
                                          "(default: all cores; lower it when servers on one machine compute "
                                          "at the same time)."),
    machine: Optional[str] = typer.Option(None, "--machine", help="Machine identity announced for routing: "
                                          "clients treat servers announcing the same one as sharing its cores "
                                          "(default: a fingerprint of this machine)."),
) -> None:
    """Serve a contiguous span of a model's blocks (or one stage of a graph plan) until SIGINT/SIGTERM."""
    from swarmshard.core.shard import parse_span
    from swarmshard.core.store import ModelStore
    from swarmshard.server.node import ServerSettings, serve as run
    from swarmshard.server.quant import check_quant
    from swarmshard.transport.codecs import check_codec

    _quiet_transformers()
    if not initial_peers and not new_swarm:
        raise typer.BadParameter("give --initial-peers ADDR (join a swarm) or --new-swarm", param_hint="--initial-peers")
    if threads is not None:
        if threads < 1:
            raise typer.BadParameter(f"must be at least 1, got {threads}", param_hint="--threads")
        import torch

        torch.set_num_threads(threads)
    if graph is not None and (quant != "none" or wire_codec != "none"):
        raise typer.BadParameter("--quant and --wire-codec apply to spans of blocks, not to graph stages",
                                 param_hint="--graph")
    if graph is not None:  # the stateless kind of shard: a stage of a sliced graph
        _serve_graph_stage(graph, plan, stage, blocks, ServerSettings(
            model=graph, start=stage or 0, end=(stage or 0) + 1, initial_peers=list(initial_peers), host=host,
            port=port, announce_period=announce_period, record_ttl=3 * announce_period, graph=graph, plan=plan,
            stage=stage,
        ), run, json_events)
        return
    if blocks is None:
        raise typer.BadParameter("give --blocks START:END or --blocks auto (or --graph/--plan/--stage for a graph "
                                 "stage)", param_hint="--blocks")
    auto = blocks.strip().lower() == "auto"
    if not auto and rebalance_period is not None:
        raise typer.BadParameter("only a --blocks auto server rebalances", param_hint="--rebalance-period")
    try:
        check_quant(quant)
        check_codec(wire_codec)
        _check_positive(block_speed=block_speed, move_threshold=move_threshold)
        if move_threshold < 1.0:
            raise ValueError(f"--move-threshold must be >= 1 (a move must raise the bottleneck), got {move_threshold}")
        if (rebalance_period or 0) < 0 or rtt_period < 0:
            raise ValueError("--rebalance-period and --rtt-period must be >= 0 (0 turns them off)")
        manifest = ModelStore(home).resolve(model, progress=not json_events)
        start, end = (0, manifest.n_blocks) if auto else parse_span(blocks, manifest.n_blocks)
        if auto:
            _check_auto_memory(manifest, memory_gb, cache_tokens, quant, wire_codec)
    except (ValueError, FileNotFoundError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    settings = ServerSettings(
        model=model, start=start, end=end, initial_peers=list(initial_peers), host=host, port=port,
        cache_tokens=cache_tokens, announce_period=announce_period, record_ttl=3 * announce_period,
        idle_timeout=idle_timeout, home=home, quant=quant, wire_codec=wire_codec, auto=auto, memory_gb=memory_gb,
        block_speed=block_speed, rebalance_period=120.0 if rebalance_period is None else rebalance_period,
        move_threshold=move_threshold, rtt_period=rtt_period, machine=machine,
    )
    run(settings, json_events=json_events)


def _check_positive(**values: Optional[float]) -> None:
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _check_auto_memory(manifest, memory_gb: Optional[float], cache_tokens: int, quant: str, wire_codec: str) -> None:
    """Refuse (before joining anything) a --blocks auto server whose memory holds no block."""
    from swarmshard.server import autoplace
    from swarmshard.server.node import memory_budget

    spec = autoplace.model_spec(manifest, cache_tokens, wire_codec)
    profile = autoplace.node_profile("this-node", 1.0, memory_budget(memory_gb), manifest, quant)
    autoplace.max_blocks(profile, spec)


def _serve_graph_stage(graph: str, plan: Optional[str], stage: Optional[int], blocks: Optional[str],
                      settings, run, json_events: bool) -> None:
    from rich.markup import escape

    from swarmshard.core.factory import FactoryError
    from swarmshard.core.graph import TraceError
    from swarmshard.core.graph_plan import PlanFileError, PlanMismatch

    if plan is None or stage is None:
        raise typer.BadParameter("--graph needs --plan PLAN.json and --stage I", param_hint="--graph")
    if blocks is not None:
        raise typer.BadParameter("--blocks selects transformer blocks; a graph stage is chosen with --stage",
                                 param_hint="--blocks")
    try:
        run(settings, json_events=json_events)
    except (FactoryError, TraceError, PlanFileError, PlanMismatch) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2)


@app.command()
def bootstrap(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(0, help="TCP port (0: any free port)."),
    json_events: bool = typer.Option(False, "--json-events", help="Print machine-readable JSON events."),
) -> None:
    """Run a DHT-only peer that others join through (serves no model)."""
    from swarmshard.server.node import run_bootstrap

    run_bootstrap(host, port, json_events)


def _open_client(model: str, initial_peers: list[str], home: Optional[str], wire_codec: str = "none"):
    from swarmshard.client.model import DistributedModelForCausalLM

    if not initial_peers:
        raise typer.BadParameter("give at least one --initial-peers ADDR", param_hint="--initial-peers")
    _quiet_transformers()
    return DistributedModelForCausalLM.from_pretrained(model, initial_peers=initial_peers, home=home,
                                                       wire_codec=_wire_codec(wire_codec))


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
    wire_codec: str = typer.Option("none", "--wire-codec", help=CODEC_HELP),
) -> None:
    """Generate a reply through the swarm, streaming tokens."""
    import torch

    from swarmshard.demo import TimingStreamer, chat_input_ids, wait_for_route

    client = _open_client(model, initial_peers, home, wire_codec)
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
    wire_codec: str = typer.Option("none", "--wire-codec", help=CODEC_HELP),
) -> None:
    """Interactive chat through the swarm; the servers keep the conversation's KV cache."""
    import torch

    from swarmshard.demo import TimingStreamer, wait_for_route

    client = _open_client(model, initial_peers, home, wire_codec)
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
    for column in ("peer", "blocks", "tok/s", "cache left", "weights", "wire", "version"):
        table.add_column(column)
    for r in sorted(records, key=lambda r: (r.start, r.end)):
        table.add_row(r.peer_id, f"{r.start}:{r.end}", f"{r.throughput:.1f}",
                      f"{r.cache_tokens_left}/{r.cache_tokens_total}", r.quant, r.wire_codec, r.version)
    Console().print(table)
    if not records:
        Console().print("[red]no servers found[/red]")
    elif gaps:
        Console().print(f"[red]blocks not covered:[/red] {gaps}")
    else:
        Console().print(f"[green]all {n_blocks} blocks covered[/green]")


@app.command()
def plan(
    graph: Optional[str] = typer.Option(None, help=GRAPH_HELP + " Slice it into pipeline stages."),
    swarm: Optional[str] = typer.Option(None, help="YAML file of a model and its nodes (block speed, memory, "
                                        "bandwidth): place spans of blocks on them (see README)."),
    exact: bool = typer.Option(False, "--exact", help="With --swarm: also solve exactly (MILP; small swarms)."),
    home: Optional[str] = typer.Option(None, help="With --swarm: model store for a model named in the file."),
    stages: Optional[int] = typer.Option(None, help="Number of stages (default: one per node of --nodes)."),
    nodes: Optional[str] = typer.Option(None, help="YAML file of nodes (speed, bandwidth, memory); stage i runs on node i."),
    input_shape: Optional[str] = typer.Option(None, help="Override the factory's example input shape, e.g. 1,3,32,32."),
    search: bool = typer.Option(False, "--search", help="Also search topological orders (genetic algorithm)."),
    seed: int = typer.Option(0, help="Seed of --search (and of the --swarm planner)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan JSON instead of the table."),
    out: Optional[str] = typer.Option(None, help="Write the plan JSON here (what `serve --plan` reads)."),
    picture: Optional[str] = typer.Option(None, help="Draw the graph coloured by stage into this .svg or .png."),
) -> None:
    """Plan a swarm: slice a traceable model into pipeline stages (--graph, MTPP), or place spans of a
    model's blocks on a described set of nodes (--swarm, with a certified bound)."""
    from rich.markup import escape

    if (graph is None) == (swarm is None):
        raise typer.BadParameter("give exactly one of --graph MODULE:FUNCTION (pipeline stages of any model) or "
                                 "--swarm swarm.yaml (spans of a model's blocks on nodes)", param_hint="--graph/--swarm")
    if swarm is not None:
        graph_only = {"--stages": stages, "--nodes": nodes, "--input-shape": input_shape, "--picture": picture,
                      "--search": search or None}
        given = [name for name, value in graph_only.items() if value is not None]
        if given:
            raise typer.BadParameter(f"{', '.join(given)} only apply to --graph", param_hint="--swarm")
        _plan_swarm(swarm, home, seed, exact, as_json, out)
        return
    if exact or home is not None:
        raise typer.BadParameter("--exact and --home only apply to --swarm", param_hint="--graph")

    from swarmshard.core.factory import FactoryError, parse_shape
    from swarmshard.core.graph import TraceError
    from swarmshard.core.graph_plan import PlanMismatch
    from swarmshard.core.slicing import InfeasiblePlanError
    from swarmshard.plan_picture import PictureError, write_picture
    from swarmshard.planning import NodesFileError, load_nodes, make_plan, nodes_for, plan_table

    _quiet_transformers()
    try:
        shape = parse_shape(input_shape) if input_shape is not None else None
        specs, names = nodes_for(stages, load_nodes(nodes) if nodes else None)
        result = make_plan(graph, specs, names, input_shape=shape, search=search, seed=seed)
        if out:
            Path(out).write_text(result.doc.to_json())
        if picture:
            write_picture(result.traced.graph, result.doc, picture)
    except (FactoryError, TraceError, NodesFileError, InfeasiblePlanError, PlanMismatch, PictureError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2)
    if as_json:
        print(result.doc.to_json())
        return
    console = Console(width=max(Console().width, 150))
    console.print(plan_table(result))
    for path, what in ((out, "plan"), (picture, "picture")):
        if path:
            console.print(f"{what} written to {escape(path)}")


def _plan_swarm(path: str, home: Optional[str], seed: int, exact: bool, as_json: bool, out: Optional[str]) -> None:
    from rich.markup import escape

    from swarmshard.swarm_plan import SwarmFileError, load_swarm, make_swarm_plan, swarm_table

    try:
        result = make_swarm_plan(load_swarm(path), home=home, seed=seed, exact=exact)
    except SwarmFileError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2)
    if out:
        Path(out).write_text(result.to_json())
    if as_json:
        print(result.to_json())
        return
    console = Console(width=max(Console().width, 120))
    table, lines = swarm_table(result)
    console.print(table)
    for line in lines:
        console.print(line)
    if out:
        console.print(f"plan written to {escape(out)}")


@app.command()
def simulate(
    nodes: int = typer.Option(100, min=1, help="Servers at the start (also the mean population under churn)."),
    duration: float = typer.Option(3600.0, min=1.0, help="Simulated seconds."),
    seed: int = typer.Option(0, help="Seed: the same seed gives the same machines, churn and requests."),
    policy: str = typer.Option("ours", help="Placement and rebalancing: ours (choose_span + decide_move) or petals."),
    mean_lifetime: float = typer.Option(4 * 3600.0, min=1.0, help="Mean seconds a server stays (churn; larger: less)."),
    crash_fraction: float = typer.Option(0.3, min=0.0, max=1.0, help="Share of departures that are crashes."),
    check_period: float = typer.Option(600.0, min=1.0, help="Mean seconds between a server's rebalancing checks."),
    move_threshold: float = typer.Option(1.15, min=1.0, help="Hysteresis: move only if the bottleneck grows this much."),
    load: float = typer.Option(0.5, min=0.0, help="Offered decode load as a share of the initial bottleneck."),
    plot: Optional[str] = typer.Option(None, help="Write PNG plots (capacity, coverage, servers, moves) here."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the report."),
) -> None:
    """Simulate a swarm under churn with the placement core and report throughput, latency, availability."""
    from rich.markup import escape

    from swarmshard.sim import SimConfig, plot_report, simulate as run_sim

    if policy not in ("ours", "petals"):
        raise typer.BadParameter(f"unknown policy {policy!r}: use ours or petals", param_hint="--policy")
    if plot is not None and not plot.lower().endswith(".png"):
        raise typer.BadParameter(f"{plot!r} must end in .png", param_hint="--plot")
    config = SimConfig(num_nodes=nodes, duration_s=duration, seed=seed, policy=policy, mean_lifetime_s=mean_lifetime,
                       crash_fraction=crash_fraction, check_period_s=check_period, move_threshold=move_threshold,
                       load=load, sample_every_s=min(60.0, duration / 10))
    report = run_sim(config)
    if plot is not None:
        try:
            plot_report(report, plot)
        except (ImportError, OSError) as exc:
            err.print(f"[red]error:[/red] cannot write {escape(plot)}: {escape(str(exc))}")
            raise typer.Exit(2)
    summary = {
        "nodes": nodes, "duration_s": duration, "seed": seed, "policy": policy,
        "offered_tokens_per_s": report.offered_tokens_per_s, "throughput_tokens_per_s": report.throughput_tokens_per_s,
        "mean_bottleneck": report.mean_bottleneck, "availability": report.availability,
        "latency_p50_s": report.latency_p50_s, "latency_p90_s": report.latency_p90_s,
        "latency_p99_s": report.latency_p99_s, "requests_traced": report.requests_traced,
        "request_failure_rate": report.request_failure_rate, "moves": report.moves, "joins": report.joins,
        "leaves": report.leaves, "crashes": report.crashes, "events": report.events, "wall_s": report.wall_s,
    }
    if plot is not None:
        summary["plot"] = plot
    if as_json:
        print(json.dumps(summary))
        return
    console = Console()
    table = Table(title=f"{nodes} nodes, {duration / 3600:.3g} h simulated, policy {policy}, seed {seed}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("offered load", f"{report.offered_tokens_per_s:.1f} tok/s"),
        ("throughput served", f"{report.throughput_tokens_per_s:.1f} tok/s"),
        ("mean capacity (bottleneck)", f"{report.mean_bottleneck:.1f} tok/s"),
        ("availability (all blocks served)", f"{100 * report.availability:.2f}%"),
        ("latency p50 / p90 / p99", f"{report.latency_p50_s:.2f} / {report.latency_p90_s:.2f} / "
                                    f"{report.latency_p99_s:.2f} s"),
        ("requests traced (failed)", f"{report.requests_traced} ({100 * report.request_failure_rate:.2f}%)"),
        ("moves", str(report.moves)),
        ("joins / leaves / crashes", f"{report.joins} / {report.leaves} / {report.crashes}"),
        ("events (wall time)", f"{report.events} ({report.wall_s:.2f} s)"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    if plot is not None:
        console.print(f"plots written to {escape(plot)}")


@app.command()
def demo(
    model: str = typer.Option("smollm2-135m", help="Model name or local path."),
    servers: int = typer.Option(3, help="How many server processes to start."),
    prompt: str = typer.Option("Explain in two sentences why the sky is blue.", help="Chat prompt."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate."),
    home: Optional[str] = typer.Option(None, help="Model store directory."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a report."),
    graph: Optional[str] = typer.Option(None, help=GRAPH_HELP + " Demo a sliced graph instead of chat."),
    stages: int = typer.Option(3, help="Stages (server processes) for --graph."),
    input_shape: Optional[str] = typer.Option(None, help="Example input shape for --graph, e.g. 1,3,32,32."),
    wire_codec: str = typer.Option("none", "--wire-codec", help=CODEC_HELP),
    quant: str = typer.Option("none", help=QUANT_HELP),
    replicas: int = typer.Option(1, min=1, help="Servers per span (failover needs 2)."),
    kill_after: Optional[int] = typer.Option(None, min=1, help="Kill one serving process after N tokens."),
) -> None:
    """Start a private swarm here, chat through it, compare with local generation, stop it."""
    from swarmshard.demo import run_demo

    _quiet_transformers()
    console = Console()
    if graph is not None and (quant != "none" or wire_codec != "none"):
        raise typer.BadParameter("--quant and --wire-codec apply to chat demos, not to --graph", param_hint="--graph")
    if graph is not None:
        _graph_demo(graph, stages, input_shape, as_json, console)
        return

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

    from swarmshard.server.quant import check_quant

    try:
        check_quant(quant)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--quant") from None
    report = run_demo(model, servers, prompt, max_new_tokens, home, on_event,
                      wire_codec=_wire_codec(wire_codec), quant=quant, replicas=replicas, kill_after=kill_after)
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
    if report.get("killed"):
        console.print(f"killed {report['killed']} after {kill_after} tokens; recovered in {report['recovery_s']} s")
    lossy = wire_codec != "none" or quant != "none"
    console.print("[green]identical to local greedy output[/green]" if report["identical"]
                  else "[yellow]differs from local float32 greedy output (expected with a lossy wire codec or "
                       "int8 weights)[/yellow]" if lossy else "[red]differs from local greedy output[/red]")


def _graph_demo(graph: str, stages: int, input_shape: Optional[str], as_json: bool, console: Console) -> None:
    from rich.markup import escape

    from swarmshard.core.factory import FactoryError, parse_shape
    from swarmshard.core.graph import TraceError
    from swarmshard.core.slicing import InfeasiblePlanError
    from swarmshard.graph_demo import run_graph_demo

    def on_event(kind: str, payload: dict) -> None:
        if as_json:
            return
        if kind == "plan":
            console.print(f"planned {payload['graph_id']}: ops per stage {payload['stages']}; starting servers…")
        elif kind == "swarm":
            console.print(f"{len(payload['servers'])} stage servers ready")

    try:
        shape = parse_shape(input_shape) if input_shape is not None else None
        report = run_graph_demo(graph, stages, shape, on_event=on_event)
    except (FactoryError, TraceError, InfeasiblePlanError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2)
    if as_json:
        print(json.dumps(report))
        return
    table = Table(title=f"{report['graph']} on {len(report['route'])} stage servers ({report['graph_id']})")
    for column in ("stage", "peer", "ops", "ms"):
        table.add_column(column)
    for hop in report["route"]:
        table.add_row(str(hop["stage"]), hop["peer"], str(report["stages"][hop["stage"]]["ops"]), f"{hop['ms']:.2f}")
    console.print(table)
    t = report["timings"]
    console.print(f"swarm forward {t['swarm_forward_ms']:.1f} ms, local {t['local_forward_ms']:.2f} ms; "
                  f"max abs error vs local: {report['max_abs_error']:.3g}")
    console.print("[green]matches the local model[/green]" if report["within_1e-4"]
                  else "[red]differs from the local model[/red]")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
