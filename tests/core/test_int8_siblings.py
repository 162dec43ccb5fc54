"""Int8 layers that read one input share one matmul, and compute what they computed apart."""

from __future__ import annotations

import copy
import threading

import torch
from torch import Tensor, nn

from swarmshard.core.compression import Int8Linear, quantize_module_linears
from swarmshard.core.int8_siblings import Int8Siblings, fuse_int8_siblings


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Block(nn.Module):
    """Attention-like and MLP-like projections: q/k/v read one tensor, gate/up another."""

    def __init__(self, width: int = 48, in_place: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, 16, bias=False), nn.Linear(width, 16)
        self.o = nn.Linear(width + 32, width)
        self.gate, self.up = nn.Linear(width, 96, bias=False), nn.Linear(width, 96, bias=False)
        self.down = nn.Linear(96, width)
        self.in_place = in_place

    def forward(self, x: Tensor) -> Tensor:
        q = self.q(x)
        if self.in_place:  # a module that changes its input between the sibling calls
            x.mul_(2.0)
        h = self.o(torch.cat([q, self.k(x), self.v(x)], -1))
        return self.down(torch.relu(self.gate(h)) * self.up(h))


def int8_block(seed: int = 0, in_place: bool = False) -> Block:
    torch.manual_seed(seed)
    return quantize_module_linears(Block(in_place=in_place))


def inputs(seed: int = 1, rows: int = 3) -> Tensor:
    x = torch.randn(2, rows, 48, generator=gen(seed))
    x[..., 5] *= 30.0  # an outlier feature: the two-digit path
    return x


def buffer_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.buffers())


def test_siblings_are_found_by_input_and_compute_the_same() -> None:
    fused, plain = int8_block(), int8_block()
    size = buffer_bytes(plain)
    assert fuse_int8_siblings(fused, lambda: fused(inputs(9))) == 2
    groups = {id(m.siblings): m.siblings for m in fused.modules() if isinstance(m, Int8Linear) and m.siblings}
    assert sorted(len(g.members) for g in groups.values()) == [2, 3]
    assert fused.o.siblings is None and fused.down.siblings is None
    for x in (inputs(1), inputs(2, rows=1), inputs(3)[:, :, :] * 0.1):  # outliers, one row, no outlier
        with torch.no_grad():
            assert torch.allclose(fused(x.clone()), plain(x.clone()), rtol=1e-5, atol=1e-5)
    # The members' weights are views into the shared one: no memory added.
    assert buffer_bytes(fused) == size
    group = fused.q.siblings
    assert isinstance(group, Int8Siblings)
    assert fused.k.weight_int8.untyped_storage().data_ptr() == group.weight_int8.untyped_storage().data_ptr()


def test_a_sibling_called_on_another_tensor_computes_its_own_output() -> None:
    fused, plain = int8_block(), int8_block()
    fuse_int8_siblings(fused, lambda: fused(inputs(9)))
    a, b = inputs(4), inputs(5)
    with torch.no_grad():
        assert torch.allclose(fused.q(a), plain.q(a), atol=1e-5)
        assert torch.allclose(fused.k(b), plain.k(b), atol=1e-5)  # not a's cached key
        assert torch.allclose(fused.k(a), plain.k(a), atol=1e-5)
        assert torch.allclose(fused.k(a), plain.k(a), atol=1e-5)  # twice: computed again, not reused


def test_an_input_changed_between_siblings_is_not_fused() -> None:
    block = int8_block(in_place=True)
    reference = int8_block(in_place=True)
    assert fuse_int8_siblings(block, lambda: block(inputs(9))) == 2  # k/v (after the change), gate/up
    assert block.q.siblings is None and block.k.siblings is block.v.siblings is not None
    with torch.no_grad():
        assert torch.allclose(block(inputs(6)), reference(inputs(6)), atol=1e-5)


def test_in_place_change_after_a_fused_call_is_seen_outside_inference_mode() -> None:
    fused, plain = int8_block(), int8_block()
    fuse_int8_siblings(fused, lambda: fused(inputs(9)))
    x = inputs(7)
    with torch.no_grad():
        fused.q(x)
        x.mul_(3.0)  # the version counter moves: k must not return the key of the old values
        assert torch.allclose(fused.k(x), plain.k(x), atol=1e-5)


def test_fused_layers_copy_and_load_like_separate_layers() -> None:
    fused, plain = int8_block(), int8_block()
    fuse_int8_siblings(fused, lambda: fused(inputs(9)))
    x = inputs(8)
    twin = copy.deepcopy(fused)
    fresh = int8_block(seed=3)
    fresh.load_state_dict(fused.state_dict())
    with torch.no_grad():
        expected = plain(x.clone())
        assert torch.allclose(twin(x.clone()), expected, atol=1e-5)
        assert torch.allclose(fresh(x.clone()), expected, atol=1e-5)


def test_threads_share_a_fused_module_safely() -> None:
    fused, plain = int8_block(), int8_block()
    fuse_int8_siblings(fused, lambda: fused(inputs(9)))
    xs = [inputs(20 + i) for i in range(4)]
    with torch.no_grad():
        expected = [plain(x.clone()) for x in xs]
    failures: list[int] = []

    def work(i: int) -> None:
        with torch.no_grad():
            for _ in range(25):
                if not torch.allclose(fused(xs[i].clone()), expected[i], atol=1e-5):
                    failures.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and failures == []


def test_layers_called_twice_or_with_calibrated_columns_stay_apart() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    model = quantize_module_linears(nn.Sequential(shared, nn.ReLU(), shared))
    assert fuse_int8_siblings(model, lambda: model(torch.randn(2, 8))) == 0
    lin_a, lin_b = nn.Linear(8, 4), nn.Linear(8, 4)
    calibrated = Int8Linear.from_linear(lin_a, calibration=torch.full((2, 8), 9.0), max_fp_columns=2)
    pair = nn.ModuleList([calibrated, Int8Linear.from_linear(lin_b)])
    x = torch.randn(3, 8)
    assert fuse_int8_siblings(pair, lambda: [m(x) for m in pair]) == 0
