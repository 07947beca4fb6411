"""Student and teacher models: loading, deriving a student, and the
module DeepSpeed trains (student + hidden-state projections + the whole loss in forward)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distillflow.training.config import DeriveStudentConfig, TrainingConfig
from distillflow.training.data import Batch
from distillflow.training.losses import chunked_distillation_loss, hidden_state_distance, select_supervised


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a Hugging Face model directory (no config.json); pass a directory "
            "written by save_pretrained"
        )
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)


def load_teacher(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The teacher in inference mode: eval(), no gradients, so no optimizer state either."""
    teacher = load_causal_lm(path, dtype)
    teacher.eval()
    teacher.requires_grad_(False)
    teacher.config.use_cache = False
    return teacher


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"cannot derive a student from {type(model).__name__}: it has no model.layers list "
            "(Llama/Qwen/Mistral-style decoders do); give a student model directory instead"
        )
    return layers


def chosen_layers(num_teacher_layers: int, derive: DeriveStudentConfig) -> list[int]:
    """Teacher layer indices the student keeps: every k-th (0, k, 2k, ...) or n evenly spaced."""
    if derive.num_layers is not None:
        count = min(derive.num_layers, num_teacher_layers)
        return sorted({int(round(x)) for x in np.linspace(0, num_teacher_layers - 1, count)})
    return list(range(0, num_teacher_layers, derive.layer_stride or 1))


def derive_student(
    teacher_dir: str | Path,
    derive: DeriveStudentConfig,
    seed: int = 0,
    calibration: list[torch.Tensor] | None = None,
) -> nn.Module:
    """A student built from the teacher: fewer layers (copied) and/or a narrower width.

    At the teacher's width: embeddings, final norm, lm_head and the chosen blocks are copied
    from the teacher (DistilBERT-style). With only `intermediate_size` set (below the
    teacher's), each copied block's MLP keeps its `intermediate_size` most important neurons
    (`mlp_neuron_importance`, on `calibration` token sequences when given: Minitron-style width
    pruning). With `hidden_size` or `num_attention_heads` set: a randomly initialised model of
    the teacher's architecture with the new width and the chosen number of layers.
    """
    teacher = load_causal_lm(teacher_dir)
    layers = chosen_layers(teacher.config.num_hidden_layers, derive)
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in layers]
    torch.manual_seed(seed)
    if derive.copies_weights:
        kept_neurons = None
        if derive.intermediate_size is not None and derive.intermediate_size < config.intermediate_size:
            importance = mlp_neuron_importance(teacher, calibration)
            kept_neurons = {
                index: importance[index].topk(derive.intermediate_size).indices.sort().values for index in layers
            }
            config.intermediate_size = derive.intermediate_size
        elif derive.intermediate_size is not None and derive.intermediate_size != config.intermediate_size:
            raise ValueError(
                f"derive_student: intermediate_size {derive.intermediate_size} is wider than the "
                f"teacher's {config.intermediate_size}; a copied student can only keep fewer MLP "
                "neurons (set hidden_size too for a fresh, randomly initialised student)"
            )
        student = type(teacher)(config)
        teacher_state = teacher.state_dict()
        student_state = {}
        for name in student.state_dict():
            if not name.startswith("model.layers."):
                student_state[name] = teacher_state[name]
                continue
            index = int(name.split(".")[2])
            weight = teacher_state[name.replace(f"model.layers.{index}.", f"model.layers.{layers[index]}.", 1)]
            if kept_neurons is not None:
                weight = _kept_mlp_slice(name, weight, kept_neurons[layers[index]])
            student_state[name] = weight
        student.load_state_dict(student_state)
        return student
    heads = derive.num_attention_heads or config.num_attention_heads
    hidden = derive.hidden_size or config.hidden_size
    if hidden % heads:
        raise ValueError(
            f"derive_student: hidden_size {hidden} is not divisible by {heads} attention heads; "
            "set num_attention_heads to a divisor"
        )
    config.hidden_size = hidden
    config.num_attention_heads = heads
    config.num_key_value_heads = heads
    config.head_dim = hidden // heads
    config.intermediate_size = derive.intermediate_size or 2 * hidden
    return type(teacher)(config)


