"""GPTClassifier: a GPT body and an n-class head reading the hidden state of each text's last real token."""

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import GPTConfig
from model.gpt import GPT


class GPTClassifier(nn.Module):
    def __init__(self, config: GPTConfig, n_classes: int):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"a classifier needs at least two classes, got {n_classes}")
        self.config = replace(config, tie_embeddings=True)  # a classifier has no LM head to untie
        self.gpt = GPT(self.config)
        self.head = nn.Linear(config.n_embd, n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_lm(cls, lm: GPT, n_classes: int) -> "GPTClassifier":
        """A classifier whose body starts as a copy of a trained language model's."""
        model = cls(lm.config, n_classes)
        body = {name: tensor for name, tensor in lm.state_dict().items() if not name.startswith("lm_head.")}
        model.gpt.load_state_dict(body)
        return model.to(lm.wte.weight.device)

    @property
    def n_classes(self) -> int:
        return self.head.out_features

    def forward(self, idx: Tensor, lengths: Tensor | None = None,
                targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Class logits [B, n_classes] of right-padded ids idx [B, T] with lengths [B] real tokens each.

        The last real token is the one that has seen the whole text; a padding position after it has
        seen only padding too (the book's classifier reads position -1, which is wrong for padded rows).
        """
        hidden = self.gpt.hidden_states(idx)  # [B, T, C]
        if lengths is None:
            last = hidden[:, -1]
        else:
            if bool((lengths < 1).any()) or bool((lengths > idx.shape[1]).any()):
                raise ValueError("every length must be between 1 and the padded sequence length")
            last = hidden[torch.arange(idx.shape[0], device=idx.device), lengths - 1]
        logits = self.head(last)
        loss = None if targets is None else F.cross_entropy(logits, targets)
        return logits, loss

    @torch.inference_mode()
    def predict_proba(self, idx: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Probabilities [B, n_classes] of every class."""
        return self(idx, lengths)[0].softmax(dim=-1)


def freeze_for_finetune(model: GPTClassifier, trainable_blocks: int = 1) -> int:
    """Train only the last trainable_blocks blocks, the final LayerNorm and the head (as the book does).

    Returns the number of trainable parameters.
    """
    n_blocks = len(model.gpt.blocks)
    if not 0 <= trainable_blocks <= n_blocks:
        raise ValueError(f"trainable_blocks must be between 0 and {n_blocks}, got {trainable_blocks}")
    model.requires_grad_(False)
    for block in model.gpt.blocks[n_blocks - trainable_blocks:]:
        block.requires_grad_(True)
    model.gpt.ln_f.requires_grad_(True)
    model.head.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
