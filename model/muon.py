"""Muon (MomentUm Orthogonalized by Newton-Schulz, Keller Jordan 2024) for a network's hidden weight matrices.

Muon takes SGD's Nesterov momentum of a matrix's gradient and steps along the nearest semi-orthogonal matrix
instead (U V^T of its SVD U S V^T, approximated by a Newton-Schulz iteration): every direction of the update
moves the same amount, so the few directions that dominate a gradient no longer drown out the rest. It suits
the linear layers inside a transformer; embeddings, output heads and gains/biases are no such matrices and
train with AdamW beside it (model.trainer.make_optimizer), stepped together as one CombinedOptimizer.
"""

import torch
from torch import Tensor

# Quintic coefficients tuned for the largest slope at zero, so five steps lift even small singular values: the
# iteration then leaves every singular value in about [0.7, 1.2] rather than at exactly 1, which trains as well
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: Tensor, steps: int = 5) -> Tensor:
    """About U V^T of the matrix g = U S V^T (its singular values pushed towards 1), in g's shape and dtype."""
    # bfloat16 on CUDA, where tensor cores make it fast and the iteration tolerates its precision; float32 on
    # the CPU, where bfloat16 matrix products are no faster
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T  # iterate on the smaller of the two Gram matrices
    x = x / (x.norm() + 1e-7)  # the Frobenius norm bounds the spectral norm: singular values start within [0, 1]
    a, b, c = NEWTON_SCHULZ
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum SGD whose step of each weight matrix [rows, cols] is orthogonalized.

    An orthogonalized [rows, cols] matrix has entries of root mean square 1 / sqrt(max(rows, cols)); scaling it
    by max(1, rows / cols) ** 0.5 makes that 1 / sqrt(cols) for every shape, so a tall layer (an MLP's c_fc)
    moves as much per weight as a square one of the same fan-in. No weight decay: decoupled decay scales with
    the learning rate, and at Muon's (30 times AdamW's) the trainer's weight_decay would shrink the matrices
    faster than their updates grow them.

    The step uses no randomness and no communication: data-parallel ranks holding the same averaged gradients
    (DDP's) take the same step.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95):
        super().__init__(params, dict(lr=lr, momentum=momentum))
        for group in self.param_groups:
            if any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon trains weight matrices only; give vectors and embeddings to AdamW")

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - momentum)
                update = orthogonalize(p.grad.lerp(buffer, momentum))  # Nesterov: look ahead along the momentum
                p.add_(update, alpha=-group["lr"] * max(1, p.size(0) / p.size(1)) ** 0.5)


class CombinedOptimizer:
    """Several optimizers over disjoint parameters stepped as one, with one optimizer's state_dict layout.

    The state dict numbers the parameters on from one optimizer to the next and lists all their groups in turn,
    so code that saves and restores an optimizer's state (the Trainer's exact resume) handles it unchanged.
    """

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for optimizer in self.optimizers:
            own = optimizer.state_dict()
            state |= {offset + index: slots for index, slots in own["state"].items()}
            groups += [{**group, "params": [offset + index for index in group["params"]]}
                       for group in own["param_groups"]]
            offset += sum(len(group["params"]) for group in own["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        for optimizer in self.optimizers:
            own, groups = groups[:len(optimizer.param_groups)], groups[len(optimizer.param_groups):]
            # torch pairs saved indices with parameters by position, so they need not start at 0
            indices = {index for group in own for index in group["params"]}
            optimizer.load_state_dict({"state": {i: s for i, s in state_dict["state"].items() if i in indices},
                                       "param_groups": own})
        if groups:
            raise ValueError(f"the state holds {len(groups)} parameter groups more than these optimizers")