def _gated_mlps(model: nn.Module) -> list[nn.Module]:
    """Each block's MLP, when it is gated (gate_proj, up_proj, down_proj: Llama, Qwen, Mistral)."""
    mlps = [getattr(layer, "mlp", None) for layer in _decoder_layers(model)]
    if not all(all(hasattr(mlp, part) for part in ("gate_proj", "up_proj", "down_proj")) for mlp in mlps):
        raise ValueError(
            f"derive_student: pruning MLP neurons (intermediate_size without hidden_size) needs "
            f"gated MLPs (gate_proj, up_proj, down_proj); {type(model).__name__} has none. Set "
            "hidden_size too for a fresh, narrower student"
        )
    return mlps


# Training rows whose tokens measure MLP neuron importance when derive_student prunes.
CALIBRATION_ROWS = 128


def calibration_rows(examples: list[dict[str, np.ndarray]], count: int = CALIBRATION_ROWS) -> list[torch.Tensor]:
    """`count` evenly spaced tokenised examples (prompt and answer tokens): a dataset's rows
    are grouped (seed prompts, then their variants), so the first ones would see one kind."""
    if not examples:
        return []
    picked = np.unique(np.linspace(0, len(examples) - 1, min(count, len(examples))).round().astype(int))
    return [torch.as_tensor(examples[index]["input_ids"], dtype=torch.long) for index in picked]


@torch.no_grad()
def mlp_neuron_importance(model: nn.Module, calibration: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Per block, the importance of each MLP neuron j: the mean size of what it adds to the
    residual stream, E|act(gate_j·x) · up_j·x| · ||down[:, j]|| over the tokens of
    `calibration` (1-D token id tensors, run through the whole model; Minitron's activation
    importance). Without calibration, a weight-only proxy: ||gate_j|| · ||up_j|| · ||down[:, j]||.
    One (intermediate_size,) tensor per block."""
    mlps = _gated_mlps(model)
    down_norms = [mlp.down_proj.weight.float().norm(dim=0) for mlp in mlps]  # (I,) each
    if not calibration:
        return [
            mlp.gate_proj.weight.float().norm(dim=1) * mlp.up_proj.weight.float().norm(dim=1) * down
            for mlp, down in zip(mlps, down_norms)
        ]
    totals = [torch.zeros_like(down) for down in down_norms]
    count = 0

    def accumulate(index: int):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            totals[index] += inputs[0].float().abs().reshape(-1, inputs[0].shape[-1]).sum(0)  # (I,)

        return hook

    handles = [mlp.down_proj.register_forward_pre_hook(accumulate(i)) for i, mlp in enumerate(mlps)]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for sequence in calibration:  # one at a time: no padding in the sums
            model(input_ids=sequence[None].to(device), use_cache=False)
            count += len(sequence)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [total / max(count, 1) * down for total, down in zip(totals, down_norms)]


def _kept_mlp_slice(name: str, weight: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The rows (gate_proj, up_proj, and their biases) or columns (down_proj) of the kept MLP
    neurons; any other weight unchanged."""
    if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.bias")):
        return weight[kept].clone()
    if name.endswith("mlp.down_proj.weight"):
        return weight[:, kept].clone()
    return weight


# --------------------------------------------------------------------------------------
# Vocabulary preflight
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# The module DeepSpeed trains
# --------------------------------------------------------------------------------------


def _hidden_states(model: nn.Module, batch: Batch, all_layers: bool):
    """Run the decoder (no lm_head): (last (B, L, H), tuple of per-layer states or None)."""
    outputs = model.base_model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        output_hidden_states=all_layers,
        use_cache=False,
    )
    return outputs.last_hidden_state, outputs.hidden_states


