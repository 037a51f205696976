"""The fused probe: an L2-norm screen with an exact max|x| fallback must give max|x| semantics."""

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
