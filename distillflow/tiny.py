"""Tiny local models and tokenizers, built offline (no hub): for tests, the demo and benches.

A tokenizer is a byte-level BPE trained with `tokenizers` on a small corpus, with a chat
template; a model is a Llama built from a config with random weights. Both are saved with
`save_pretrained`, so transformers, vLLM and DeepSpeed all load the same directory.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# Each message is `<|role|>content<|end|>`; generation starts after `<|assistant|>` and
# stops at `<|end|>` (the eos token).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

DEFAULT_CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Explain photosynthesis in one sentence. Plants turn light, water and CO2 into sugar and oxygen.",
    "Write a Python function that adds two numbers. def add(a, b): return a + b",
    "How many legs does a spider have? A spider has eight legs.",
    "Translate 'good morning' to Spanish. Buenos días.",
    "Sum 17 and 25. 17 + 25 = 42.",
    "List three primary colors: red, blue and yellow.",
    "Why is the sky blue? Sunlight scatters off air molecules; blue light scatters most.",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] { } < > : ; , . ! ? ' \" # $ % & @ ^ _ ~ |",
    "The quick brown fox jumps over the lazy dog. ÄÖÜ äöü ß é è ñ ç 日本語 中文 한국어 العربية",
]


def train_tokenizer(out_dir: str | Path, corpus: Iterable[str] | None = None, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer with a chat template and save it to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(corpus) if corpus is not None else DEFAULT_CORPUS
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_llama(
    out_dir: str | Path,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    tokenizer_dir: str | Path | None = None,
):
    """Build a random-weight Llama (+ tokenizer) in `out_dir`; returns (model, tokenizer).

    head_dim = hidden_size / num_heads must be ≥ 32 for vLLM's CPU attention backend.
    With `tokenizer_dir`, reuse that tokenizer (teacher and student share a vocabulary).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        tokenizer.save_pretrained(str(out_dir))
    else:
        tokenizer = train_tokenizer(out_dir, corpus, vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(out_dir))
    return model, tokenizer