class DistillationModel(nn.Module):
    """Student (+ hidden-state projections) whose forward returns the loss sums of a batch.

    Everything that touches student weights runs inside forward, so DeepSpeed's ZeRO hooks
    see every use. The teacher is held outside the module tree (no optimizer state, not
    partitioned with the student, not saved in student checkpoints).

    forward(batch) → (4,) tensor of sums over the batch's supervised tokens:
    [total (with gradient), kd, ce, hidden]; divide by the global token count.
    """

    def __init__(self, student: nn.Module, config: TrainingConfig, vocab_size: int | None, teacher=None):
        super().__init__()
        self.student = student
        self.config = config
        self.vocab_size = vocab_size
        self._teacher = [teacher]  # a list keeps it out of named_parameters / state_dict
        self.layer_pairs: list[tuple[int, int]] = []
        self.projections = nn.ModuleList()
        if config.objective == "hidden":
            teacher_layers = teacher.config.num_hidden_layers
            student_layers = student.config.num_hidden_layers
            self.layer_pairs = list(config.hidden_layer_pairs) or [(teacher_layers, student_layers)]
            for teacher_layer, student_layer in self.layer_pairs:
                if teacher_layer > teacher_layers or student_layer > student_layers:
                    raise ValueError(
                        f"hidden_layer_pairs: ({teacher_layer}, {student_layer}) is out of range; "
                        f"the teacher has layers 0..{teacher_layers}, the student 0..{student_layers}"
                    )
                projection = nn.Linear(student.config.hidden_size, teacher.config.hidden_size, bias=False)
                if student.config.hidden_size == teacher.config.hidden_size:
                    nn.init.eye_(projection.weight)  # start as the identity when widths match
                self.projections.append(projection)

    @property
    def teacher(self):
        return self._teacher[0]

    def forward(self, batch: Batch) -> torch.Tensor:
        config = self.config
        hidden_needed = config.objective == "hidden"
        student_last, student_layers = _hidden_states(self.student, batch, hidden_needed)
        rows, targets = select_supervised(student_last, batch.labels)  # (N, H_s), (N,)

        teacher_rows = teacher_weight = None
        teacher_layers = None
        teacher_head = contextlib.nullcontext()
        # on_policy scores with the in-process teacher unless a server's top-k came with the batch.
        sparse_teacher = config.objective in ("kd_topk", "kd_greybox") or (
            config.objective == "on_policy" and batch.topk_ids is not None
        )
        if config.objective in ("kd_logits", "hidden") or (config.objective == "on_policy" and not sparse_teacher):
            with torch.no_grad():
                teacher_last, teacher_layers = _hidden_states(self.teacher, batch, hidden_needed)
            teacher_rows, _ = select_supervised(teacher_last, batch.labels)  # (N, H_t)
            teacher_weight = self.teacher.get_output_embeddings().weight
            if hasattr(teacher_weight, "ds_id"):  # teacher partitioned by ZeRO-3 inference
                import deepspeed

                teacher_head = deepspeed.zero.GatheredParameters([teacher_weight])

        with teacher_head:
            sums = chunked_distillation_loss(
                rows,
                targets,
                self.student.get_output_embeddings().weight,
                teacher_hidden=teacher_rows,
                teacher_head_weight=teacher_weight,
                topk_ids=batch.topk_ids if sparse_teacher else None,
                topk_logprobs=batch.topk_logprobs if sparse_teacher else None,
                topk_valid=batch.topk_valid if sparse_teacher else None,
                row_kind=batch.row_kind if sparse_teacher else None,
                divergence=config.divergence,
                beta=config.beta,
                temperature=config.temperature,
                alpha=0.0 if config.objective == "sft" else 1.0 if batch.student_generated else config.alpha,
                chunk_tokens=config.loss_chunk_tokens,
                vocab_size=self.vocab_size,
            )
        total = sums.total
        hidden_sum = total.new_zeros(())
        for projection, (teacher_layer, student_layer) in zip(self.projections, self.layer_pairs):
            student_states, _ = select_supervised(student_layers[student_layer], batch.labels)
            teacher_states, _ = select_supervised(teacher_layers[teacher_layer], batch.labels)
            hidden_sum = hidden_sum + hidden_state_distance(
                projection(student_states), teacher_states, config.hidden_loss
            ).sum()
        if self.layer_pairs:
            total = total + config.hidden_weight * hidden_sum
        return torch.stack([total, sums.kd, sums.ce, hidden_sum.detach()])
