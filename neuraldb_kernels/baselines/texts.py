"""Texts whose keys the weight editors preserve (K0): shipped general text and text the model
writes itself, never the prompts an evaluation scores.

The shipped general text (`../shared/data/general`, see its PROVENANCE.md) holds the evaluation
sets of the general-ability tasks. Only two parts are read here: the MMLU dev split (the 5-shot
examples, which no task scores) and LAMBADA passages, minus every passage in `exclude`; a run that
also scores LAMBADA must pass its scored passages there, so that C0 never sees them.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Collection, Optional

import torch


def mmlu_dev_texts(root: os.PathLike) -> list[str]:
    """Each MMLU dev question followed by its four choices, one text per question, subjects in
    file-name order (285 texts). `root` is the general-data folder (holding mmlu/dev/*.csv)."""
    folder = Path(root) / "mmlu" / "dev"
    files = sorted(folder.glob("*_dev.csv"))
    if not files:
        raise FileNotFoundError(f"no MMLU dev files (*_dev.csv) in {folder}")
    texts = []
    for file in files:
        with open(file, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                choices = "\n".join(row[f"choice{i}"] for i in range(4))
                texts.append(f"{row['question']}\n{choices}")
    return texts


def lambada_texts(root: os.PathLike, exclude: Collection[str] = ()) -> list[str]:
    """LAMBADA passages in file order, without the ones in `exclude` (exact text match).
    `root` is the general-data folder (holding lambada/lambada_test.jsonl)."""
    path = Path(root) / "lambada" / "lambada_test.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"LAMBADA passages not found at {path}")
    excluded = set(exclude)
    with open(path, encoding="utf-8") as handle:
        passages = [json.loads(line)["text"] for line in handle if line.strip()]
    return [text for text in passages if text not in excluded]


def general_texts(root: os.PathLike, exclude: Collection[str] = ()) -> list[str]:
    """The MMLU dev texts, then the LAMBADA passages not in `exclude`."""
    return mmlu_dev_texts(root) + lambada_texts(root, exclude)


@torch.no_grad()
def model_written_texts(model, tokenizer, count: int, *, new_tokens: int = 64, seed: int = 0,
                        batch_size: int = 8, prompt: Optional[str] = None) -> list[str]:
    """`count` texts the model writes itself: sampled (temperature 1, no top-k/top-p cut) for
    `new_tokens` tokens from `prompt`, else from the tokenizer's BOS (or EOS) token alone. Seeded:
    the same model, tokenizer and seed give the same texts; the global RNG state is left as it was."""
    for name, value in (("count", count), ("new_tokens", new_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if prompt is not None:
        start = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    else:
        first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if first is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token: pass a prompt")
        start = [first]
    device = next(model.parameters()).device
    texts = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for done in range(0, count, batch_size):
            rows = min(batch_size, count - done)
            ids = torch.tensor([start] * rows, dtype=torch.long, device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=tokenizer.eos_token_id)
            texts.extend(tokenizer.batch_decode(out[:, len(start):], skip_special_tokens=True))
    return texts
