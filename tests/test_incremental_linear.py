"""IncrementalLinear: switching, merging, unmerging, composing, training and saving increments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.modules.incremental_linear import IncrementalLinear, incremental_linears, increments_disabled

IN, OUT = 12, 7


def make_layer(bias: bool = True, seed: int = 0) -> IncrementalLinear:
    torch.manual_seed(seed)
    return IncrementalLinear(IN, OUT, bias=bias)


def add_random(layer: IncrementalLinear, name: str, rank: int = 3, beta: float = 0.5) -> nn.Parameter:
    basis = torch.randn(rank, IN)
    return layer.add_increment(name, basis, beta=beta, coeff=torch.randn(OUT, rank))


def test_no_increments_is_exactly_nn_linear() -> None:
    layer = make_layer()
    plain = nn.Linear(IN, OUT)
    plain.load_state_dict(layer.state_dict())
    assert list(layer.state_dict()) == list(plain.state_dict()) == ["weight", "bias"]
    x = torch.randn(4, 5, IN)
    assert torch.equal(layer(x), plain(x))


def test_zero_coeff_is_a_no_op_and_delta_formula() -> None:
    layer = make_layer()
    x = torch.randn(3, IN)
    before = layer(x)
    basis = torch.randn(2, IN)
    coeff = layer.add_increment("a", basis, beta=1e-4)
    assert coeff.shape == (OUT, 2) and torch.count_nonzero(coeff) == 0
    assert torch.equal(layer(x), before)
    with torch.no_grad():
        coeff.copy_(torch.randn(OUT, 2))
    torch.testing.assert_close(layer.delta_weight(), coeff @ (1e-4 * basis))


def test_on_off_and_disabled_context() -> None:
    layer = make_layer()
    x = torch.randn(3, IN)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    add_random(layer, "a")
    on = layer(x)
    assert not torch.allclose(on, base)
    layer.set_active([])
    assert layer.active_names == [] and torch.equal(layer(x), base)
    layer.set_active(None)
    assert layer.active_names == ["a"] and torch.equal(layer(x), on)

    model = nn.Sequential(layer, nn.ReLU(), make_layer(seed=1))
    assert list(incremental_linears(model)) == ["0", "2"]
    with increments_disabled(model):
        assert torch.equal(layer(x), base)
    assert layer.active_names == ["a"] and torch.equal(layer(x), on)


@pytest.mark.parametrize("shape", [(IN,), (5, IN), (2, 3, IN), (2, 2, 3, IN)])
def test_any_batch_shape_matches_explicit_weight(shape: tuple[int, ...]) -> None:
    layer = make_layer()
    add_random(layer, "a")
    x = torch.randn(*shape)
    expected = x @ (layer.weight + layer.delta_weight()).T + layer.bias
    torch.testing.assert_close(layer(x), expected)
    rows = layer(x.reshape(-1, IN)).reshape(*shape[:-1], OUT)
    torch.testing.assert_close(layer(x), rows)


def test_increments_compose_by_addition_in_any_order() -> None:
    torch.manual_seed(0)
    bases = {n: torch.randn(r, IN) for n, r in (("a", 2), ("b", 4), ("c", 1))}
    coeffs = {n: torch.randn(OUT, b.shape[0]) for n, b in bases.items()}
    outputs = []
    for order in (["a", "b", "c"], ["c", "a", "b"], ["b", "c", "a"]):
        layer = make_layer()
        for name in order:
            layer.add_increment(name, bases[name], beta=0.3, coeff=coeffs[name])
        x = torch.randn(4, IN, generator=torch.Generator().manual_seed(1))
        outputs.append(layer(x))
        deltas = {n: layer.delta_weight([n]) for n in bases}
        torch.testing.assert_close(layer.delta_weight(), deltas["a"] + deltas["b"] + deltas["c"])
        layer.set_active(["a", "c"])
        torch.testing.assert_close(layer.delta_weight(), deltas["a"] + deltas["c"])
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(outputs[0], outputs[2])


def test_merge_matches_unmerged_and_unmerge_is_bit_exact() -> None:
    layer = make_layer()
    add_random(layer, "a")
    add_random(layer, "b")
    layer.set_active(["b"])
    original = layer.weight.detach().clone()
    x = torch.randn(2, 6, IN)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.weight.detach(), original + layer.delta_weight(["b"]))
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(layer.weight, original)
    assert torch.equal(layer(x), unmerged)


def test_gradients_reach_only_the_active_coefficients() -> None:
    layer = make_layer()
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    coeff_a = add_random(layer, "a")
    coeff_b = add_random(layer, "b")
    layer.set_active(["a"])
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["increments.a.coeff", "increments.b.coeff"]
    assert "increments.a.basis" in dict(layer.named_buffers())
    layer(torch.randn(3, IN)).square().sum().backward()
    assert coeff_a.grad is not None and coeff_a.grad.abs().sum() > 0
    assert coeff_b.grad is None
    assert layer.weight.grad is None and layer.increments["a"].basis.grad is None


def test_state_dict_round_trip_recreates_increments() -> None:
    source = nn.ModuleDict({"first": make_layer(), "second": make_layer(bias=False, seed=1)})
    add_random(source["first"], "van_gogh", rank=3, beta=1e-4)
    add_random(source["first"], "picasso", rank=2, beta=2e-4)
    add_random(source["second"], "van_gogh", rank=5)
    source["first"].set_active(["picasso"])
    state = source.state_dict()
    assert {"first.increments.van_gogh.coeff", "first.increments.van_gogh.basis", "first.increments.van_gogh.beta",
            "first.increments.van_gogh.active", "second.increments.van_gogh.coeff"} <= set(state)

    target = nn.ModuleDict({"first": make_layer(seed=5), "second": make_layer(bias=False, seed=6)})
    target.load_state_dict(state)
    assert target["first"].increment_names == ["van_gogh", "picasso"]
    assert target["first"].active_names == ["picasso"]
    assert target["first"].increments["picasso"].beta == 2e-4
    x = torch.randn(3, IN)
    for name in ("first", "second"):
        assert torch.equal(target[name](x), source[name](x))
    reloaded = target.state_dict()
    assert list(reloaded) == list(state)
    for key, value in state.items():
        assert torch.equal(reloaded[key], value), key


def test_merged_state_dict_is_a_plain_linear_with_baked_weight() -> None:
    layer = make_layer()
    add_random(layer, "a")
    x = torch.randn(2, IN)
    expected = layer(x)
    layer.merge()
    state = layer.state_dict()
    assert list(state) == ["weight", "bias"]
    plain = nn.Linear(IN, OUT)
    plain.load_state_dict(state)
    torch.testing.assert_close(plain(x), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.load_state_dict(state)


def test_dtype_and_device_follow_the_weight() -> None:
    layer = make_layer().double()
    coeff = layer.add_increment("a", torch.randn(2, IN, dtype=torch.float32))
    assert coeff.dtype == torch.float64 and layer.increments["a"].basis.dtype == torch.float64
    layer.to(torch.bfloat16)
    assert layer.increments["a"].coeff.dtype == torch.bfloat16
    assert layer(torch.randn(2, IN, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with torch.device("meta"):
        meta_layer = IncrementalLinear(IN, OUT)
    assert meta_layer.add_increment("a", torch.randn(2, IN)).device.type == "meta"


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda l: l.add_increment("", torch.randn(2, IN)), ValueError, "non-empty"),
        (lambda l: l.add_increment("a.b", torch.randn(2, IN)), ValueError, "without '.'"),
        (lambda l: l.add_increment("keys", torch.randn(2, IN)), ValueError, "clashes"),
        (lambda l: l.add_increment("x", torch.randn(2, IN + 1)), ValueError, "in_features"),
        (lambda l: l.add_increment("x", torch.randn(IN)), ValueError, "2-D"),
        (lambda l: l.add_increment("x", torch.randn(2, IN), beta=0.0), ValueError, "beta"),
        (lambda l: l.add_increment("x", torch.randn(2, IN), coeff=torch.zeros(OUT, 3)), ValueError, "coeff"),
        (lambda l: l.add_increment("a", torch.randn(2, IN)), ValueError, "already exists"),
        (lambda l: l.remove_increment("nope"), KeyError, "Unknown increment"),
        (lambda l: l.set_active(["nope"]), KeyError, "Unknown increment"),
        (lambda l: l.set_active("a"), TypeError, "wrap it in a list"),
        (lambda l: l.delta_weight(["nope"]), KeyError, "Unknown increment"),
        (lambda l: l.unmerge(), RuntimeError, "not merged"),
    ],
)
def test_bad_input_raises_clear_errors(call, error: type[Exception], match: str) -> None:
    layer = make_layer()
    add_random(layer, "a")
    with pytest.raises(error, match=match):
        call(layer)


def test_merged_layer_refuses_changes() -> None:
    layer = make_layer()
    add_random(layer, "a")
    layer.merge()
    for call in (
        layer.merge,
        lambda: layer.add_increment("b", torch.randn(2, IN)),
        lambda: layer.remove_increment("a"),
        lambda: layer.set_active([]),
    ):
        with pytest.raises(RuntimeError, match="merged"):
            call()
    with pytest.raises(RuntimeError, match="merged"), increments_disabled(nn.Sequential(layer)):
        pass


def test_remove_increment_drops_it_everywhere() -> None:
    layer = make_layer()
    x = torch.randn(2, IN)
    base = layer(x)
    add_random(layer, "a")
    layer.remove_increment("a")
    assert layer.increment_names == [] and list(layer.state_dict()) == ["weight", "bias"]
    assert torch.equal(layer(x), base)
