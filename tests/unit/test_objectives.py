"""Epochs of each objective: the batches that visit its training split once, and the steps epochs come to."""

import numpy as np
import torch

from model import ClassificationObjective, InstructionObjective, PretrainObjective, steps_for_epochs


def test_an_epoch_visits_every_record_once():
    records = [([1, 2, 3], 1)] * 11
    objective = InstructionObjective(records, records[:2], batch_size=4, seed=0, pad_id=0, max_length=8)
    assert objective.batches_per_epoch == 2  # the 3 records short of a batch wait for the next epoch's order
    assert steps_for_epochs(objective, 2, grad_accum_steps=1) == 4
    assert steps_for_epochs(objective, 2, grad_accum_steps=3) == 2  # 4 batches in steps of 3: the last one short
    assert steps_for_epochs(objective, 0.1, grad_accum_steps=1) == 1  # at least one step
    ids, lengths, labels = torch.zeros(10, 5, dtype=torch.long), torch.full((10,), 5), torch.zeros(10, dtype=torch.long)
    classification = ClassificationObjective((ids, lengths, labels), (ids, lengths, labels), batch_size=3, seed=0)
    assert classification.batches_per_epoch == 3


def test_a_pretraining_epoch_is_its_windows_or_its_tokens():
    tokens = np.arange(1000, dtype=np.uint16)
    strided = PretrainObjective(tokens, tokens, block_size=10, batch_size=4, stride=10)
    assert strided.batches_per_epoch == 99 // 4  # 99 windows of 10 (each needs its next token)
    rows = {tuple(strided.batch(i)[0][:, 0].tolist()) for i in range(strided.batches_per_epoch)}
    firsts = [first for batch in rows for first in batch]
    assert len(firsts) == len(set(firsts)) == 4 * 24  # no window twice within the epoch
    sampled = PretrainObjective(tokens, tokens, block_size=10, batch_size=4)
    assert sampled.batches_per_epoch == 1000 // 40
