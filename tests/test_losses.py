"""Distillation losses checked against analytic cases and float64 references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distillflow.training.losses import (
    KDSettings,
    chunk_loss_sums,
    chunked_distillation_loss,
    divergence_from_logprobs,
    logit_divergence,
    select_supervised,
    topk_coarse_logprobs,
    topk_divergence,
    TAIL_NOISE,
)

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]


def logits(n: int = 6, vocab: int = 11, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def reference_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p || q) per row, written out in float64."""
    p = torch.softmax(p_logits.double() / temperature, -1)
    q = torch.softmax(q_logits.double() / temperature, -1)
    return (p * (p.log() - q.log())).sum(-1)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_identical_logits_give_zero(divergence, temperature):
    same = logits()
    loss = logit_divergence(same, same.clone(), divergence, beta=0.3, temperature=temperature)
    assert torch.allclose(loss, torch.zeros_like(loss), atol=1e-6)


def test_forward_and_reverse_kl_match_the_definition():
    student, teacher = logits(seed=1), logits(seed=2)
    forward = logit_divergence(student, teacher, "forward_kl")
    reverse = logit_divergence(student, teacher, "reverse_kl")
    assert torch.allclose(forward.double(), reference_kl(teacher, student), atol=1e-5)  # KL(T || S)
    assert torch.allclose(reverse.double(), reference_kl(student, teacher), atol=1e-5)  # KL(S || T)
    assert not torch.allclose(forward, reverse, atol=1e-3)  # the test can tell them apart


def test_jsd_endpoints_are_the_two_kls_and_its_slopes_agree():
    student, teacher = logits(seed=3, scale=1.0), logits(seed=4, scale=1.0)
    forward = logit_divergence(student, teacher, "forward_kl")
    reverse = logit_divergence(student, teacher, "reverse_kl")
    # Convention (TRL GKD): beta = 0 → forward KL(T||S), beta = 1 → reverse KL(S||T) ...
    assert torch.allclose(logit_divergence(student, teacher, "jsd", beta=0.0), forward)
    assert torch.allclose(logit_divergence(student, teacher, "jsd", beta=1.0), reverse)
    # ... which is what the mixture form tends to, scaled: JSD/beta → KL(T||S) as beta → 0.
    s64, t64 = F.log_softmax(student, -1), F.log_softmax(teacher, -1)  # float64
    eps = 1e-5
    near_zero = divergence_from_logprobs(s64, t64, "jsd", beta=eps) / eps
    near_one = divergence_from_logprobs(s64, t64, "jsd", beta=1 - eps) / eps
    assert torch.allclose(near_zero, forward.double(), rtol=1e-3, atol=1e-4)
    assert torch.allclose(near_one, reverse.double(), rtol=1e-3, atol=1e-4)


def test_jsd_half_is_symmetric_and_bounded():
    student, teacher = logits(seed=5), logits(seed=6)
    ab = logit_divergence(student, teacher, "jsd", beta=0.5)
    ba = logit_divergence(teacher, student, "jsd", beta=0.5)
    assert torch.allclose(ab, ba, atol=1e-6)
    assert (ab >= -1e-7).all() and (ab <= math.log(2) + 1e-6).all()


def test_temperature_divides_logits():
    student, teacher = logits(seed=7), logits(seed=8)
    at_t = logit_divergence(student, teacher, "forward_kl", temperature=3.0)
    assert torch.allclose(at_t.double(), reference_kl(teacher, student, temperature=3.0), atol=1e-5)


def test_t_squared_keeps_gradient_scale_at_high_temperature():
    # d/dz_s [T^2 KL(p_T || p_S)] = T (p_S - p_T) → (z_s - z_t - mean(z_s - z_t)) / V as T → ∞.
    vocab, temperature = 7, 1000.0
    student = logits(n=3, vocab=vocab, seed=9).float().requires_grad_()
    teacher = logits(n=3, vocab=vocab, seed=10).float()
    identity = torch.eye(vocab)  # a head whose logits are its input rows
    sums = chunked_distillation_loss(
        student, torch.zeros(3, dtype=torch.long), identity, teacher_hidden=teacher,
        teacher_head_weight=identity, temperature=temperature, alpha=1.0,
    )
    sums.total.backward()
    difference = (student - teacher).detach()
    expected = (difference - difference.mean(-1, keepdim=True)) / vocab
    assert torch.allclose(student.grad, expected, rtol=2e-2, atol=2e-3)
    # and the KD value is T^2 times the divergence at temperature T
    plain = logit_divergence(student.detach(), teacher, temperature=temperature).sum()
    assert torch.allclose(sums.kd, plain * temperature**2, rtol=1e-4)


