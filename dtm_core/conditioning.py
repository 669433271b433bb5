"""Prompt conditioning: class prompts, their encoder, and classifier-free guidance.

The small structural analogue of a text-to-image model (issue #35): a
diffusers ``UNet2DConditionModel`` whose cross-attention (``attn2``) reads
prompt embeddings, so ``attn1``/``attn2`` and their ``to_q``/``to_k``/
``to_v``/``to_out`` exist as in Stable Diffusion and a LoRA on them is the
LoRA a Stable Diffusion user trains.

- **Prompts** come from the dataset's class names through a fixed template:
  "a handwritten seven" for digits, "a photo of a sandal" otherwise.
- **The encoder** is a word-level vocabulary over those prompts with a
  learned embedding and learned positions (:class:`PromptEncoder`). It lives
  inside the model (:class:`PromptUNet2DModel`), is trained with the base,
  and is frozen in fine-tunes, as a Stable Diffusion user keeps the text
  encoder frozen.
- **Label -1 is the empty prompt**: the unconditional branch that prompt
  dropout trains and classifier-free guidance subtracts
  (:func:`guided_eps`).
"""

from __future__ import annotations

from typing import Sequence

import torch

EMPTY = -1  # the label of the empty prompt
PAD = 0  # the token id that pads every prompt (and is the whole empty prompt)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def class_prompts(classes: Sequence[str]) -> list[str]:
    """One prompt per class, in label order: "a handwritten seven" for the digits 0-9, else "a photo of a <name>"."""
    if tuple(classes) == tuple(str(d) for d in range(10)):
        return [f"a handwritten {DIGIT_WORDS[int(c)]}" for c in classes]
    return [f"a photo of a {c.lower()}" for c in classes]


def tokenize(prompts: Sequence[str]) -> tuple[list[str], list[list[int]]]:
    """The prompts' word vocabulary (index 0 is the pad token) and each prompt's ids, padded to one length."""
    words = [p.split() for p in prompts]
    vocab = ["<pad>", *sorted({w for ws in words for w in ws})]
    index = {w: i for i, w in enumerate(vocab)}
    length = max((len(ws) for ws in words), default=1)
    return vocab, [[index[w] for w in ws] + [PAD] * (length - len(ws)) for ws in words]


class PromptEncoder(torch.nn.Module):
    """Labels -> prompt embeddings (batch, prompt length, ``dim``): word embeddings plus learned positions."""

    def __init__(self, prompts: Sequence[str], dim: int):
        super().__init__()
        vocab, ids = tokenize(prompts)
        # row c: prompt c's token ids; the last row is the empty prompt (all pad)
        table = torch.tensor([*ids, [PAD] * len(ids[0])], dtype=torch.long)
        self.register_buffer("tokens", table, persistent=False)
        self.embed = torch.nn.Embedding(len(vocab), dim)
        self.position = torch.nn.Parameter(torch.zeros(table.shape[1], dim))
        torch.nn.init.normal_(self.embed.weight, std=0.02)

    @property
    def num_prompts(self) -> int:
        return self.tokens.shape[0] - 1

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(self.tokens.device).long()
        if ((labels < EMPTY) | (labels >= self.num_prompts)).any():
            raise ValueError(f"prompt labels must lie in -1..{self.num_prompts - 1} (-1: the empty prompt)")
        rows = torch.where(labels == EMPTY, torch.full_like(labels, self.num_prompts), labels)
        return self.embed(self.tokens[rows]) + self.position


def prompt_labels(n: int, num_prompts: int) -> torch.Tensor:
    """The prompts of an evaluation's n samples: sample i gets class i mod C, every class as often."""
    return torch.arange(n) % num_prompts


def drop_prompts(labels: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """``labels`` with each replaced by the empty prompt with probability ``p`` (classifier-free guidance's
    training); draws one uniform number per label from ``generator``."""
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop, torch.full_like(labels, EMPTY), labels)


def guided_eps(model, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps(empty) + ``scale`` (eps(prompt) - eps(empty)), both in one batch.

    Scale 1 is the conditional prediction, 0 the unconditional one.
    """
    if scale == 1.0:
        return model(x, t, class_labels=labels).sample
    t = t.expand(len(x)) if t.dim() == 0 else t
    both = model(torch.cat([x, x]), torch.cat([t, t]),
                 class_labels=torch.cat([labels, torch.full_like(labels, EMPTY)])).sample
    cond, uncond = both.chunk(2)
    return uncond + scale * (cond - uncond)
