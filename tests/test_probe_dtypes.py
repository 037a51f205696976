"""The probes on every dtype a model can hold: no crash, NaN/Inf and magnitude checked in a precision that
cannot narrow, integers skipped, complex by magnitude, buffers reported apart from parameters, non-scalar
losses checked elementwise, and a fingerprint that sees every bit. Real tensors and modules, no mocks."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gradience.probe import bad_parameters, bad_tensors, fingerprint_tensor, probe_grads, probe_step

NAN, INF = float("nan"), float("inf")

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
COMPLEX = [torch.complex64, torch.complex128]
FLOAT8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]
INTS = [torch.int8, torch.uint8, torch.int32, torch.bool]
NAN_ABLE = FLOATS + COMPLEX + FLOAT8
ALL = NAN_ABLE + INTS

# A value above the threshold that the dtype represents, and a threshold below it. float64 and bf16 values
# are chosen so that their L2 norm overflows its accumulation dtype: that must read as a violation, not NaN/Inf.
BIG = {
    torch.float16: (6e4, 1e3),
    torch.bfloat16: (3e38, 1e6),
    torch.float32: (3e38, 1e6),
    torch.float64: (1e300, 1e6),
    torch.complex64: (3e38, 1e6),
    torch.complex128: (1e300, 1e6),
}
BIG.update({dt: (float(torch.finfo(dt).max), 100.0) for dt in FLOAT8})


def _fill(dtype: torch.dtype, value: complex | float, n: int = 6) -> torch.Tensor:
    """``n`` ones of ``dtype`` with ``value`` at position 2 (set in a wide dtype, then converted)."""
    wide = torch.complex128 if dtype.is_complex else torch.float64
    t = torch.ones(n, dtype=wide)
    t[2] = value
    return t.to(dtype)


class Holder(torch.nn.Module):
    """A float32 layer plus one tensor of the dtype under test, as a frozen parameter or a buffer."""

    def __init__(self, t: torch.Tensor, *, as_buffer: bool = False) -> None:
        super().__init__()
        self.base = torch.nn.Linear(3, 3)
        if as_buffer:
            self.register_buffer("held", t)
        else:
            self.held = torch.nn.Parameter(t, requires_grad=t.dtype.is_floating_point or t.dtype.is_complex)


def _step(model: torch.nn.Module, threshold: float = 10.0, loss: object = 0.0):
    return probe_step(loss, model, step=0, threshold=threshold, with_fingerprint=True)


@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("as_buffer", [False, True], ids=["param", "buffer"])
def test_healthy_tensor_of_any_dtype_is_clean(dtype, as_buffer):
    r = _step(Holder(torch.ones(4, 5).to(dtype), as_buffer=as_buffer))
    assert not r.faulty and math.isfinite(r.weight_norm)
    assert r.fingerprint is not None


@pytest.mark.parametrize("dtype", NAN_ABLE, ids=str)
def test_nan_parameter_is_nonfinite_weights_and_reported_as_nan(dtype):
    value = complex(1.0, NAN) if dtype.is_complex else NAN  # a NaN component is a NaN number
    r = _step(Holder(_fill(dtype, value)))
    assert r.nonfinite_weights and not r.nonfinite_buffers and not r.violation_weights
    assert math.isnan(r.weight_norm)


@pytest.mark.parametrize("dtype", NAN_ABLE, ids=str)
def test_nan_buffer_is_nonfinite_buffers_not_weights(dtype):
    r = _step(Holder(_fill(dtype, NAN), as_buffer=True))
    assert r.nonfinite_buffers and not r.nonfinite_weights and r.faulty
    assert bad_tensors(Holder(_fill(dtype, NAN), as_buffer=True), threshold=10.0)["buffers"] == ["held"]


def _has_inf(dtype: torch.dtype) -> bool:
    return bool(torch.tensor(INF).to(dtype).to(torch.complex128).isinf())  # float8_e4m3fn has no inf (NaN)


@pytest.mark.parametrize("dtype", NAN_ABLE, ids=str)
def test_inf_or_huge_buffer_is_legitimate(dtype):
    for value in (-INF, BIG[dtype][0]) if _has_inf(dtype) else (BIG[dtype][0],):
        model = Holder(_fill(dtype, value), as_buffer=True)
        assert not _step(model, threshold=BIG[dtype][1]).faulty
        assert bad_tensors(model, threshold=BIG[dtype][1]) == {"params": [], "buffers": [], "more": 0, "skipped": []}


@pytest.mark.parametrize("dtype", NAN_ABLE, ids=str)
def test_value_above_threshold_is_a_violation_not_nonfinite(dtype):
    big, threshold = BIG[dtype]
    value = complex(big, -big / 2) if dtype.is_complex else -big
    wide = torch.complex128 if dtype.is_complex else torch.float64
    model = Holder(torch.full((4, 5), big, dtype=wide).to(dtype))  # many big values: the L2 norm may overflow
    with torch.no_grad():
        model.held[0, 0] = value
    r = _step(model, threshold=threshold)
    assert r.violation_weights and not r.nonfinite_weights
    assert not _step(model, threshold=2 * big).faulty  # exactly at the data's scale: no violation
    assert bad_tensors(model, threshold=threshold)["params"] == ["held"]


@pytest.mark.parametrize("dtype", [d for d in NAN_ABLE if _has_inf(d)], ids=str)
def test_inf_parameter_is_nonfinite(dtype):
    r = _step(Holder(_fill(dtype, complex(INF, 0) if dtype.is_complex else INF)))
    assert r.nonfinite_weights and not r.violation_weights and r.weight_norm == INF


@pytest.mark.parametrize("dtype", COMPLEX, ids=str)
def test_complex_threshold_applies_to_the_magnitude(dtype):
    # Each component 8 <= 10, |z| = 8 * sqrt(2) > 10.
    assert _step(Holder(_fill(dtype, complex(8, 8))), threshold=10.0).violation_weights
    assert not _step(Holder(_fill(dtype, complex(6, 8))), threshold=10.0).faulty  # |z| = 10


@pytest.mark.parametrize("dtype", INTS, ids=str)
def test_integer_tensors_are_skipped(dtype):
    # Integers cannot be NaN, and quantized weights are integer codes whose size is not the weight's size.
    top = True if dtype is torch.bool else torch.iinfo(dtype).max
    model = Holder(torch.full((4, 5), top, dtype=dtype))
    assert not _step(model, threshold=10.0).faulty
    assert bad_tensors(model, threshold=10.0)["params"] == []


def test_frozen_int8_parameter_holding_127_is_not_a_violation():
    model = Holder(torch.full((2, 2), 127, dtype=torch.int8))
    assert not model.held.requires_grad
    assert not _step(model, threshold=10.0).faulty


def test_float64_weight_of_1e300_is_a_violation_and_float64_precision_is_kept():
    model = Holder(_fill(torch.float64, 1e300))
    r = _step(model, threshold=1e6)
    assert r.violation_weights and not r.nonfinite_weights
    # 1e39 overflows float32 but is far below this threshold: no narrowing artefact.
    r = _step(Holder(_fill(torch.float64, 1e39)), threshold=1e300)
    assert not r.faulty and r.weight_norm == pytest.approx(1e39)


@pytest.mark.parametrize("dtype", NAN_ABLE, ids=str)
def test_gradients_of_any_dtype(dtype):
    p = torch.nn.Parameter(torch.ones(3, 4, dtype=torch.float32).to(dtype))
    p.grad = torch.ones_like(p)
    r = probe_grads([p], step=0, threshold=10.0)
    assert not r.faulty and math.isfinite(r.grad_norm)
    p.grad = _fill(dtype, NAN, 12).reshape(3, 4)
    r = probe_grads([p], step=0, threshold=10.0)
    assert r.nonfinite_grads and math.isnan(r.grad_norm)
    big, threshold = BIG[dtype]
    p.grad = _fill(dtype, big, 12).reshape(3, 4)
    r = probe_grads([p], step=0, threshold=threshold)
    assert r.violation_grads and not r.nonfinite_grads
    m = torch.nn.Module()
    m.p = p
    assert bad_tensors(m, threshold=threshold, grads=True) == {"params": ["p"], "buffers": [], "more": 0,
                                                             "skipped": []}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_sparse_gradients_are_checked_as_coalesced(dtype):
    emb = torch.nn.Embedding(10, 3, sparse=True).to(dtype)
    emb(torch.tensor([1, 1, 4])).sum().backward()
    assert emb.weight.grad.is_sparse and not probe_grads(emb.parameters(), step=0, threshold=10.0).faulty
    # Two uncoalesced entries at one index: each 6, the gradient element 12 > 10.
    sparse = lambda idx, vals: torch.sparse_coo_tensor(idx, vals, (10, 3), check_invariants=True)  # noqa: E731
    emb.weight.grad = sparse([[2, 2]], torch.full((2, 3), 6.0, dtype=dtype))
    assert probe_grads(emb.parameters(), step=0, threshold=10.0).violation_grads
    emb.weight.grad = sparse([[2]], torch.tensor([[1.0, NAN, 1.0]], dtype=dtype))
    assert probe_grads(emb.parameters(), step=0, threshold=10.0).nonfinite_grads


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def test_double_mlp_trains_and_probes_cleanly_with_an_unnarrowed_loss():
    model = _mlp().double()
    x = torch.randn(16, 4, dtype=torch.float64)
    loss = model(x).pow(2).mean() + 1e-12  # a float64 value float32 cannot hold
    loss.backward()
    assert not probe_grads(model.parameters(), step=0, threshold=1e6).faulty
    r = _step(model, threshold=1e6, loss=loss)
    assert not r.faulty and r.loss == loss.item()


def test_double_gpt2_probes_cleanly():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double()
    ids = torch.randint(0, 32, (2, 8))
    logits = model(input_ids=ids).logits
    assert logits.dtype is torch.float64
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), ids[:, 1:].reshape(-1))
    loss.backward()
    assert not probe_grads(model.parameters(), step=0, threshold=1e6).faulty
    r = _step(model, threshold=1e6, loss=loss)
    assert not r.faulty and r.loss == loss.item() and r.fingerprint is not None


class Mixed(torch.nn.Module):
    """float32 layers with a float64 persistent buffer, a frozen int8 weight and a complex buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("stat64", torch.full((3,), 2.0, dtype=torch.float64))
        self.register_buffer("phase", torch.ones(3, dtype=torch.complex64))
        self.register_buffer("cache", torch.full((2,), NAN), persistent=False)  # not saved: not checked
        self.q = torch.nn.Parameter(torch.full((4, 4), 127, dtype=torch.int8), requires_grad=False)