def test_alpha_mixes_kd_and_cross_entropy():
    student, teacher = logits(seed=11).float(), logits(seed=12).float()
    targets = torch.randint(0, 11, (6,), generator=torch.Generator().manual_seed(0))
    identity = torch.eye(11)
    sums = chunked_distillation_loss(
        student, targets, identity, teacher_hidden=teacher, teacher_head_weight=identity, alpha=0.25
    )
    ce = F.cross_entropy(student, targets, reduction="sum")
    kd = logit_divergence(student, teacher).sum()
    assert torch.allclose(sums.ce, ce) and torch.allclose(sums.kd, kd, rtol=1e-5)
    assert torch.allclose(sums.total, 0.25 * kd + 0.75 * ce, rtol=1e-5)


def test_masking_ignores_prompt_and_padding_positions():
    batch, length, hidden = 2, 6, 5
    states = torch.randn(batch, length, hidden)
    labels = torch.tensor([[-100, -100, 3, 4, -100, -100], [-100, 1, 2, -100, -100, -100]])
    rows, targets = select_supervised(states, labels)
    # positions t with labels[t + 1] != -100: (0,1), (0,2), (1,0), (1,1)
    assert torch.equal(targets, torch.tensor([3, 4, 1, 2]))
    assert torch.equal(rows, torch.stack([states[0, 1], states[0, 2], states[1, 0], states[1, 1]]))
    # changing anything at masked positions does not change the loss
    head = torch.randn(7, hidden)
    before = chunked_distillation_loss(*select_supervised(states, labels), head).total
    noisy = states.clone()
    noisy[0, 3:] = 100.0
    noisy[1, 2:] = -100.0
    after = chunked_distillation_loss(*select_supervised(noisy, labels), head).total
    assert torch.allclose(before, after)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_equals_dense_when_k_covers_the_vocabulary(divergence, temperature):
    vocab = 13
    student, teacher = logits(n=5, vocab=vocab, seed=13).float(), logits(n=5, vocab=vocab, seed=14).float()
    teacher_log = F.log_softmax(teacher, -1)
    order = torch.argsort(teacher_log, dim=-1, descending=True)  # (N, V): k = V, sorted like a capture
    sparse = topk_divergence(student, order, teacher_log.gather(-1, order), divergence, 0.3, temperature)
    dense = logit_divergence(student, teacher, divergence, 0.3, temperature)
    assert torch.allclose(sparse, dense, atol=1e-5)


def test_topk_tail_bucket_holds_the_mass_outside_the_topk():
    vocab, k = 10, 3
    teacher = logits(n=4, vocab=vocab, seed=15).float()
    teacher_log = F.log_softmax(teacher, -1)
    top_log, top_ids = teacher_log.topk(k, dim=-1)
    student_log, coarse_teacher = topk_coarse_logprobs(teacher, top_ids, top_log)
    # a student equal to the teacher matches the coarse (k + 1)-class teacher exactly
    assert torch.allclose(student_log.exp().sum(-1), torch.ones(4), atol=1e-5)
    tail = 1 - top_log.exp().sum(-1)
    assert torch.allclose(coarse_teacher[:, k].exp(), (tail - TAIL_NOISE) / (1 - TAIL_NOISE), atol=1e-5)
    assert torch.allclose(topk_divergence(teacher, top_ids, top_log), torch.zeros(4), atol=1e-5)
    # moving student mass around inside the tail costs nothing ...
    reshuffled = teacher.clone()
    for row in range(4):
        tail = [v for v in range(vocab) if v not in top_ids[row].tolist()]
        reshuffled[row, tail] = teacher[row, tail[::-1]]
    assert torch.allclose(topk_divergence(reshuffled, top_ids, top_log), torch.zeros(4), atol=1e-5)
    # ... moving it out of the top-k into the tail does
    leaked = teacher.clone().scatter_add(-1, top_ids[:, :1], torch.full((4, 1), -3.0))
    assert (topk_divergence(leaked, top_ids, top_log) > 1e-3).all()


