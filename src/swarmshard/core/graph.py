"""Op graphs of arbitrary torch modules: what MTPP slices.

A model is traced once into a *flat* fx ``GraphModule`` (tensor leaves in, a tuple of tensor leaves
out), so that every later step -- cost modelling, slicing, stage building -- deals with one simple
calling convention whatever the model's real signature (dicts, kwargs, ``ModelOutput``...). The
flat module is then run on the example inputs to annotate each op with FLOPs, parameter bytes and
output bytes, which become the pure :class:`OpGraph` the slicer works on.

Tracing tries plain ``torch.fx`` first (readable graphs of leaf modules) and falls back to
``torch.export`` (ATen-level graphs) for models fx cannot follow, such as ``transformers`` models:
``transformers.utils.fx`` no longer exists in transformers 5, and ``torch.export`` handles them.
"""

from __future__ import annotations

import keyword
import operator
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import TreeSpec, keystr, tree_flatten, tree_flatten_with_path, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = [
    "OpNode",
    "OpGraph",
    "TracedModel",
    "TraceError",
    "trace_model",
    "profile_nodes",
    "random_op_graph",
]


class TraceError(RuntimeError):
    """Raised when no tracer could turn a module into a graph that reproduces its output."""


@dataclass(frozen=True)
class OpNode:
    """One operation: the unit MTPP places.

    ``inputs`` names producers (other ops or graph inputs), deduplicated, in argument order.
    ``params`` are the parameters/buffers attributed to this op: a tensor used by several ops is
    attributed to the first one only (so totals count it once); the later users list it in
    ``shared_params`` instead.
    """

    name: str
    op: str
    target: str
    inputs: tuple[str, ...]
    flops: float
    param_bytes: int
    output_bytes: int
    params: tuple[str, ...] = ()
    shared_params: tuple[str, ...] = ()
    output_shapes: tuple[tuple[int, ...], ...] = ()
    output_dtypes: tuple[str, ...] = ()
    measured_time: float | None = None