def test_mixed_dtypes_probe_cleanly_and_name_offenders_by_kind():
    model = Mixed()
    model.lin.weight.grad = torch.ones_like(model.lin.weight)
    assert not probe_grads(model.parameters(), step=0, threshold=10.0).faulty
    r = _step(model, threshold=10.0, loss=torch.tensor(0.5, dtype=torch.float64))
    assert not r.faulty and r.loss == 0.5
    assert bad_tensors(model, threshold=10.0) == {"params": [], "buffers": [], "more": 0, "skipped": []}
    model.stat64[1] = NAN
    model.phase[0] = complex(0, NAN)
    with torch.no_grad():
        model.lin.bias[0] = 50.0
    r = _step(model, threshold=10.0)
    assert r.nonfinite_buffers and r.violation_weights and not r.nonfinite_weights
    assert bad_tensors(model, threshold=10.0) == {"params": ["lin.bias"], "buffers": ["stat64", "phase"],
                                                  "more": 0, "skipped": []}


def test_bad_tensors_truncates_and_counts_the_rest():
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(3)], torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        for i in range(3):
            model[i].weight[0, 0] = NAN
        model[1].bias[0] = -1e9
    model[3].running_mean[0] = NAN
    found = bad_tensors(model, threshold=1e6, limit=2)
    assert found == {"params": ["0.weight", "1.weight"], "buffers": [], "more": 3, "skipped": []}
    found = bad_tensors(model, threshold=1e6)
    assert found["params"] == ["0.weight", "1.weight", "1.bias", "2.weight"]
    assert found["buffers"] == ["3.running_mean"] and found["more"] == 0
    assert bad_parameters(model.named_parameters(), threshold=1e6, limit=2) == ["0.weight", "1.weight"]