def test_topk_gradients_are_finite_when_the_tail_is_empty():
    vocab = 6
    student = logits(n=3, vocab=vocab, seed=16).float().requires_grad_()
    teacher_log = F.log_softmax(logits(n=3, vocab=vocab, seed=17).float(), -1)
    ids = torch.arange(vocab).expand(3, vocab)
    for divergence in DIVERGENCES:
        student.grad = None
        topk_divergence(student, ids, teacher_log, divergence, 0.5).sum().backward()
        assert torch.isfinite(student.grad).all(), divergence


@pytest.mark.parametrize("objective", ["sft", "kd_logits", "kd_topk"])
def test_chunking_changes_neither_value_nor_gradient(objective):
    """Chunked (4 rows) vs one chunk, and both vs plain autograd through full logits."""
    n, hidden, vocab = 23, 8, 17
    generator = torch.Generator().manual_seed(18)
    states = torch.randn(n, hidden, generator=generator)
    targets = torch.randint(0, vocab, (n,), generator=generator)
    teacher_states = torch.randn(n, hidden, generator=generator)
    teacher_head = torch.randn(vocab, hidden, generator=generator)
    kwargs = {}
    if objective == "kd_logits":
        kwargs = {"teacher_hidden": teacher_states, "teacher_head_weight": teacher_head, "divergence": "jsd"}
    if objective == "kd_topk":
        top_log, top_ids = F.log_softmax(teacher_states @ teacher_head.T, -1).topk(5, dim=-1)
        kwargs = {"topk_ids": top_ids, "topk_logprobs": top_log, "temperature": 2.0}
    results = []
    for chunk in (4, 1000):
        head = torch.linspace(-1, 1, vocab * hidden).view(vocab, hidden).requires_grad_()
        rows = states.clone().requires_grad_()
        total = chunked_distillation_loss(rows, targets, head, chunk_tokens=chunk, **kwargs).total
        (2.0 * total).backward()  # a scaled loss scales both gradients
        results.append((total.detach(), rows.grad, head.grad))
    head = torch.linspace(-1, 1, vocab * hidden).view(vocab, hidden).requires_grad_()
    rows = states.clone().requires_grad_()
    teacher_logits = teacher_states @ teacher_head.T if objective == "kd_logits" else None
    plain = chunk_loss_sums(
        rows @ head.T, targets, teacher_logits, kwargs.get("topk_ids"), kwargs.get("topk_logprobs"),
        KDSettings(kwargs.get("divergence", "forward_kl"), 0.5, kwargs.get("temperature", 1.0), 0.5),
    )[0]
    (2.0 * plain).backward()
    results.append((plain.detach(), rows.grad, head.grad))
    for small, large, reference in zip(*results):
        assert torch.allclose(small, large, rtol=1e-5, atol=1e-6)
        assert torch.allclose(small, reference, rtol=1e-5, atol=1e-6)


def test_padded_vocabulary_rows_are_trimmed():
    student = logits(n=4, vocab=9, seed=19).float()
    padded = torch.cat([student, torch.full((4, 3), 50.0)], dim=-1)  # 3 padded rows, huge logits
    targets = torch.tensor([0, 1, 2, 3])
    trimmed = chunked_distillation_loss(padded, targets, torch.eye(12), vocab_size=9)
    assert torch.allclose(trimmed.total, F.cross_entropy(student, targets, reduction="sum"))


