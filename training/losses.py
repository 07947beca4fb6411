"""Distillation losses: small pure functions over flat token rows.

Shapes: N = supervised tokens (already selected and shifted: row n of the student output
predicts target n), V = vocabulary, k = teacher top-k, H = hidden size. Every per-token
function returns (N,); the training step sums them and divides by the global count of
supervised tokens of the optimizer step (across micro-batches and processes), which keeps
the loss a true per-token mean under gradient accumulation and uneven lengths.

Divergence conventions (those of TRL's GKD):
- forward KL  = KL(teacher || student) = sum_v p_T(v) (log p_T(v) - log p_S(v)),
- reverse KL  = KL(student || teacher),
- JSD(beta)   = beta * KL(teacher || M) + (1 - beta) * KL(student || M),
                M = beta * teacher + (1 - beta) * student.
  JSD(beta) → 0 at both ends; its slopes there are the two KLs (JSD/beta → forward KL as
  beta → 0, JSD/(1 - beta) → reverse KL as beta → 1), so beta = 0 and beta = 1 are defined
  as forward and reverse KL.

Temperature T divides both models' logits in the KD term, and the KD term is multiplied by
T^2 (Hinton et al.) so that its gradients keep their magnitude as T changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
# Stand-in for log(0) in the top-k tail bucket: exp(-1e4) is 0 in float32, and unlike -inf
# it keeps 0 * (log p - log q) finite in backward.
LOG_FLOOR = -1.0e4
# Rounding noise of a stored teacher tail r = 1 - sum(top-k): the top-k codec (storage/topk.py)
# bounds each probability within 5.3e-5, so a sum over 20 can be off by ~6e-5. The tail used
# is max(0, r^(1/T) - TAIL_NOISE^(1/T)) at temperature T: a shift, not a cut-off, so the loss
# stays continuous in r (a cut-off made r = 0.99e-4 and 1.01e-4 give 0 and most of a tempered target).
TAIL_NOISE = 1.0e-4
# Smooth floor of the student's tail mass: 1 - sum(top-k) in float64 from float32
# log-probabilities is exact to ~1e-7, so below ~1e-6 it is rounding. The floor is
# eps * softplus(mass / eps): equal to the mass above ~30 eps, eps * ln 2 at 0, smooth
# everywhere, so neither the loss nor its gradient jumps anywhere (a hard cut-off did).
STUDENT_TAIL_EPS = 1.0e-6  # (applied alike to the tempered teacher tail, so two empty tails match)


# --------------------------------------------------------------------------------------
# Divergences between two distributions given as log-probabilities
# --------------------------------------------------------------------------------------


def kl_from_logprobs(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row. p_log, q_log: (N, C) log-probabilities → (N,).

    Classes with p = 0 contribute 0 (even where q = 0 too).
    """
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum(-1)


def divergence_from_logprobs(
    student_log: torch.Tensor, teacher_log: torch.Tensor, divergence: str, beta: float = 0.5
) -> torch.Tensor:
    """student_log, teacher_log: (N, C) log-probabilities → (N,) per-token divergence."""
    match divergence:
        case "forward_kl":
            return kl_from_logprobs(teacher_log, student_log)
        case "reverse_kl":
            return kl_from_logprobs(student_log, teacher_log)
        case "jsd":
            if beta == 0.0:
                return kl_from_logprobs(teacher_log, student_log)
            if beta == 1.0:
                return kl_from_logprobs(student_log, teacher_log)
            mixture_log = torch.logaddexp(teacher_log + math.log(beta), student_log + math.log1p(-beta))
            return beta * kl_from_logprobs(teacher_log, mixture_log) + (1 - beta) * kl_from_logprobs(
                student_log, mixture_log
            )
        case _:
            raise ValueError(f"unknown divergence {divergence!r}; use one of {DIVERGENCES}")


def logit_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """(N, V) student and teacher logits → (N,) divergence at temperature T (no T^2 here)."""
    student_log = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return divergence_from_logprobs(student_log, teacher_log, divergence, beta)


# --------------------------------------------------------------------------------------
# Sparse teacher: top-k logprobs plus an explicit tail bucket
# --------------------------------------------------------------------------------------


