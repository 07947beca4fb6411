"""Training pieces without DeepSpeed: data, preflight, student derivation, config, and every
objective lowering its loss on a tiny teacher/student pair (plain AdamW loop)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from distillflow.training.config import DeriveStudentConfig, TrainingConfig
from distillflow.training.data import IGNORE_INDEX, collate, encode_example, pack_examples, tokenize_dataset
from distillflow.training.launch import build_launch_command
from distillflow.training.losses import select_supervised
from distillflow.training.model import DistillationModel, chosen_layers, derive_student, load_causal_lm, load_teacher
from distillflow.training.vocabulary import VocabularyMismatch, load_tokenizer, vocabulary_preflight


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from tests.fixtures import build_tiny_setup_once

    return build_tiny_setup_once(tmp_path_factory.getbasetemp() / "tiny-distill", num_rows=16)


@pytest.fixture(scope="session")
def tokenizer(tiny):
    return load_tokenizer(tiny["teacher"])


def config_for(tiny, tmp_path, **overrides) -> TrainingConfig:
    values = {
        "dataset_dir": tiny["dataset"],
        "output_dir": tmp_path / "run",
        "student": tiny["student"],
        "teacher": tiny["teacher"],
    }
    return TrainingConfig(**(values | overrides))


# --- data ------------------------------------------------------------------------------


def test_encode_example_supervises_the_answer_and_its_end_token(tokenizer):
    example = encode_example(tokenizer, "What is 2+2?", "It is 4.", system_prompt="Be brief.")
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels)
    supervised = [token for token in labels if token != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == "It is 4.<|end|>"  # the eos after the answer too
    first = labels.index(supervised[0])
    assert all(label == IGNORE_INDEX for label in labels[:first])
    assert labels[first:] == ids[first:]
    assert tokenizer.decode(ids[:first]) == "<|system|>Be brief.<|end|><|user|>What is 2+2?<|end|><|assistant|>"


def test_encode_example_truncates_prompt_left_and_response_right(tokenizer):
    long_prompt, long_answer = "word " * 200, "answer " * 200
    example = encode_example(tokenizer, long_prompt, long_answer, max_length=64)
    assert len(example["input_ids"]) == 64
    supervised = sum(label != IGNORE_INDEX for label in example["labels"])
    assert supervised == 32  # the prompt keeps max_length // 2
    prompt_text = tokenizer.decode(example["input_ids"][:32])
    assert prompt_text.endswith("<|end|><|assistant|>")  # the generation prompt survives


def test_tokenized_cache_is_reused_and_keyed_by_max_length(tiny, tokenizer, tmp_path):
    first = tokenize_dataset(tiny["dataset"], tokenizer, None, 128, tmp_path)
    again = tokenize_dataset(tiny["dataset"], tokenizer, None, 128, tmp_path)
    shorter = tokenize_dataset(tiny["dataset"], tokenizer, None, 16, tmp_path)
    assert len(list(tmp_path.glob("tokenized-*.parquet"))) == 2
    assert all(np.array_equal(a["labels"], b["labels"]) for a, b in zip(first, again))
    assert max(len(e["input_ids"]) for e in shorter) == 16


def test_packed_rows_keep_examples_apart(tiny, tokenizer, tmp_path):
    examples = tokenize_dataset(tiny["dataset"], tokenizer, None, 256, tmp_path)[:3]
    packed = pack_examples(examples, max_length=256)
    assert len(packed) == 1 and packed[0]["segments"] == [len(e["input_ids"]) for e in examples]
    model = load_causal_lm(tiny["student"]).eval()
    with torch.no_grad():
        batch = collate(packed, tokenizer.pad_token_id)
        packed_rows, packed_targets = select_supervised(
            model.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).last_hidden_state,
            batch.labels,
        )
        padded = collate(examples, tokenizer.pad_token_id)  # right-padded, one row each
        rows, targets = select_supervised(
            model.base_model(input_ids=padded.input_ids, position_ids=padded.position_ids, use_cache=False).last_hidden_state,
            padded.labels,
        )
    assert torch.equal(packed_targets, targets)
    assert torch.allclose(packed_rows, rows, atol=1e-5)  # no attention across examples or padding


# --- models ----------------------------------------------------------------------------


def test_vocabulary_preflight_trims_padding_and_names_mismatched_tokenizers(tiny, tokenizer, tmp_path):
    size = len(tokenizer)
    assert vocabulary_preflight(tokenizer, tokenizer, size + 64, size + 128) == size
    from distillflow.training.scratch import train_tokenizer

    other = train_tokenizer(tmp_path / "other-tok", corpus=["completely different text " * 5], vocab_size=300)
    other.name_or_path = "other-tok"
    with pytest.raises(VocabularyMismatch, match="other-tok") as error:
        vocabulary_preflight(tokenizer, other, size, len(other))
    assert str(tiny["teacher"]) in str(error.value) and "sft" in str(error.value)


def test_derived_student_copies_every_kth_teacher_layer(tiny):
    teacher = load_causal_lm(tiny["teacher"])
    assert chosen_layers(4, DeriveStudentConfig(layer_stride=2)) == [0, 2]
    assert chosen_layers(4, DeriveStudentConfig(layer_stride=None, num_layers=3)) == [0, 2, 3]
    student = derive_student(tiny["teacher"], DeriveStudentConfig(layer_stride=2))
    assert student.config.num_hidden_layers == 2
    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert torch.equal(s_state["model.layers.1.mlp.up_proj.weight"], t_state["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(s_state["lm_head.weight"], t_state["lm_head.weight"])
    narrow = derive_student(tiny["teacher"], DeriveStudentConfig(layer_stride=4, hidden_size=32, num_attention_heads=1))
    assert narrow.config.hidden_size == 32 and narrow.config.num_hidden_layers == 1
    assert narrow(torch.tensor([[1, 2, 3]])).logits.shape[-1] == teacher.config.vocab_size


def test_pruned_student_keeps_the_mlp_neurons_that_matter(tiny, tmp_path):
    """intermediate_size alone prunes each copied block's MLP: a teacher whose blocks each have
    a random half of dead neurons (nothing reaches the residual stream) loses nothing."""
    from distillflow.training.model import mlp_neuron_importance

    teacher = load_causal_lm(tiny["teacher"])
    width = teacher.config.intermediate_size
    generator = torch.Generator().manual_seed(0)
    live = []
    with torch.no_grad():
        for layer in teacher.model.layers:
            dead = torch.randperm(width, generator=generator)[: width // 2]
            layer.mlp.down_proj.weight[:, dead] = 0.0
            live.append(sorted(set(range(width)) - set(dead.tolist())))
    teacher.save_pretrained(tmp_path / "teacher")
    load_tokenizer(tiny["teacher"]).save_pretrained(tmp_path / "teacher")
    tokens = torch.tensor([[1, 5, 9, 14, 3, 7, 2]])
    calibration = [torch.randint(3, 40, (12,), generator=generator) for _ in range(4)]
    for sequences in (calibration, None):  # measured activations, and the weight-only proxy
        importance = mlp_neuron_importance(teacher, sequences)
        assert all(sorted(scores.topk(width // 2).indices.tolist()) == kept for scores, kept in zip(importance, live))
        derive = DeriveStudentConfig(layer_stride=1, intermediate_size=width // 2)
        student = derive_student(tmp_path / "teacher", derive, calibration=sequences)
        assert student.config.intermediate_size == width // 2 and student.config.num_hidden_layers == 4
        assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
        torch.testing.assert_close(student(tokens).logits, teacher(tokens).logits, rtol=1e-4, atol=1e-5)
    # Two of four blocks, pruned: copied rows of the kept neurons, in the teacher's order.
    student = derive_student(tmp_path / "teacher", DeriveStudentConfig(layer_stride=2, intermediate_size=width // 2))
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight[live[2]])
    with pytest.raises(ValueError, match="wider than the teacher's"):
        derive_student(tmp_path / "teacher", DeriveStudentConfig(layer_stride=2, intermediate_size=2 * width))


def test_config_checks_ranges_and_says_what_is_missing(tiny, tmp_path):
    with pytest.raises(ValueError, match="needs a teacher"):
        TrainingConfig(dataset_dir=tmp_path, output_dir=tmp_path, student=tiny["student"], objective="kd_logits")
    with pytest.raises(ValueError, match="student"):
        TrainingConfig(dataset_dir=tmp_path, output_dir=tmp_path)
    with pytest.raises(ValueError):
        config_for(tiny, tmp_path, beta=1.5)
    with pytest.raises(ValueError):
        config_for(tiny, tmp_path, temperature=0)
    with pytest.raises(ValueError, match="Extra inputs"):
        config_for(tiny, tmp_path, learning_rat=0.1)


def test_launch_command_uses_this_interpreter_and_torchrun_for_several_processes(tmp_path):
    assert build_launch_command(tmp_path / "c.yaml", 1) == [
        sys.executable, "-m", "distillflow.training.train", "--config", str(tmp_path / "c.yaml")
    ]
    command = build_launch_command("c.yaml", 2, master_port=29999)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[command.index("--nproc_per_node") + 1] == "2"
    assert command[command.index("--master_port") + 1] == "29999"
    assert command[-4:] == ["-m", "distillflow.training.train", "--config", "c.yaml"]


# --- every objective learns --------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"objective": "sft"},
        {"objective": "kd_logits", "divergence": "forward_kl", "temperature": 2.0},
        {"objective": "kd_logits", "divergence": "reverse_kl"},
        {"objective": "kd_logits", "divergence": "jsd", "beta": 0.5},
        {"objective": "kd_topk", "alpha": 0.9},
        {"objective": "hidden", "hidden_loss": "mse", "hidden_layer_pairs": [(2, 1), (4, 2)]},
        {"objective": "hidden", "hidden_loss": "cosine"},
    ],
    ids=lambda o: "-".join(str(v) for k, v in o.items() if k in ("objective", "divergence", "hidden_loss")),
)
def test_each_objective_lowers_its_loss(tiny, tokenizer, tmp_path, overrides):
    from distillflow.training.data import attach_topk

    config = config_for(tiny, tmp_path, loss_chunk_tokens=16, **overrides)
    teacher = load_teacher(tiny["teacher"]) if config.objective in ("kd_logits", "hidden") else None
    torch.manual_seed(0)
    model = DistillationModel(load_causal_lm(tiny["student"]), config, len(tokenizer), teacher)
    examples = tokenize_dataset(tiny["dataset"], tokenizer, None, 128, tmp_path)
    if config.objective == "kd_topk":
        attach_topk(examples, tiny["dataset"])
    batch = collate(examples[:6], tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        sums = model(batch)  # (4,) sums: total, kd, ce, hidden
        loss = sums[0] / batch.num_supervised
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    if config.objective != "sft":
        assert sums[1] > 0  # the KD term is really there
    if config.objective == "hidden":
        assert sums[3] > 0


def test_entry_point_exits_non_zero_with_a_clear_message(tiny, tmp_path, capsys, monkeypatch):
    from distillflow.training.train import main

    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(name, value)  # main() fills these in; keep them out of other tests

    config = tmp_path / "bad.yaml"
    config.write_text(f"training:\n  dataset_dir: {tmp_path}\n  output_dir: {tmp_path}/run\n  studnet: x\n")
    assert main(["--config", str(config)]) == 1
    message = capsys.readouterr().err
    assert "training.studnet: unknown key" in message