def sparse_teacher(n: int, vocab: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, k) top-k ids and float32 logprobs of a random teacher, sorted like a capture; tail ~ 10-60%."""
    teacher_log = F.log_softmax(logits(n=n, vocab=vocab, seed=seed, scale=1.5), -1).float()
    top_log, top_ids = teacher_log.topk(k, dim=-1)
    return top_ids, top_log


def reference_topk_loss(
    states: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, top_ids: torch.Tensor,
    top_log: torch.Tensor, temperature: float, alpha: float, divergence: str,
) -> torch.Tensor:
    """alpha * T^2 * KD + (1 - alpha) * CE summed over rows, written out in float64 over the full vocabulary.

    The teacher's tail mass r = 1 - sum(top-k) is one token: tempering the (k + 1)-class
    distribution (p^(1/T), renormalised) gives the coarse teacher; the coarse student is its
    full softmax at T on the top-k ids plus the rest.
    """
    z = states.double() @ head.double().T  # (N, V)
    n, vocab = z.shape
    k = top_ids.shape[-1]
    ce = F.cross_entropy(z, targets, reduction="sum")
    top_p = top_log.double().exp()
    tail = (1 - top_p.sum(-1, keepdim=True)).clamp_min(0) ** (1 / temperature)  # (N, 1): the tail as one token,
    tail = (tail - TAIL_NOISE ** (1 / temperature)).clamp_min(0)  # its rounding noise shifted away
    tempered = torch.cat([top_p ** (1 / temperature), tail], -1)  # (N, k + 1): the tail as one token
    teacher = tempered / tempered.sum(-1, keepdim=True)
    student_full = torch.softmax(z / temperature, -1)
    student_top = student_full.gather(-1, top_ids)
    student = torch.cat([student_top, 1 - student_top.sum(-1, keepdim=True)], -1)  # (N, k + 1)
    if divergence == "forward_kl":
        kd = (teacher * (teacher.log() - student.log())).sum()
    else:
        kd = (student * (student.log() - teacher.log())).sum()
    return alpha * temperature**2 * kd + (1 - alpha) * ce


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_topk_tail_at_temperature_matches_a_full_vocabulary_reference(divergence, temperature):
    n, hidden, vocab, k = 9, 6, 40, 5
    generator = torch.Generator().manual_seed(20)
    states = torch.randn(n, hidden, generator=generator)
    head = torch.randn(vocab, hidden, generator=generator)
    targets = torch.randint(0, vocab, (n,), generator=generator)
    top_ids, top_log = sparse_teacher(n, vocab, k, seed=21)
    assert (1 - top_log.exp().sum(-1) > 0.05).all()  # a real tail: the T != 1 tempering matters

    rows, weight = states.clone().requires_grad_(), head.clone().requires_grad_()
    sums = chunked_distillation_loss(
        rows, targets, weight, topk_ids=top_ids, topk_logprobs=top_log, divergence=divergence,
        temperature=temperature, alpha=0.7, chunk_tokens=4,
    )
    sums.total.backward()
    ref_rows, ref_weight = states.double().requires_grad_(), head.double().requires_grad_()
    reference = reference_topk_loss(ref_rows, ref_weight, targets, top_ids, top_log, temperature, 0.7, divergence)
    reference.backward()
    assert torch.allclose(sums.total.double(), reference.detach(), rtol=1e-5)
    assert torch.allclose(rows.grad.double(), ref_rows.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(weight.grad.double(), ref_weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_shortcut_at_temperature_one_equals_the_general_path(divergence):
    """At T = 1 the KD term reuses the cross-entropy's softmax; T = 1 + 1e-6 takes the general path."""
    n, hidden, vocab, k = 11, 6, 30, 4
    generator = torch.Generator().manual_seed(22)
    states = torch.randn(n, hidden, generator=generator)
    head = torch.randn(vocab, hidden, generator=generator)
    targets = torch.randint(0, vocab, (n,), generator=generator)
    top_ids, top_log = sparse_teacher(n, vocab, k, seed=23)
    results = []
    for temperature in (1.0, 1.0 + 1e-6):
        rows, weight = states.clone().requires_grad_(), head.clone().requires_grad_()
        sums = chunked_distillation_loss(
            rows, targets, weight, topk_ids=top_ids, topk_logprobs=top_log, divergence=divergence,
            temperature=temperature, alpha=0.6, chunk_tokens=5,
        )
        sums.total.backward()
        results.append((sums.total, sums.kd, sums.ce, rows.grad, weight.grad))
    # and both equal autograd through the full (N, V) log-softmax
    rows, weight = states.clone().requires_grad_(), head.clone().requires_grad_()
    plain = chunk_loss_sums(rows @ weight.T, targets, None, top_ids, top_log, KDSettings(divergence, 0.5, 1.0, 0.6))
    plain[0].backward()
    results.append((plain[0], plain[1], plain[2], rows.grad, weight.grad))
    for shortcut, general, autograd in zip(*results):
        assert torch.allclose(shortcut, general, rtol=1e-5, atol=1e-6)
        assert torch.allclose(shortcut, autograd, rtol=1e-5, atol=1e-6)