@dataclass
class OpGraph:
    """A DAG of :class:`OpNode` plus its external inputs and outputs.

    ``nodes`` is kept in a topological order (the trace order). ``inputs`` maps each graph input
    to its size in bytes; ``outputs`` names the ops (or inputs) whose values leave the graph.
    ``shared_params`` maps each parameter used by more than one op to all of its users.
    """

    nodes: dict[str, OpNode]
    inputs: dict[str, int] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    shared_params: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _succ: dict[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)
    _pred: dict[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        clash = set(self.nodes) & set(self.inputs)
        if clash:
            raise ValueError(f"names used both as op and graph input: {sorted(clash)[:3]}")
        succ: dict[str, list[str]] = {name: [] for name in self.nodes}
        pred: dict[str, tuple[str, ...]] = {}
        for name, node in self.nodes.items():
            for src in node.inputs:
                if src in self.nodes:
                    succ[src].append(name)
                elif src not in self.inputs:
                    raise ValueError(f"op {name!r} consumes unknown value {src!r}")
            pred[name] = tuple(s for s in node.inputs if s in self.nodes)
        for out in self.outputs:
            if out not in self.nodes and out not in self.inputs:
                raise ValueError(f"graph output {out!r} is neither an op nor an input")
        self._succ = {k: tuple(v) for k, v in succ.items()}
        self._pred = pred

    def __len__(self) -> int:
        return len(self.nodes)

    def predecessors(self, name: str) -> tuple[str, ...]:
        """Ops whose outputs ``name`` consumes (graph inputs excluded)."""
        return self._pred[name]

    def successors(self, name: str) -> tuple[str, ...]:
        """Ops consuming the output of ``name`` (or of graph input ``name``)."""
        if name in self.inputs:
            return tuple(n for n, node in self.nodes.items() if name in node.inputs)
        return self._succ[name]

    @property
    def total_flops(self) -> float:
        return float(sum(n.flops for n in self.nodes.values()))

    @property
    def total_param_bytes(self) -> int:
        return int(sum(n.param_bytes for n in self.nodes.values()))


@dataclass
class TracedModel:
    """A model as a flat fx module plus what is needed to call it like the original.

    ``module(*tensor_leaves)`` returns a tuple of the output's tensor leaves. Non-tensor input
    leaves were specialised at trace time (``in_template``) and must not change; non-tensor output
    leaves are constants kept in ``out_template``.
    """

    module: torch.fx.GraphModule
    graph: OpGraph
    method: Literal["fx", "export"]
    input_names: tuple[str, ...]
    output_sources: tuple[str, ...]
    in_spec: TreeSpec
    in_template: tuple[Any, ...]
    in_tensor_positions: tuple[int, ...]
    out_spec: TreeSpec
    out_template: tuple[Any, ...]
    out_tensor_positions: tuple[int, ...]

    def flatten_inputs(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        """The tensor leaves of ``(args, kwargs)``, checked against the traced signature."""
        leaves, spec = tree_flatten((args, kwargs))
        if spec != self.in_spec:
            raise ValueError(f"inputs have structure {spec}, the model was traced with {self.in_spec}")
        tensor_pos = set(self.in_tensor_positions)
        for pos, (leaf, traced) in enumerate(zip(leaves, self.in_template)):
            if pos in tensor_pos:
                if not isinstance(leaf, torch.Tensor):
                    raise ValueError(f"input leaf {pos} must be a tensor, got {type(leaf).__name__}")
            elif leaf != traced:
                raise ValueError(f"non-tensor input leaf {pos} was {traced!r} at trace time, got {leaf!r}")
        return [leaves[p] for p in self.in_tensor_positions]

    def unflatten_outputs(self, flat: Sequence[Any]) -> Any:
        """Rebuild the model's output structure from the flat tensor outputs."""
        if len(flat) != len(self.out_tensor_positions):
            raise ValueError(f"expected {len(self.out_tensor_positions)} outputs, got {len(flat)}")
        leaves = list(self.out_template)
        for pos, value in zip(self.out_tensor_positions, flat):
            leaves[pos] = value
        return tree_unflatten(leaves, self.out_spec)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.unflatten_outputs(self.module(*self.flatten_inputs(*args, **kwargs)))


# --------------------------------------------------------------------------------------------
# tracing


def _ident(text: str) -> str:
    out = "".join(c if c.isalnum() else "_" for c in text).strip("_")
    while "__" in out:
        out = out.replace("__", "_")
    if not out or out[0].isdigit() or keyword.iskeyword(out) or out == "self":
        out = "in_" + out
    return out


def _leaf_names(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """Readable, unique identifiers for the flattened leaves of ``(args, kwargs)``."""
    names: list[str] = []
    seen: set[str] = set()
    for path, _ in tree_flatten_with_path((args, kwargs))[0]:
        root, rest = path[0], path[1:]
        prefix = "arg" if getattr(root, "idx", 1) == 0 else ""
        base = _ident(prefix + keystr(rest)) or "input"
        name, k = base, 1
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        seen.add(name)
        names.append(name)
    return names


class _FlatCall(nn.Module):
    """Calls ``model`` from flat tensor leaves and returns flat tensor leaves.

    It shares the model's module/parameter/buffer dicts, so qualified names in the traced graph
    are exactly the model's own (no wrapper prefix).
    """

    def __init__(self, model: nn.Module, in_spec: TreeSpec, template: Sequence[Any], positions: Sequence[int]):
        super().__init__()
        object.__setattr__(self, "_modules", model._modules)
        object.__setattr__(self, "_parameters", model._parameters)
        object.__setattr__(self, "_buffers", model._buffers)
        object.__setattr__(self, "_inner", model)
        self._in_spec = in_spec
        self._template = tuple(template)
        self._positions = tuple(positions)

    def _call(self, *flat: Any) -> tuple[Any, ...]:
        leaves = list(self._template)
        for pos, value in zip(self._positions, flat):
            leaves[pos] = value
        args, kwargs = tree_unflatten(leaves, self._in_spec)
        out = self._inner.forward(*args, **kwargs)
        return tuple(x for x in tree_flatten(out)[0] if isinstance(x, (torch.Tensor, torch.fx.Proxy)))


def _flat_wrapper(model: nn.Module, in_spec: TreeSpec, template: Sequence[Any],
                  positions: Sequence[int], names: Sequence[str]) -> _FlatCall:
    """A ``_FlatCall`` whose ``forward`` has one named parameter per tensor leaf (tracers read it)."""
    params = ", ".join(names)
    namespace: dict[str, Any] = {}
    exec(f"def forward(self, {params}):\n    return self._call({params})\n", namespace)  # noqa: S102
    cls = type(f"Flat{type(model).__name__}", (_FlatCall,), {"forward": namespace["forward"]})
    return cls(model, in_spec, template, positions)


def _trace_fx(wrapper: nn.Module) -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(wrapper)


_EXPORT_NOISE = {"_guards_fn"}


def _trace_export(wrapper: nn.Module, flat: Sequence[torch.Tensor]) -> torch.fx.GraphModule:
    program = torch.export.export(wrapper, tuple(flat), strict=False)
    gm = program.module(check_guards=False)
    graph = gm.graph
    for node in list(graph.nodes):
        noise = (node.op == "call_module" and node.target in _EXPORT_NOISE) or (
            node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default
        )
        if noise and not node.users:
            graph.erase_node(node)
    graph._codegen = torch.fx.graph.CodeGen()  # plain positional in, flat tuple out
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    out.args = (tuple(out.args[0]),)
    graph.eliminate_dead_code()
    gm._forward_pre_hooks.clear()
    gm.recompile()
    return gm


def _max_abs_diff(a: Sequence[Any], b: Sequence[Any]) -> float:
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.shape != y.shape:
            return float("inf")
        if x.numel():
            worst = max(worst, float((x.detach().double() - y.detach().double()).abs().max()))
    return worst


def trace_model(model: nn.Module, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None,
                *, method: Literal["auto", "fx", "export"] = "auto", atol: float = 1e-5,
                profile: bool = False) -> TracedModel:
    """Trace ``model(*args, **kwargs)`` into a :class:`TracedModel` with an annotated op graph.

    Each candidate tracer's module is run on the example inputs and must match the eager output
    within ``atol``, because a tracer can succeed and still be wrong (e.g. a traced value that is
    really a tuple). ``method="auto"`` tries fx, then ``torch.export``. ``profile=True`` also
    measures each op's time (see :func:`profile_nodes`).
    """
    if method not in ("auto", "fx", "export"):
        raise ValueError(f"method must be 'auto', 'fx' or 'export', not {method!r}")
    kwargs = dict(kwargs or {})
    leaves, in_spec = tree_flatten((tuple(args), kwargs))
    positions = tuple(i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor))
    if not positions:
        raise TraceError("the model needs at least one tensor input to trace")
    names = _leaf_names(tuple(args), kwargs)
    template = tuple(None if i in positions else x for i, x in enumerate(leaves))
    flat_in = [leaves[i] for i in positions]

    with torch.no_grad():
        reference = model(*args, **kwargs)
    out_leaves, out_spec = tree_flatten(reference)
    out_positions = tuple(i for i, x in enumerate(out_leaves) if isinstance(x, torch.Tensor))
    out_template = tuple(None if i in out_positions else x for i, x in enumerate(out_leaves))
    expected = [out_leaves[i] for i in out_positions]

    tracers: dict[str, Callable[[nn.Module], torch.fx.GraphModule]] = {
        "fx": _trace_fx,
        "export": lambda w: _trace_export(w, flat_in),
    }
    chosen = list(tracers) if method == "auto" else [method]
    failures: list[str] = []
    for name in chosen:
        wrapper = _flat_wrapper(model, in_spec, template, positions, [names[p] for p in positions])
        try:
            gm = tracers[name](wrapper)
            with torch.no_grad():
                got = list(gm(*flat_in))
        except Exception as exc:  # noqa: BLE001 - every tracer failure is reported together below
            failures.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        diff = _max_abs_diff(got, expected)
        if diff > atol:
            failures.append(f"{name}: traced module differs from eager output (max abs diff {diff:.3g})")
            continue
        graph, output_sources = _annotate(gm, flat_in)
        placeholders = tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")
        traced = TracedModel(
            module=gm, graph=graph, method=name,  # type: ignore[arg-type]
            input_names=placeholders, output_sources=output_sources,
            in_spec=in_spec, in_template=template, in_tensor_positions=positions,
            out_spec=out_spec, out_template=out_template, out_tensor_positions=out_positions,
        )
        if profile:
            traced.graph = profile_nodes(traced, *args, **kwargs)
        return traced
    raise TraceError(f"could not trace {type(model).__name__}: " + "; ".join(failures))


# --------------------------------------------------------------------------------------------
# annotation (shape propagation + costs)


def _tensors(value: Any) -> list[torch.Tensor]:
    return [x for x in tree_flatten(value)[0] if isinstance(x, torch.Tensor)]


def _value_bytes(value: Any) -> int:
    """Bytes needed to ship ``value``: tensor data, 8 bytes per Python scalar."""
    total = 0
    for leaf in tree_flatten(value)[0]:
        if isinstance(leaf, torch.Tensor):
            total += leaf.numel() * leaf.element_size()
        elif isinstance(leaf, (int, float, bool, torch.SymInt)):
            total += 8
    return total


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return -1


def _cpu_sdpa_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


class _Annotator(torch.fx.Interpreter):
    """Runs the flat module once, recording per-node FLOPs and output values' metadata."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self.flops: dict[str, float] = {}
        self.meta: dict[str, tuple[int, tuple[tuple[int, ...], ...], tuple[str, ...]]] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op not in ("call_function", "call_method", "call_module"):
            result = super().run_node(n)
        else:
            with FlopCounterMode(display=False, custom_mapping=_FLOP_FORMULAS) as counter:
                result = super().run_node(n)
            flops = float(counter.get_total_flops())
            if flops == 0:
                flops = self._elementwise_flops(n, result)
            self.flops[n.name] = flops
        outs = _tensors(result)
        self.meta[n.name] = (
            _value_bytes(result),
            tuple(tuple(t.shape) for t in outs),
            tuple(str(t.dtype).removeprefix("torch.") for t in outs),
        )
        return result

    def _elementwise_flops(self, n: torch.fx.Node, result: Any) -> float:
        """~one FLOP per output element, none for views and tuple indexing (they move no data)."""
        if n.op == "call_function" and n.target is operator.getitem:
            return 0.0
        in_storages = {_storage(t) for a in n.all_input_nodes if a in self.env for t in _tensors(self.env[a])}
        return float(sum(t.numel() for t in _tensors(result) if _storage(t) not in in_storages))


def _target_name(node: torch.fx.Node) -> str:
    if isinstance(node.target, str):
        return node.target
    return getattr(node.target, "__qualname__", None) or str(node.target)


def _node_state(gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[tuple[str, torch.Tensor]]:
    """Parameters/buffers an op touches directly: its get_attr inputs or its called module's state."""
    found: list[tuple[str, torch.Tensor]] = []
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        found += [(f"{node.target}.{k}", v) for k, v in module.named_parameters()]
        found += [(f"{node.target}.{k}", v) for k, v in module.named_buffers()]
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            value = _fetch_attr(gm, str(arg.target))
            if isinstance(value, torch.Tensor):
                found.append((str(arg.target), value))
            elif isinstance(value, nn.Module):
                found += [(f"{arg.target}.{k}", v) for k, v in value.state_dict(keep_vars=True).items()]
    return found


def _fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _annotate(gm: torch.fx.GraphModule, flat_in: Sequence[torch.Tensor]) -> tuple[OpGraph, tuple[str, ...]]:
    """Build the :class:`OpGraph` of ``gm`` from one instrumented run on ``flat_in``."""
    annotator = _Annotator(gm)
    with torch.no_grad():
        annotator.run(*flat_in)

    inputs: dict[str, int] = {}
    nodes: dict[str, OpNode] = {}
    owner: dict[int, str] = {}  # id(tensor) -> canonical param name
    users: dict[str, list[str]] = {}
    output_sources: tuple[str, ...] = ()
    outputs: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            inputs[node.name] = annotator.meta[node.name][0]
        elif node.op == "output":
            output_sources = tuple(a.name for a in node.args[0])
            outputs = [a.name for a in node.args[0] if a.op != "get_attr"]
        elif node.op in ("call_function", "call_method", "call_module"):
            own: list[str] = []
            shared: list[str] = []
            own_bytes = 0
            for pname, tensor in _node_state(gm, node):
                key = id(tensor)
                if key not in owner:
                    owner[key] = pname
                    users[pname] = [node.name]
                    own.append(pname)
                    own_bytes += tensor.numel() * tensor.element_size()
                else:
                    canonical = owner[key]
                    if node.name not in users[canonical]:
                        users[canonical].append(node.name)
                        if canonical not in own:
                            shared.append(canonical)
            producers = tuple(dict.fromkeys(a.name for a in node.all_input_nodes if a.op != "get_attr"))
            size, shapes, dtypes = annotator.meta[node.name]
            nodes[node.name] = OpNode(
                name=node.name, op=node.op, target=_target_name(node), inputs=producers,
                flops=annotator.flops[node.name], param_bytes=own_bytes, output_bytes=size,
                params=tuple(own), shared_params=tuple(shared), output_shapes=shapes, output_dtypes=dtypes,
            )
    shared_params = {p: tuple(u) for p, u in users.items() if len(u) > 1}
    graph = OpGraph(nodes=nodes, inputs=inputs, outputs=tuple(dict.fromkeys(outputs)), shared_params=shared_params)
    return graph, output_sources


# --------------------------------------------------------------------------------------------
# measured time (the only code here that reads a clock)


class _Timer(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, clock: Callable[[], float]):
        super().__init__(gm)
        self.clock = clock
        self.times: dict[str, float] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        start = self.clock()
        result = super().run_node(n)
        if n.op in ("call_function", "call_method", "call_module"):
            self.times[n.name] = self.clock() - start
        return result


def profile_nodes(traced: TracedModel, *args: Any, repeats: int = 3,
                  clock: Callable[[], float] = time.perf_counter, **kwargs: Any) -> OpGraph:
    """A copy of ``traced.graph`` with each op's ``measured_time`` (median seconds over ``repeats``).

    Measured times let the slicer use real costs where FLOPs mislead (memory-bound ops, kernels
    with poor utilisation). The first run is a warm-up and is discarded.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    flat = traced.flatten_inputs(*args, **kwargs)
    samples: dict[str, list[float]] = {name: [] for name in traced.graph.nodes}
    with torch.no_grad():
        for run in range(repeats + 1):
            timer = _Timer(traced.module, clock)
            timer.run(*flat)
            if run:
                for name, t in timer.times.items():
                    samples[name].append(t)
    nodes = {
        name: replace(node, measured_time=sorted(samples[name])[len(samples[name]) // 2])
        for name, node in traced.graph.nodes.items()
    }
    g = traced.graph
    return OpGraph(nodes=nodes, inputs=dict(g.inputs), outputs=g.outputs, shared_params=dict(g.shared_params))


# --------------------------------------------------------------------------------------------
# synthetic graphs (for property tests, benchmarks and the simulator)


def random_op_graph(n: int, rng: random.Random, *, max_fan_in: int = 3, skip_prob: float = 0.1,
                    max_skip: int | None = None, backbone: bool = True, n_inputs: int = 1,
                    max_work: float = 100.0, max_param_bytes: int = 1000,
                    max_output_bytes: int = 1000) -> OpGraph:
    """A random DAG shaped like a network: mostly local edges, occasional long skips.

    Node ``i`` consumes its predecessor ``i-1`` (a backbone, which fixes the topological order)
    or, with ``backbone=False``, one of the 8 previous ops (leaving parallel branches), plus up to
    ``max_fan_in - 1`` others: each a skip of up to ``max_skip`` ops back (unbounded if None) with
    probability ``skip_prob``, otherwise one of the 8 previous ops. Sinks become graph outputs.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    names = [f"op{i}" for i in range(n)]
    input_names = [f"x{i}" for i in range(n_inputs)]
    consumed: set[str] = set()
    nodes: dict[str, OpNode] = {}
    for i, name in enumerate(names):
        srcs: list[str] = []
        if i == 0:
            srcs = list(input_names[:1])
        else:
            srcs.append(names[i - 1] if backbone else names[max(0, i - rng.randint(1, 8))])
            for _ in range(rng.randint(0, max_fan_in - 1)):
                if rng.random() < skip_prob:
                    j = rng.randrange(0 if max_skip is None else max(0, i - max_skip), i)
                else:
                    j = max(0, i - rng.randint(1, 8))
                srcs.append(names[j])
        if input_names and rng.random() < 0.05:
            srcs.append(rng.choice(input_names))
        srcs = list(dict.fromkeys(srcs))
        consumed.update(srcs)
        has_params = rng.random() < 0.6
        nodes[name] = OpNode(
            name=name, op="call_function", target="synthetic", inputs=tuple(srcs),
            flops=rng.uniform(0.0, max_work),
            param_bytes=rng.randint(1, max_param_bytes) if has_params else 0,
            output_bytes=rng.randint(1, max_output_bytes),
        )
    inputs = {x: rng.randint(1, max_output_bytes) for x in input_names}
    outputs = tuple(name for name in names if name not in consumed) or (names[-1],)
    return OpGraph(nodes=nodes, inputs=inputs, outputs=outputs)