def test_bad_tensors_skips_a_tensor_it_cannot_read_and_does_not_raise():
    model = torch.nn.Module()
    model.ok = torch.nn.Parameter(torch.full((2,), NAN))
    model.ghost = torch.nn.Parameter(torch.ones(2, device="meta"))  # no data to read
    assert bad_tensors(model, threshold=1e6) == {"params": ["ok"], "buffers": [], "more": 0, "skipped": ["ghost"]}


@pytest.mark.parametrize(
    ("loss", "nonfinite", "violation"),
    [([1.0, NAN], True, False), ([1.0, INF], True, False), ([1.0, -INF], True, False), ([1.0, 2e6], False, True),
     ([1.0, -2e6], False, True), ([[1.0, 3.0], [5.0, 7.0]], False, False)],
)
def test_every_element_of_a_non_scalar_loss_is_checked(loss, nonfinite, violation):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        t = torch.tensor(loss, dtype=dtype)
        r = probe_step(t, _mlp(), step=0, threshold=1e6)
        assert (r.nonfinite_loss, r.violation_loss) == (nonfinite, violation)
        mean = t.double().mean().item()
        assert r.loss == mean or (math.isnan(r.loss) and math.isnan(mean))


def test_loss_of_other_dtypes():
    model = _mlp()
    assert probe_step(torch.tensor(1e39, dtype=torch.float64), model, step=0, threshold=1e40).faulty is False
    r = probe_step(torch.tensor([3, 5], dtype=torch.int32), model, step=0, threshold=1e6)
    assert not r.faulty and r.loss == 4.0
    r = probe_step(torch.tensor(3 + 4j), model, step=0, threshold=4.5)
    assert r.violation_loss and r.loss == 5.0
    assert probe_step(torch.tensor([1, complex(NAN, 0)]), model, step=0, threshold=1e6).nonfinite_loss
    assert probe_step(torch.tensor([]), model, step=0, threshold=1e6).loss is None
    assert probe_step(None, model, step=0, threshold=1e6).loss is None