def test_no_gradient_work_under_no_grad_and_one_backward_only():
    n, hidden, vocab = 7, 5, 12
    states = torch.randn(n, hidden).requires_grad_()
    head = torch.randn(vocab, hidden).requires_grad_()
    targets = torch.randint(0, vocab, (n,))
    top_ids, top_log = sparse_teacher(n, vocab, 3, seed=24)
    kwargs = {"topk_ids": top_ids, "topk_logprobs": top_log, "temperature": 2.0}
    with torch.no_grad():
        evaluated = chunked_distillation_loss(states, targets, head, **kwargs)
    trained = chunked_distillation_loss(states, targets, head, **kwargs)
    assert torch.equal(evaluated.total, trained.total.detach())
    trained.total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="differentiated twice"):
        trained.total.backward()


@pytest.mark.parametrize("objective", ["sft", "kd_topk", "kd_logits"])
def test_bfloat16_head_matches_float32(objective):
    """A bf16 model (as under DeepSpeed bf16) gets the float32 loss and gradients, to bf16 precision."""
    n, hidden, vocab = 12, 16, 40
    generator = torch.Generator().manual_seed(25)
    states = torch.randn(n, hidden, generator=generator)
    head = torch.randn(vocab, hidden, generator=generator) * 0.5
    targets = torch.randint(0, vocab, (n,), generator=generator)
    top_ids, top_log = sparse_teacher(n, vocab, 6, seed=26)
    kwargs = {"temperature": 2.0, "chunk_tokens": 5}
    if objective == "kd_topk":
        kwargs |= {"topk_ids": top_ids, "topk_logprobs": top_log}
    if objective == "kd_logits":
        kwargs |= {"teacher_hidden": states.flip(0), "teacher_head_weight": head}
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        rows, weight = states.to(dtype, copy=True).requires_grad_(), head.to(dtype, copy=True).requires_grad_()
        if "teacher_hidden" in kwargs:
            kwargs |= {"teacher_hidden": states.flip(0).to(dtype), "teacher_head_weight": head.to(dtype)}
        sums = chunked_distillation_loss(rows, targets, weight, **kwargs)
        sums.total.backward()
        assert rows.grad.dtype == dtype and weight.grad.dtype == dtype
        results.append((sums.total, rows.grad.float(), weight.grad.float()))
    for full, half in zip(*results):
        assert torch.allclose(full, half, rtol=0.05, atol=0.05 * full.abs().max().item())


# --------------------------------------------------------------------------------------
# Agreement with TRL's GKD loss, a tempered sparse teacher that cannot collapse the student,
# and a loss continuous across every threshold
# --------------------------------------------------------------------------------------


