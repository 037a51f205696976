"""The fused probe: an L2-norm screen with an exact max|x| fallback must give max|x| semantics."""

import math

import pytest
import torch

from gradience.probe import probe_grads, probe_step


def _model(fill: float, n: int = 10_000) -> torch.nn.Module:
    m = torch.nn.Linear(n, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(fill)
    return m


def test_many_small_values_are_no_violation_even_when_the_norm_exceeds_the_threshold():
    r = probe_step(0.0, _model(1.0), step=0, threshold=50.0)  # ||w||_2 = 100 > 50, max|w| = 1
    assert not r.violation_weights and not r.nonfinite_weights
    assert r.weight_norm == 100.0


def test_one_large_value_is_a_violation():
    m = _model(1.0)
    with torch.no_grad():
        m.weight[0, 7] = -60.0
    r = probe_step(0.0, m, step=0, threshold=50.0)
    assert r.violation_weights and not r.nonfinite_weights


def test_finite_values_whose_norm_overflows_are_a_violation_not_nonfinite():
    r = probe_step(0.0, _model(1e30, n=4), step=0, threshold=1e6)  # (1e30)^2 overflows float32
    assert r.violation_weights and not r.nonfinite_weights


def test_nan_and_inf_in_gradients():
    m = _model(1.0, n=8)
    m.weight.grad = torch.zeros_like(m.weight)
    assert not probe_grads(m.parameters(), step=0, threshold=1e6).faulty
    m.weight.grad[0, 3] = float("inf")
    r = probe_grads(m.parameters(), step=0, threshold=1e6)
    assert r.nonfinite_grads and not r.violation_grads
    m.weight.grad[0, 3] = float("nan")
    assert probe_grads(m.parameters(), step=0, threshold=1e6).nonfinite_grads


def test_loss_checks():
    m = _model(1.0, n=8)
    assert probe_step(torch.tensor(float("nan")), m, step=0, threshold=1e6).nonfinite_loss
    assert probe_step(-2e6, m, step=0, threshold=1e6).violation_loss
    assert probe_step(torch.tensor([3.5]), m, step=0, threshold=1e6).loss == 3.5


def _exact_total(tensors):
    parts = [torch.view_as_real(t) if t.is_complex() else t for t in tensors
             if t.is_floating_point() or t.is_complex()]
    return float(torch.linalg.vector_norm(torch.cat([p.reshape(-1).double() for p in parts])))


def test_total_norm_keeps_its_plan_across_steps_and_replans_when_the_tensors_change():
    from gradience.norms import TotalNorm

    torch.manual_seed(0)
    small = [torch.randn(16, 8) for _ in range(6)] + [torch.randn(3)]
    norm = TotalNorm()
    assert float(norm(small)) == pytest.approx(_exact_total(small), rel=1e-6)
    small[2].mul_(3.0)  # same tensors, new values: read afresh
    assert float(norm(small)) == pytest.approx(_exact_total(small), rel=1e-6)
    fresh = [t.clone() * 2 for t in small]  # new tensor objects of the same shapes (gradients each step)
    assert float(norm(fresh)) == pytest.approx(_exact_total(fresh), rel=1e-6)
    fresh[0] = fresh[0].to(torch.float64)  # a dtype changed under the plan: a second group
    assert float(norm(fresh)) == pytest.approx(_exact_total(fresh), rel=1e-6)
    mixed = [torch.randn(4, 4, dtype=torch.bfloat16), torch.randn(5, dtype=torch.complex64), torch.arange(6),
             torch.tensor(2.0), torch.randn(300, 300)]  # bf16, complex, integer (skipped), 0-d, a large tensor
    assert float(norm(mixed)) == pytest.approx(_exact_total(mixed), rel=1e-3)
    mixed[3] = torch.tensor(float("nan"))
    assert math.isnan(float(norm(mixed)))
    assert float(norm([torch.arange(3)])) == 0.0


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_a_sparse_gradient_whose_stored_values_change_size_is_replanned_not_resized():
    """A sparse tensor's size() is its dense size, so the plan's key holds while its stored values grow or shrink:
    the flat buffer must be planned again (torch deprecates resizing an ``out=`` tensor that has elements)."""
    import warnings

    from gradience.norms import TotalNorm

    def coo(nnz: int) -> torch.Tensor:
        rows = torch.randint(0, 50, (nnz,))
        return torch.sparse_coo_tensor(rows[None], torch.randn(nnz, 4), (50, 4), check_invariants=True)

    def csr(nnz: int) -> torch.Tensor:  # a compressed layout: its values change length the same way
        at = torch.randperm(50 * 4)[:nnz]
        return torch.zeros(50 * 4).index_put_((at,), torch.randn(nnz)).reshape(50, 4).to_sparse_csr()

    dense = [torch.randn(8, 4) for _ in range(5)]
    for make in (coo, csr):
        norm = TotalNorm()
        for nnz in (7, 3, 11):
            sparse = make(nnz)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                got = float(norm([*dense, sparse]))
            assert got == pytest.approx(_exact_total([*dense, sparse.to_dense()]), rel=1e-5), (make.__name__, nnz)


def test_the_total_norm_screen_catches_one_inf_among_many_tensors_with_the_flat_copy():
    from gradience.norms import TotalNorm

    tensors = [torch.ones(8, 8) for _ in range(30)]
    norm = TotalNorm()
    assert float(norm(tensors)) == pytest.approx(math.sqrt(30 * 64))
    tensors[17][3, 3] = float("inf")
    assert float(norm(tensors)) == math.inf
    tensors[17][3, 3] = -float("inf")
    assert float(norm(tensors)) == math.inf
