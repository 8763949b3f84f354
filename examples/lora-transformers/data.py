"""Corpus, tokenizer, model and training shared by train.py (federated) and compare.py (the baselines).

Everything is built in code, so the example runs offline: a character-level
tokenizer over a fixed alphabet, a templated text corpus per site (three
"domains" with different vocabularies and sentence shapes, sharing some words
such as days and cities), and a tiny Llama-style causal LM created from a
config with seeded random weights. Each site computes the same base model from
the same seed; in real use the base is a pretrained checkpoint baked into the
trainer image or mounted from a volume, and only the LoRA adapter travels.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from typing import Any

# Nothing may be fetched from the Hugging Face hub: the model is built from a config, the tokenizer in code.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# peft calls a transformers API that transformers 5 deprecates; the warning is about their versions, not ours.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

SITES = ("site-a", "site-b", "site-c")
SEED = 0
BLOCK = 64  # characters per training window
BATCH = 16
STEPS_PER_ROUND = 20  # AdamW steps per site per round (one federated round = 3 x 20 steps of 16 windows)
LR = 1e-2
# A larger init than the usual 0.02 gives the frozen random base's tied embeddings/head logits of a useful
# range; a pretrained base would not need it.
INIT_RANGE = 0.2
LORA_RANK = 8
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAIN_SENTENCES = 300
TEST_SENTENCES = 60

ALPHABET = "\n abcdefghijklmnopqrstuvwxyz0123456789.,"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}

DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
CITIES = ["oslo", "lima", "cairo", "quito", "perth", "lyon", "kyiv", "seoul"]
_DOMAINS: dict[str, tuple[str, dict[str, list[str]]]] = {
    # site-a: weather reports
    "site-a": (
        "on {day} the sky over {city} was {sky} and the wind blew from the {dir} at {n} knots.",
        {
            "sky": ["clear", "grey", "cloudy", "stormy", "hazy", "bright"],
            "dir": ["north", "south", "east", "west"],
        },
    ),
    # site-b: recipes
    "site-b": (
        "mix {n} cups of {ing} with a spoon of {spice}, then bake in {city} style for {m} minutes.",
        {
            "ing": ["flour", "rice", "oats", "sugar", "milk", "butter"],
            "spice": ["salt", "cumin", "pepper", "ginger", "cinnamon"],
        },
    ),
    # site-c: football results
    "site-c": (
        "the {team} beat the {team2} {n} to {m} in {city} on {day}.",
        {
            "team": ["lions", "eagles", "sharks", "wolves", "tigers", "bears"],
            "team2": ["lions", "eagles", "sharks", "wolves", "tigers", "bears"],
        },
    ),
}


def encode(text: str) -> list[int]:
    """Character ids of ``text`` (every character must be in ALPHABET)."""
    return [_INDEX[c] for c in text]


def decode(ids: list[int]) -> str:
    return "".join(ALPHABET[i] for i in ids)


def sentences(site: str, count: int, seed: int) -> list[str]:
    """``count`` sentences of ``site``'s domain, drawn with ``seed``."""
    if site not in _DOMAINS:
        raise ValueError(f"unknown site {site!r}; fix: name the job's clients {', '.join(SITES)}")
    template, slots = _DOMAINS[site]
    rng = random.Random(f"{site}-{seed}")
    out = []
    for _ in range(count):
        fill = {k: rng.choice(v) for k, v in slots.items()}
        fill.update(day=rng.choice(DAYS), city=rng.choice(CITIES), n=str(rng.randint(2, 40)), m=str(rng.randint(2, 40)))
        out.append(template.format(**fill))
    return out


def site_tokens(site: str) -> tuple[Any, Any]:
    """(train, held-out) token streams of ``site`` as 1-D int64 tensors."""
    import torch

    train = "\n".join(sentences(site, TRAIN_SENTENCES, seed=1)) + "\n"
    test = "\n".join(sentences(site, TEST_SENTENCES, seed=2)) + "\n"
    return torch.tensor(encode(train), dtype=torch.long), torch.tensor(encode(test), dtype=torch.long)


def make_model() -> Any:
    """The tiny base LM with a LoRA adapter; the same seeded weights on every site and in every baseline."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(ALPHABET), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=BLOCK, tie_word_embeddings=True,
        initializer_range=INIT_RANGE,
    )  # fmt: skip
    base = LlamaForCausalLM(config)
    lora = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, target_modules=LORA_TARGETS)
    return get_peft_model(base, lora)


def adapter(model: Any) -> dict[str, Any]:
    """The adapter's tensors (the only ones that are federated), named as in ``model.state_dict()``."""
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def train_steps(model: Any, tokens: Any, *, steps: int, seed: int) -> float:
    """``steps`` AdamW steps on random BLOCK-long windows of ``tokens``; returns the mean loss."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    model.train()
    total = 0.0
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - BLOCK, (BATCH,), generator=gen)
        batch = torch.stack([tokens[s : s + BLOCK] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item()
    return total / steps


def perplexity(model: Any, tokens: Any) -> float:
    """exp(mean next-token loss) over ``tokens`` cut into consecutive BLOCK-long windows."""
    import torch

    model.eval()
    usable = (len(tokens) // BLOCK) * BLOCK
    blocks = tokens[:usable].view(-1, BLOCK)
    with torch.no_grad():
        loss = model(input_ids=blocks, labels=blocks).loss.item()
    return math.exp(loss)