def topk_coarse_logprobs(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both distributions over k + 1 classes: the teacher's top-k tokens and "everything else".

    student_logits: (N, V); topk_ids: (N, k) distinct token ids; topk_logprobs: (N, k) the
    teacher's natural-log probabilities at T = 1. Returns (student_log, teacher_log), both
    (N, k + 1) log-probabilities; column k is the tail bucket.

    Tail mass: the teacher's tail is r = max(0, 1 - sum(top-k probabilities)), the student's
    1 - sum of its probabilities on the same k ids (from its full softmax, summed in float64,
    under the smooth floor STUDENT_TAIL_EPS). Any divergence between these coarse
    distributions is a lower bound of the full-vocabulary one (data-processing inequality)
    and equals it when the top-k covers the vocabulary (r = 0); unlike renormalising over the
    top-k, it penalises a student that puts too much (or too little) mass outside the
    teacher's top-k.

    At T != 1 the teacher's tail is tempered as ONE token: r_T ∝ r^(1/T). The true tempered
    tail sum_i p_i^(1/T) (over the V - k unseen tokens) is unknown; since x^(1/T) is concave
    for T > 1, it lies between r^(1/T) (all of r on one token) and (V - k)^(1 - 1/T) r^(1/T)
    (r spread evenly). The coarse loss only constrains the student's TOTAL tail mass, and a
    student with shared parameters fits it most cheaply by putting that mass on one token.
    Under the even-spread guess that one token must carry (V - k)^(1 - 1/T) times more
    tempered mass than r allows — at T = 4 and a near-one-hot teacher, more than the top-1
    itself — so it wins the argmax at T = 1 (a collapse onto a garbage token). Under the
    one-token guess a lumped student tail tempers back to exactly r at T = 1, and a spread
    one to less: the student's argmax stays the teacher's. Measured by
    `bench/sparse_kd_tail.py` (docs/training.md). Rounding noise of a stored r is shifted
    away in the tempered domain (TAIL_NOISE), with no threshold: the loss and its gradient
    are continuous in r.
    """
    student_log_full = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
    return topk_coarse_from_logprobs(student_log_full, topk_ids, topk_logprobs, temperature)


def topk_coarse_from_logprobs(
    student_log_full: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `topk_coarse_logprobs`, from the student's (N, V) log-probabilities at temperature T."""
    student_top = student_log_full.gather(-1, topk_ids)  # (N, k)
    return topk_coarse_from_top(student_top, topk_logprobs, student_log_full.shape[-1], temperature)


def topk_coarse_from_top(
    student_top: torch.Tensor, topk_logprobs: torch.Tensor, vocab: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `topk_coarse_logprobs`, from the student's (N, k) log-probabilities on the top-k ids.

    `vocab` is accepted for callers' symmetry; the one-token tail does not depend on it.
    """
    # The student's mass outside the top-k, from (N, k) values only (no extra pass over V),
    # summed in float64, under the smooth floor.
    student_tail_mass = 1.0 - student_top.double().exp().sum(-1, keepdim=True)  # (N, 1)
    student_tail = floored_log_tail(student_tail_mass).float()  # (N, 1)

    teacher = topk_logprobs.float()  # (N, k), T = 1
    tail_mass = (1.0 - teacher.double().exp().sum(-1, keepdim=True)).clamp_min(0.0)  # (N, 1)
    # Tempered as one token (see topk_coarse_logprobs): r_T ∝ r^(1/T), renormalised with the
    # top-k. Rounding noise is shifted away in the tempered domain, r^(1/T) - TAIL_NOISE^(1/T) (at
    # least 0), where the slope in r is finite at the noise level (r^(1/T) alone has none at 0).
    tail_tempered = (tail_mass ** (1.0 / temperature) - TAIL_NOISE ** (1.0 / temperature)).clamp_min(0.0)
    log_tail = torch.log(tail_tempered).clamp_min(LOG_FLOOR).float()  # (N, 1); LOG_FLOOR when empty
    teacher_log = torch.cat([teacher / temperature, log_tail], dim=-1)  # (N, k + 1)
    teacher_log = teacher_log - torch.logsumexp(teacher_log, dim=-1, keepdim=True)
    # The same floor on the tempered teacher tail as on the student's: two empty tails match.
    teacher_log = torch.cat([teacher_log[:, :-1], floored_log_tail(teacher_log[:, -1:].double().exp()).float()], dim=-1)
    student_log = torch.cat([student_top, student_tail], dim=-1)
    return student_log, teacher_log


def floored_log_tail(mass: torch.Tensor) -> torch.Tensor:
    """log(eps * softplus(mass / eps)), eps = STUDENT_TAIL_EPS: log(mass) above ~30 eps, smooth below."""
    return torch.log(STUDENT_TAIL_EPS * F.softplus(mass / STUDENT_TAIL_EPS))


def topk_divergence(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """(N, V) student logits vs the teacher's (N, k) top-k → (N,) divergence over k + 1 classes."""
    student_log, teacher_log = topk_coarse_logprobs(student_logits, topk_ids, topk_logprobs, temperature)
    return divergence_from_logprobs(student_log, teacher_log, divergence, beta)


def uld_from_logprobs(student_log: torch.Tensor, teacher_log: torch.Tensor) -> torch.Tensor:
    """Universal Logit Distillation (Boizard et al. 2024, arXiv 2402.12030) per row: the L1
    distance between the two probability vectors, each sorted in decreasing order, which is
    the optimal-transport distance between them when outcomes cannot be matched by name.

    student_log, teacher_log: (N, C) log-probabilities whose first C - 1 columns are each
    model's top probabilities in decreasing order and whose last column is the rest (tail).
    Returns (N,) in [0, 2]; 0 when the sorted vectors are equal.
    """
    return (student_log.exp() - teacher_log.exp()).abs().sum(-1)


# --------------------------------------------------------------------------------------
# Hidden states
# --------------------------------------------------------------------------------------


def hidden_state_distance(projected_student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """(N, H_teacher) projected student states vs teacher states → (N,).

    mse: mean over features of the squared difference; cosine: 1 - cosine similarity.
    """
    match kind:
        case "mse":
            return (projected_student.float() - teacher.float()).pow(2).mean(-1)
        case "cosine":
            return 1.0 - F.cosine_similarity(projected_student.float(), teacher.float(), dim=-1)
        case _:
            raise ValueError(f"unknown hidden loss {kind!r}; use 'mse' or 'cosine'")


# --------------------------------------------------------------------------------------
# Chunked over tokens: logits exist for one chunk at a time, forward and backward
# --------------------------------------------------------------------------------------


@dataclass
class LossSums:
    """Sums over the tokens given (not means): divide by the global supervised-token count."""

    total: torch.Tensor  # scalar, carries the gradient
    kd: torch.Tensor  # scalar, detached: T^2-scaled divergence sum
    ce: torch.Tensor  # scalar, detached: cross-entropy sum


@dataclass(frozen=True)
class KDSettings:
    divergence: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    alpha: float = 0.5  # weight of the KD term; 1 - alpha weighs cross-entropy
    vocab_size: int | None = None  # keep logits [:vocab_size] (drop padded embedding rows)


def chunk_loss_sums(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    settings: KDSettings,
) -> torch.Tensor:
    """(n, V) logits of one chunk → (3,) sums [alpha*T^2*KD + (1-alpha)*CE, T^2*KD, CE].

    Dense teacher: teacher_logits (n, V). Sparse teacher: topk_ids / topk_logprobs (n, k).
    Neither: cross-entropy only (the KD slot is 0 and alpha is ignored). Differentiable by
    autograd: the chunked loss uses it for the dense teacher, and it is the reference that
    `sparse_chunk_sums_` (sft and kd_topk, gradient in closed form) is tested against.
    """
    if settings.vocab_size is not None:
        student_logits = student_logits[..., : settings.vocab_size]
        if teacher_logits is not None:
            teacher_logits = teacher_logits[..., : settings.vocab_size]
    temperature = settings.temperature
    student_log = F.log_softmax(student_logits.float(), dim=-1)  # (n, V), shared by CE and KD at T = 1
    ce = -student_log.gather(-1, targets[:, None]).sum()
    if teacher_logits is None and topk_ids is None:
        return torch.stack([ce, ce.new_zeros(()), ce])
    if temperature != 1.0:
        student_log = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if teacher_logits is not None:
        teacher_log = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    else:
        student_log, teacher_log = topk_coarse_from_logprobs(student_log, topk_ids, topk_logprobs, temperature)
    kd = divergence_from_logprobs(student_log, teacher_log, settings.divergence, settings.beta).sum()
    kd = kd * temperature**2
    return torch.stack([settings.alpha * kd + (1 - settings.alpha) * ce, kd, ce])


def sparse_chunk_sums_(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    settings: KDSettings,
    with_grad: bool = True,
    *,
    topk_valid: torch.Tensor | None = None,
    row_kind: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sums of `chunk_loss_sums` for sft and kd_topk, and d(total)/d(logits) in closed form.

    student_logits: (n, V), already trimmed to the vocabulary (settings.vocab_size is not
    applied here). On CPU a float32 tensor is overwritten in place (it becomes the
    gradient): pass one that nothing else reads. topk_ids / topk_logprobs: (n, k), or None for cross-entropy
    only. Returns ((3,) sums, (n, V) float32 gradient of sums[0], or None when with_grad is
    False).

    Both terms see the logits z only through log p(v) = z_v / T - logsumexp(z / T) at k + 1
    ids (the target, the teacher's top-k), and d log p(v) / dz = (onehot(v) - softmax(z / T)) / T.
    So the (n, V) gradient is softmax(z) and softmax(z / T), each scaled per row, plus k + 1
    sparse entries per row; autograd runs only over (n, k) tensors, which keeps any divergence
    between the coarse (k + 1)-class distributions exact. At T = 1 the KD term shares the
    cross-entropy's softmax, taken in the logits' buffer on CPU (the only (n, V) tensor);
    at T != 1 there is one more, softmax(z / T).

    Grey-box targets (kd_greybox, training/greybox.py) add `topk_valid` (n, k) bool, False
    on padding slots (both sides leave them to the tail bucket), and `row_kind` (n,) int
    (training.token_align: 0 none, 1 exact, 2 merged, 3 uld). A row of kind none has no
    teacher: cross-entropy alone, at full weight. A uld row's topk_logprobs are the teacher's
    probabilities sorted, without ids: its ids become the student's own top-k and its term
    is the L1 distance between the two sorted (k + 1)-class vectors (`uld_from_logprobs`).
    """
    temperature = settings.temperature
    has_teacher = topk_ids is not None
    ce_weight = 1 - settings.alpha if has_teacher else 1.0  # alpha is ignored without a teacher
    logits = student_logits.float()  # (n, V)
    del student_logits
    taught = uld = None
    if has_teacher and row_kind is not None:
        taught = row_kind != 0  # (n,)
        uld = row_kind == 3  # (n,)
        ce_weight = torch.where(taught, torch.tensor(1 - settings.alpha), torch.tensor(1.0)).to(logits)[:, None]  # (n, 1)
        if bool(uld.any()):  # the student's own top-k ids, sorted by its probability
            topk_ids = topk_ids.clone()
            topk_ids[uld] = logits[uld].topk(topk_ids.shape[-1], dim=-1).indices
    picked_ids = targets[:, None] if not has_teacher else torch.cat([targets[:, None], topk_ids], dim=-1)
    picked = logits.gather(-1, picked_ids)  # (n, 1 + k) logits at the target and the top-k ids
    row_max = logits.amax(dim=-1, keepdim=True)  # (n, 1)
    tempered_probs = None
    if has_teacher and temperature != 1.0:
        tempered_probs = torch.softmax(logits / temperature, dim=-1)  # (n, V)
    # (n, V). In place on CPU, where a fresh buffer of this size costs page faults that take
    # longer than the softmax itself; elsewhere into a new buffer (the caching allocator
    # makes that free), which does not rely on the kernel tolerating aliased input and output.
    if logits.device.type == "cpu":
        probs = torch.softmax(logits, dim=-1, out=logits)
    else:
        probs = torch.softmax(logits, dim=-1)
    del logits
    # logsumexp from the softmax's largest value, exp(max - logsumexp) >= 1/V: unlike a
    # target's own probability, it cannot underflow.
    log_normalizer = row_max - probs.amax(dim=-1, keepdim=True).log()  # (n, 1)
    ce_rows = log_normalizer[:, 0] - picked[:, 0]  # (n,)
    ce = ce_rows.sum()
    weighted_ce = ce_weight * ce if taught is None else (ce_weight[:, 0] * ce_rows).sum()
    if not has_teacher:
        sums = torch.stack([ce, ce.new_zeros(()), ce])
    else:
        if tempered_probs is None:  # T = 1: the KD term shares the cross-entropy's softmax
            tempered_probs, tempered_normalizer = probs, log_normalizer
        else:
            tempered_normalizer = row_max / temperature - tempered_probs.amax(dim=-1, keepdim=True).log()
        # (n, k) student log-probabilities at temperature T on the teacher's top-k ids
        student_top = (picked[:, 1:] / temperature - tempered_normalizer).requires_grad_(with_grad)
        with torch.enable_grad():
            top, teacher_top = student_top, topk_logprobs
            if topk_valid is not None:  # padding slots: no mass on either side (it stays in the tails)
                top = torch.where(topk_valid, student_top, LOG_FLOOR)
                teacher_top = torch.where(topk_valid, topk_logprobs.float(), LOG_FLOOR)
            student_log, teacher_log = topk_coarse_from_top(top, teacher_top, probs.shape[-1], temperature)
            per_row = divergence_from_logprobs(student_log, teacher_log, settings.divergence, settings.beta)
            if taught is not None:
                per_row = torch.where(uld, uld_from_logprobs(student_log, teacher_log), per_row)
                per_row = torch.where(taught, per_row, torch.zeros_like(per_row))
            kd = per_row.sum() * temperature**2
        sums = torch.stack([settings.alpha * kd + weighted_ce, kd, ce]).detach()
    if not with_grad:
        return sums, None

    # d(total)/dz = ce_weight (softmax(z) - onehot(target))
    #             + (alpha / T) sum_j g_j (onehot(id_j) - softmax(z / T)),   g = d(KD)/d(student_top)
    grad = probs  # (n, V), overwritten in place
    sparse_values = -ce_weight * torch.ones_like(picked[:, :1])  # (n, 1) at the target
    if has_teacher:
        (kd_grad,) = torch.autograd.grad(kd, student_top)  # (n, k)
        kd_grad = kd_grad * (settings.alpha / temperature)
        kd_mass = kd_grad.sum(-1, keepdim=True)  # (n, 1)
        if tempered_probs is probs:
            grad.mul_(ce_weight - kd_mass)
        else:
            grad.mul_(ce_weight).addcmul_(tempered_probs, -kd_mass)
        del tempered_probs
        sparse_values = torch.cat([sparse_values, kd_grad], dim=-1)  # (n, 1 + k)
    grad.scatter_add_(-1, picked_ids, sparse_values)
    return sums, grad


class _ChunkedHeadLoss(torch.autograd.Function):
    """Loss of `hidden @ weight.T` computed chunk by chunk, gradients included.

    Forward runs each chunk's forward and backward at once and keeps only the gradients
    w.r.t. the hidden rows (N, H) and the head weight (V, H); every (n, V) tensor of a chunk
    is freed before the next. The (n, V) gradient of the logits comes in closed form for sft
    and kd_topk (`sparse_chunk_sums_`), by autograd for a dense teacher (`chunk_loss_sums`);
    two matmuls turn it into the chunk's share of the two stored gradients. Backward scales them. The head
    weight enters the graph once, however many chunks there are, which keeps ZeRO-3's
    per-parameter gradient hooks in step across processes with different token counts.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, targets, teacher_hidden, teacher_weight, topk_ids, topk_logprobs,
        settings, chunk, hidden_grad, weight_grad, topk_valid=None, row_kind=None,
    ):
        vocab = weight.shape[0] if settings.vocab_size is None else min(settings.vocab_size, weight.shape[0])
        used_weight = weight.detach()[:vocab]  # (V, H): padded embedding rows get no logits
        grad_hidden = torch.zeros_like(hidden) if hidden_grad else None
        # float32 accumulator: a bf16 weight would lose precision summing over many chunks
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight_grad else None
        with_grad = hidden_grad or weight_grad
        sums = hidden.new_zeros(3, dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            chunk_hidden = hidden[rows].detach()  # (n, H)
            if teacher_hidden is None:
                # fresh logits, overwritten in place by their gradient
                chunk_sums, grad_logits = sparse_chunk_sums_(
                    chunk_hidden @ used_weight.T,  # (n, V)
                    targets[rows],
                    None if topk_ids is None else topk_ids[rows],
                    None if topk_logprobs is None else topk_logprobs[rows],
                    settings,
                    with_grad,
                    topk_valid=None if topk_valid is None else topk_valid[rows],
                    row_kind=None if row_kind is None else row_kind[rows],
                )
            else:
                teacher_logits = teacher_hidden[rows] @ teacher_weight[:vocab].T  # (n, V), no grad
                with torch.enable_grad():
                    logits = (chunk_hidden @ used_weight.T).requires_grad_(with_grad)  # (n, V)
                    chunk_sums = chunk_loss_sums(logits, targets[rows], teacher_logits, None, None, settings)
                    grad_logits = torch.autograd.grad(chunk_sums[0], logits)[0] if with_grad else None
                chunk_sums = chunk_sums.detach()
                del logits, teacher_logits  # only the gradient of the logits lives on into the matmuls
            sums += chunk_sums.detach().float()
            if grad_logits is None:
                continue
            grad_logits = grad_logits.to(weight.dtype)  # (n, V)
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ used_weight
            if grad_weight is not None:
                if grad_logits.dtype == torch.float32:
                    grad_weight[:vocab].addmm_(grad_logits.T, chunk_hidden)
                else:
                    grad_weight[:vocab] += grad_logits.T @ chunk_hidden
            del grad_logits
        # Kept on ctx (not save_for_backward) so that backward can hand them over in place.
        ctx.grad_hidden = grad_hidden
        ctx.grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        ctx.handed_over = False
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        if ctx.handed_over:
            raise RuntimeError(
                "the chunked distillation loss was differentiated twice; it computes its gradients "
                "once, in forward: compute the loss again instead of backward(retain_graph=True)"
            )
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        ctx.grad_hidden = ctx.grad_weight = None  # handed over scaled in place: no copy stays behind
        ctx.handed_over = True
        scale = grad_sums[0]  # only the total (slot 0) is differentiated
        return (
            None if grad_hidden is None else grad_hidden.mul_(scale),
            None if grad_weight is None else grad_weight.mul_(scale),
            None, None, None, None, None, None, None, None, None, None, None,
        )


def chunked_distillation_loss(
    student_hidden: torch.Tensor,
    targets: torch.Tensor,
    head_weight: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head_weight: torch.Tensor | None = None,
    topk_ids: torch.Tensor | None = None,
    topk_logprobs: torch.Tensor | None = None,
    topk_valid: torch.Tensor | None = None,
    row_kind: torch.Tensor | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    alpha: float = 0.5,
    chunk_tokens: int = 1024,
    vocab_size: int | None = None,
) -> LossSums:
    """alpha * T^2 * divergence + (1 - alpha) * cross-entropy, summed over N tokens.

    student_hidden: (N, H_s) final (normed) student states; targets: (N,) token ids;
    head_weight: (V, H_s) the student's lm_head weight. White-box: teacher_hidden (N, H_t)
    and teacher_head_weight (V, H_t). Sparse: topk_ids / topk_logprobs (N, k), with
    topk_valid (N, k) and row_kind (N,) for grey-box targets (`sparse_chunk_sums_`). Neither:
    plain cross-entropy (sft). vocab_size trims padded embedding rows of both heads.

    At most `chunk_tokens` rows of logits (and of their softmaxes and gradients) exist at a
    time, so peak memory grows with chunk_tokens x V, not N x V.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; use one of {DIVERGENCES}")
    settings = KDSettings(divergence, beta, temperature, alpha, vocab_size)
    if teacher_hidden is not None:
        teacher_hidden = teacher_hidden.detach()
        teacher_head_weight = teacher_head_weight.detach()
    grad_enabled = torch.is_grad_enabled()  # under no_grad (evaluation) no gradient is computed
    sums = _ChunkedHeadLoss.apply(
        student_hidden, head_weight, targets, teacher_hidden, teacher_head_weight,
        topk_ids, topk_logprobs, settings, max(1, chunk_tokens),
        grad_enabled and student_hidden.requires_grad, grad_enabled and head_weight.requires_grad,
        topk_valid, row_kind,
    )
    return LossSums(sums[0], sums[1].detach(), sums[2].detach())


def select_supervised(states: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift and mask: states (B, L, H) and labels (B, L) → rows (N, H) and targets (N,).

    The state at position t predicts labels[t + 1]; rows whose target is -100 (prompt,
    padding, or a packed neighbour's prompt) are dropped. Order: row-major over (B, L).
    """
    mask = labels[:, 1:] != -100  # (B, L-1)
    return states[:, :-1][mask], labels[:, 1:][mask]
