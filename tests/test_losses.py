import pytest
import torch
import torch.nn.functional as F

from sad import losses


def _logits(seed: int, shape=(2, 5, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def test_forward_kl_is_zero_on_identical_distributions():
    logits = _logits(0)
    assert torch.allclose(losses.forward_kl(logits, logits.clone()), torch.zeros(2, 5), atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_forward_kl_equals_torch_kl_div(temperature):
    student, teacher = _logits(1), _logits(2)
    ours = losses.forward_kl(student, teacher, temperature)
    reference = F.kl_div(
        F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
        reduction="none", log_target=True,
    ).sum(-1) * temperature**2
    assert torch.allclose(ours, reference, atol=1e-6)
    assert (ours >= 0).all()


def test_masked_tokens_contribute_nothing_to_gradients():
    student = _logits(3).requires_grad_(True)
    teacher = _logits(4)
    reason = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    act = torch.tensor([[0, 0, 0, 1, 0], [0, 1, 0, 0, 0]])
    per_token = losses.forward_kl(student, teacher)
    loss = losses.sad_loss(per_token, reason, act)
    loss.backward()
    outside = (reason + act) == 0
    assert torch.count_nonzero(student.grad[outside]) == 0
    assert torch.count_nonzero(student.grad[~outside]) > 0


def test_per_kind_mean_matches_hand_computation():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    reason = torch.tensor([[1, 1, 1, 0]])
    act = torch.tensor([[0, 0, 0, 1]])
    # reason mean = 2, act mean = 4 -> 0.5 * 2 + 2 * 4
    got = losses.sad_loss(per_token, reason, act, lambda_reason=0.5, lambda_act=2.0, normalisation="per_kind_mean")
    assert got.item() == pytest.approx(0.5 * 2 + 2.0 * 4)


def test_token_sum_matches_hand_computation():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    reason = torch.tensor([[1, 1, 1, 0]])
    act = torch.tensor([[0, 0, 0, 1]])
    # (0.5 * (1+2+3) + 2 * 4) / 4 generated tokens
    got = losses.sad_loss(per_token, reason, act, lambda_reason=0.5, lambda_act=2.0, normalisation="token_sum")
    assert got.item() == pytest.approx((0.5 * 6 + 2.0 * 4) / 4)


def test_per_kind_mean_and_token_sum_differ_when_kinds_differ_in_length():
    per_token = torch.tensor([[1.0, 1.0, 1.0, 5.0]])
    reason, act = torch.tensor([[1, 1, 1, 0]]), torch.tensor([[0, 0, 0, 1]])
    a = losses.sad_loss(per_token, reason, act, normalisation="per_kind_mean")
    b = losses.sad_loss(per_token, reason, act, normalisation="token_sum")
    assert a.item() == pytest.approx(6.0) and b.item() == pytest.approx(2.0)


def test_empty_masks_give_zero_not_nan():
    per_token = torch.ones(1, 3)
    zero = torch.zeros(1, 3, dtype=torch.long)
    assert losses.sad_loss(per_token, zero, zero).item() == 0.0
    assert losses.token_kd_loss(per_token, zero).item() == 0.0


def test_unknown_normalisation_is_rejected():
    with pytest.raises(ValueError, match="per_kind_mean"):
        losses.sad_loss(torch.ones(1, 2), torch.ones(1, 2), torch.zeros(1, 2), normalisation="mean")


def test_sft_loss_is_cross_entropy_on_masked_positions():
    logits = _logits(5, (1, 3, 7))
    targets = torch.tensor([[1, 2, 3]])
    mask = torch.tensor([[0, 1, 1]])
    expected = F.cross_entropy(logits[0, 1:], targets[0, 1:])
    assert losses.sft_loss(logits, targets, mask).item() == pytest.approx(expected.item(), rel=1e-5)


def test_shift_aligns_next_token_targets():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    ids = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    shifted, t = losses.shift(logits, ids)
    assert shifted.shape == (2, 3, 3) and t.tolist() == [[11, 12, 13], [21, 22, 23]]


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
def test_every_divergence_is_zero_on_identical_and_positive_otherwise(kind):
    a, b = _logits(10), _logits(11)
    assert torch.allclose(losses.logit_divergence(a, a.clone(), kind), torch.zeros(2, 5), atol=1e-6)
    assert (losses.logit_divergence(a, b, kind, temperature=2.0) > 0).all()


def test_reverse_kl_equals_kl_div_with_roles_swapped():
    s, t = _logits(12), _logits(13)
    reference = F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1), reduction="none", log_target=True).sum(-1)
    assert torch.allclose(losses.logit_divergence(s, t, "reverse_kl"), reference, atol=1e-6)


def test_jsd_is_symmetric_at_half_and_matches_its_definition():
    s, t = _logits(14), _logits(15)
    ab = losses.logit_divergence(s, t, "jsd", beta=0.5)
    ba = losses.logit_divergence(t, s, "jsd", beta=0.5)
    assert torch.allclose(ab, ba, atol=1e-6)
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    m = 0.5 * (p + q)
    by_hand = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    assert torch.allclose(ab, by_hand, atol=1e-6)
    assert (ab <= torch.log(torch.tensor(2.0)) + 1e-6).all()  # JSD is bounded by log 2
    assert not torch.allclose(losses.logit_divergence(s, t, "jsd", beta=0.1), losses.logit_divergence(t, s, "jsd", beta=0.1))


def test_skew_kl_interpolates_between_forward_kl_and_zero():
    s, t = _logits(16), _logits(17)
    assert torch.allclose(losses.logit_divergence(s, t, "skew_kl", alpha=0.0), losses.forward_kl(s, t), atol=1e-6)
    assert torch.allclose(losses.logit_divergence(s, t, "skew_kl", alpha=1.0), torch.zeros(2, 5), atol=1e-6)
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    m = 0.3 * p + 0.7 * q
    assert torch.allclose(losses.logit_divergence(s, t, "skew_kl", alpha=0.3), (p * (p / m).log()).sum(-1), atol=1e-6)


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
def test_topk_with_full_vocabulary_equals_the_full_divergence(kind):
    s, t = _logits(18, (6, 7)), _logits(19, (6, 7))
    t_logp = F.log_softmax(t / 2.0, -1)
    values, idx = t_logp.topk(7, dim=-1)
    sparse = losses.topk_divergence(s, values, idx, losses.complement_logsumexp(t_logp, idx), kind, temperature=2.0)
    assert torch.allclose(sparse, losses.logit_divergence(s, t, kind, temperature=2.0), atol=1e-5)


def test_topk_divergence_lumps_the_tail_and_is_zero_on_identical():
    t = _logits(20, (4, 50)) * 3
    logp = F.log_softmax(t, -1)
    values, idx = logp.topk(5, dim=-1)
    tail = losses.complement_logsumexp(logp, idx)
    assert torch.allclose(tail.exp(), 1 - values.exp().sum(-1), atol=1e-6)
    assert torch.allclose(losses.topk_divergence(t, values, idx, tail), torch.zeros(4), atol=1e-5)
    assert (losses.topk_divergence(_logits(21, (4, 50)), values, idx, tail) > 0).all()


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
def test_topk_gradients_are_finite_even_with_an_empty_tail(kind):
    s = _logits(24, (3, 6)).requires_grad_(True)
    t_logp = F.log_softmax(_logits(25, (3, 6)), -1)
    values, idx = t_logp.topk(6, dim=-1)
    losses.topk_divergence(s, values, idx, losses.complement_logsumexp(t_logp, idx), kind).sum().backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
def test_tokens_outside_every_span_get_exactly_zero_gradient(kind):
    student = _logits(22).requires_grad_(True)
    reason = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    act = torch.tensor([[0, 0, 0, 1, 0], [0, 1, 0, 0, 0]])
    per_token = losses.logit_divergence(student, _logits(23), kind)
    for normalisation in ("per_kind_mean", "token_sum"):
        student.grad = None
        losses.sad_loss(per_token, reason, act, 0.7, 1.3, normalisation).backward(retain_graph=True)
        outside = (reason + act) == 0
        assert torch.count_nonzero(student.grad[outside]) == 0
        assert torch.count_nonzero(student.grad[~outside]) > 0


def test_counts_normalise_by_a_global_batch():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    reason, act = torch.tensor([[1, 1, 0, 0]]), torch.tensor([[0, 0, 1, 1]])
    # this shard holds 2 of 4 reason tokens and 2 of 8 act tokens of the global batch
    got = losses.sad_loss(per_token, reason, act, counts=(4, 8))
    assert got.item() == pytest.approx(3 / 4 + 7 / 8)
    got = losses.sad_loss(per_token, reason, act, counts=(4, 8), normalisation="token_sum")
    assert got.item() == pytest.approx(10 / 12)
    assert losses.token_kd_loss(per_token, reason + act, count=10).item() == pytest.approx(1.0)


def test_lambda_zero_drops_a_kind_entirely():
    per_token = torch.tensor([[1.0, float("inf")]])
    reason, act = torch.tensor([[1, 0]]), torch.tensor([[0, 1]])
    assert losses.sad_loss(per_token, reason, act, lambda_reason=1.0, lambda_act=0.0).item() == 1.0


def test_unknown_divergence_is_rejected():
    with pytest.raises(ValueError, match="forward_kl"):
        losses.logit_divergence(_logits(1), _logits(2), "kl")