def gkd_reference(student_logits, teacher_logits, beta, temperature):
    """Generalized JSD per token as TRL's GKDTrainer.generalized_jsd_loss defines it (F.kl_div form)."""
    student_log = F.log_softmax(student_logits.double() / temperature, -1)
    teacher_log = F.log_softmax(teacher_logits.double() / temperature, -1)
    if beta == 0:
        return F.kl_div(student_log, teacher_log, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(teacher_log, student_log, reduction="none", log_target=True).sum(-1)
    beta_t = torch.tensor(beta, dtype=torch.float64)
    mixture = torch.logsumexp(torch.stack([student_log + torch.log1p(-beta_t), teacher_log + torch.log(beta_t)]), 0)
    kl_teacher = F.kl_div(mixture, teacher_log, reduction="none", log_target=True).sum(-1)
    kl_student = F.kl_div(mixture, student_log, reduction="none", log_target=True).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_jsd_agrees_with_trl_gkd(beta, temperature):
    student, teacher = logits(n=16, vocab=64, seed=40).float(), logits(n=16, vocab=64, seed=41).float()
    ours = logit_divergence(student, teacher, "jsd", beta=beta, temperature=temperature)
    assert torch.allclose(ours.double(), gkd_reference(student, teacher, beta, temperature), atol=5e-6)


def near_one_hot_topk(n: int, vocab: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A teacher like the demo's: top-1 probability ~0.99+, its tail spread over the vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    top1 = torch.randint(0, vocab, (n,), generator=generator)
    teacher = torch.randn(n, vocab, generator=generator) * 1.5
    teacher[torch.arange(n), top1] += 11.0
    top_log, top_ids = F.log_softmax(teacher, -1).topk(k, dim=-1)
    return top_ids, top_log, top1


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
def test_pure_kd_at_any_temperature_keeps_the_students_argmax_on_the_teachers_top1(temperature):
    """A student with shared parameters (one head, one bias for every row) fitted under pure KD.

    The cheapest way for it to meet a large tempered tail target is one "garbage" token
    taking all rows' tail mass; tempering the tail as if it were spread over V - k tokens
    made that token win the argmax at T = 1 on ~20 % of rows at T = 4.
    """
    n, vocab, k, dim = 256, 256, 8, 16
    top_ids, top_log, top1 = near_one_hot_topk(n, vocab, k, seed=0)
    torch.manual_seed(0)
    features = torch.nn.Parameter(torch.randn(n, dim) * 0.1)  # (N, d) one per row
    head = torch.nn.Parameter(torch.randn(vocab, dim + 1) * 0.1)  # (V, d + 1): shared, with a bias column
    optimizer = torch.optim.Adam([features, head], lr=0.05)
    ones = torch.ones(n, 1)
    for _ in range(300):
        sums = chunked_distillation_loss(
            torch.cat([features, ones], -1), top1, head, topk_ids=top_ids, topk_logprobs=top_log,
            temperature=temperature, alpha=1.0, chunk_tokens=n,
        )
        optimizer.zero_grad()
        (sums.total / n).backward()
        optimizer.step()
    student_logits = torch.cat([features, ones], -1).detach() @ head.detach().T  # (N, V)
    agreement = (student_logits.argmax(-1) == top1).float().mean().item()
    assert agreement >= 0.98, f"T={temperature}: argmax on the teacher's top-1 for {agreement:.1%} of rows"


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_loss_and_gradient_are_continuous_across_the_tail_thresholds(divergence, temperature):
    """Teacher tail crossing TAIL_NOISE and student tail crossing STUDENT_TAIL_EPS: no jumps."""
    from distillflow.training.losses import STUDENT_TAIL_EPS

    vocab, k = 32, 4

    def teacher_with_tail(tail: float) -> tuple[torch.Tensor, torch.Tensor]:
        top_p = torch.tensor([[0.7, 0.2, 0.06, 0.04]], dtype=torch.float64) * (1 - tail)
        return torch.arange(k)[None], top_p.log().float()

    def student_with_tail(tail: float) -> torch.Tensor:
        z = torch.full((1, vocab), math.log(tail / (vocab - k)), dtype=torch.float64)
        z[0, :k] = torch.tensor([0.6, 0.25, 0.1, 0.05], dtype=torch.float64).log() + math.log1p(-tail)
        return z.float()

    def loss_and_grad(student: torch.Tensor, ids: torch.Tensor, top_log: torch.Tensor):
        student = student.clone().requires_grad_()
        loss = topk_divergence(student, ids, top_log, divergence, 0.5, temperature).sum()
        loss.backward()
        return loss.item(), student.grad[0, :k].clone()

    # the teacher's tail, each side of TAIL_NOISE (in float32 the top-k sum is exact to ~1e-7):
    # the differences shrink with the step, and are small for the bounded divergences
    student = student_with_tail(1e-3)
    gaps = []
    for step in (1e-5, 1e-6):
        below = loss_and_grad(student, *teacher_with_tail(TAIL_NOISE - step))
        above = loss_and_grad(student, *teacher_with_tail(TAIL_NOISE + step))
        gaps.append((abs(below[0] - above[0]), (below[1] - above[1]).abs().max().item()))
    assert gaps[1][0] < gaps[0][0] and gaps[1][1] < gaps[0][1], gaps
    if divergence != "reverse_kl":  # reverse KL against an empty teacher tail is log-steep by nature
        assert gaps[1][0] < 0.02 and gaps[1][1] < 0.02, gaps
    # the student's tail, each side of STUDENT_TAIL_EPS (the teacher's tail well above it)
    ids, top_log = teacher_with_tail(1e-2)
    below = loss_and_grad(student_with_tail(STUDENT_TAIL_EPS * 0.995), ids, top_log)
    above = loss_and_grad(student_with_tail(STUDENT_TAIL_EPS * 1.005), ids, top_log)
    # (float32 log-probabilities leave ~1e-7 of rounding in a tail this small; the cut-off this
    # floor replaced jumped by ~6 nats here)
    assert abs(below[0] - above[0]) < 5e-3
    assert torch.allclose(below[1], above[1], rtol=2e-2, atol=1e-3)