def _flip(t: torch.Tensor, bit: int) -> torch.Tensor:
    """A copy of ``t`` with one bit of its storage flipped."""
    out = t.clone()
    raw = torch.view_as_real(out) if out.is_complex() else out
    raw.reshape(-1).view(torch.uint8)[bit // 8] ^= 1 << (bit % 8)
    return out


@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_fingerprint_sees_every_bit_of_every_dtype(dtype):
    torch.manual_seed(0)
    t = (torch.randn(3, 5, dtype=torch.complex128) * 4).to(dtype) if dtype.is_complex else \
        (torch.randn(3, 5) * 4).to(dtype)
    other = torch.ones(7)
    base = int(fingerprint_tensor([other, t]))
    assert int(fingerprint_tensor([other, t.clone()])) == base
    nbits = 1 if dtype is torch.bool else t.element_size() * 8  # a bool byte has one valid bit
    first_element = range(nbits) if dtype is not torch.bool else [0]
    for bit in first_element:
        assert int(fingerprint_tensor([other, _flip(t, bit)])) != base, bit
    assert 0 <= base < 2**52


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation:UserWarning")  # deprecated, still in use
def test_fingerprint_of_a_quantized_tensor_reads_its_integer_codes():
    q = torch.quantize_per_tensor(torch.linspace(-1, 1, 8), 0.01, 0, torch.qint8)
    other = torch.quantize_per_tensor(torch.linspace(-1, 1, 8) + 0.05, 0.01, 0, torch.qint8)
    assert int(fingerprint_tensor([q])) == int(fingerprint_tensor([q.clone()])) != int(fingerprint_tensor([other]))


class CountOps(TorchDispatchMode):
    """Counts the aten ops a block issues."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _probe_ops(dtype: torch.dtype, layers: int, width: int) -> Counter[str]:
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(dtype)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with CountOps() as counted:
        assert not probe_step(torch.tensor(1.0), model, step=0, threshold=1e6).faulty
        assert not probe_grads(model.parameters(), step=0, threshold=1e6).faulty
    return counted.ops


@pytest.mark.parametrize("width", [4, 256], ids=["flat-copy", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_common_case_is_one_fused_norm_and_no_per_tensor_sync(dtype, width):
    # Small tensors take the one-copy path on a CPU, large ones the fused per-tensor kernel: either way the
    # number of ops (norm passes and host syncs included) must not grow with the number of tensors.
    few, many = _probe_ops(dtype, 10, width), _probe_ops(dtype, 40, width)
    assert few == many
    assert few["aten._foreach_norm"] + few["aten._chunk_cat"] == 2  # weights once, gradients once
    assert few["aten._local_scalar_dense"] == 0  # each probe reads back by one tolist()
