"""The toy text encoder's own training, done before the UNet's and then frozen, as SD's CLIP text
encoder was trained before (and frozen during) SD's training.

Why not train it jointly with the UNet: a first model did, and after 3,000 steps its encoder had
blown the artist words up (outputs of two artists 27 apart, at norm 16) while the colour words
had collapsed (red vs blue 0.6 apart), so the UNet could not tell colours or objects apart at all.
Here every output position from the first end token on (the end token and the padding, which see
the whole prompt through the causal attention and are what cross-attention reads most) is taught
to name the prompt's artist class, colour and object with linear heads; the heads are thrown
away. The world has only 170 distinct prompts (``all_prompts``), so every step sees all of them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from erasure.toy.world import ARTISTS, COLOURS, NUM_CLASSES, OBJECTS, all_prompts
from ldm.modules.encoders.modules import FrozenCLIPEmbedder


def prompt_labels(prompt: str) -> tuple[int, int, int]:
    """(artist class, colour + 1, object + 1) of a world prompt; 0 means "not said" ("" and bare
    artist names say no colour or object, and "" or `a {colour} {object}` is the blank class)."""
    words = prompt.split()
    colour = COLOURS.index(words[1]) + 1 if len(words) >= 3 and words[0] == "a" else 0
    obj = OBJECTS.index(words[2]) + 1 if colour else 0
    artist_words = words[4:] if colour else words
    artist = ARTISTS.index(" ".join(artist_words)) + 1 if artist_words else 0
    return artist, colour, obj


def train_text_encoder(embedder: FrozenCLIPEmbedder, steps: int, lr: float, seed: int) -> dict[str, object]:
    """Train ``embedder``'s transformer to encode every prompt's attributes (see the module's
    docstring); returns the final loss and per-attribute accuracy over all prompts and positions."""
    if steps < 1:
        raise ValueError(f"text encoder training needs >= 1 step, got {steps}")
    generator = torch.Generator().manual_seed(seed)
    prompts = all_prompts()
    labels = torch.tensor([prompt_labels(p) for p in prompts])
    tokens = embedder.tokenizer(prompts, truncation=True, max_length=embedder.max_length, padding="max_length",
                                return_tensors="pt")["input_ids"]
    end_id = embedder.transformer.config.eos_token_id
    first_end = (tokens == end_id).int().argmax(dim=1)
    positions = torch.arange(tokens.shape[1])[None, :] >= first_end[:, None]  # [P, L]
    sizes = (NUM_CLASSES, len(COLOURS) + 1, len(OBJECTS) + 1)
    hidden = embedder.transformer.config.hidden_size
    heads = nn.Linear(hidden, sum(sizes))
    with torch.no_grad():
        heads.weight.normal_(0.0, hidden**-0.5, generator=generator)
        heads.bias.zero_()
    transformer = embedder.transformer.train()
    transformer.requires_grad_(True)
    optimizer = torch.optim.AdamW([*transformer.parameters(), *heads.parameters()], lr=lr, weight_decay=0.0)
    targets = labels[:, None, :].expand(-1, tokens.shape[1], -1)[positions]  # [N, 3]
    for _ in range(steps):
        states = transformer(input_ids=tokens).last_hidden_state[positions]  # [N, hidden]
        logits = heads(states).split(sizes, dim=-1)
        loss = sum(F.cross_entropy(logit, targets[:, k]) for k, logit in enumerate(logits))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    embedder.freeze()
    accuracy = {name: float((logit.argmax(-1) == targets[:, k]).float().mean())
                for k, (name, logit) in enumerate(zip(("artist", "colour", "object"), logits))}
    return {"steps": steps, "lr": lr, "prompts": len(prompts), "final_loss": round(loss.item(), 5),
            "accuracy": accuracy}
