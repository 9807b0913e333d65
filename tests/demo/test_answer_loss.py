"""The demo's answer-weighted loss (``demo/answer_loss.py``) against cross-entropy computed
row group by row group; the real ``axolotl train`` path is the demo smoke test and
``test_extension_effect.py`` (both check the plugin's log line)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from axolotl.utils.dict import DictDefault

from demo.answer_loss import IGNORE, AnswerWeightedLossPlugin, answer_weighted_loss

VOCAB = 7


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    logits = torch.randn(3, 12, VOCAB, requires_grad=True)
    labels = torch.full((3, 12), IGNORE)
    labels[0, :9] = torch.randint(0, VOCAB, (9,))  # a text row, padded after 9 tokens
    labels[1, 8:10] = torch.randint(0, VOCAB, (2,))  # an answer row: prompt unlabelled
    labels[2] = torch.randint(0, VOCAB, (12,))  # a full text row
    return logits, labels


def _token_mean(logits: torch.Tensor, labels: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return F.cross_entropy(
        logits[rows, :-1].reshape(-1, VOCAB), labels[rows, 1:].reshape(-1), ignore_index=IGNORE
    )


def test_loss_is_the_text_mean_plus_the_answer_mean():
    logits, labels = _batch()
    loss = answer_weighted_loss({"logits": logits}, labels)
    expected = _token_mean(logits, labels, [0, 2]) + _token_mean(logits, labels, [1])
    torch.testing.assert_close(loss, expected)
    # Axolotl's own loss, the mean over all labelled tokens, weighs the answer ~2/20
    assert not torch.allclose(loss, _token_mean(logits, labels, [0, 1, 2]))
    loss.backward()
    assert logits.grad is not None and logits.grad[1].abs().sum() > 0


def test_a_batch_of_one_kind_has_one_term():
    logits, labels = _batch()
    for rows in ([0, 2], [1]):
        loss = answer_weighted_loss({"logits": logits[rows]}, labels[rows])
        torch.testing.assert_close(loss, _token_mean(logits, labels, rows))
    nothing = torch.full_like(labels, IGNORE)
    assert answer_weighted_loss({"logits": logits}, nothing).item() == 0.0


def test_plugin_refuses_gradient_accumulation():
    with pytest.raises(ValueError, match="gradient_accumulation_steps: 4"):
        AnswerWeightedLossPlugin().post_trainer_create(
            DictDefault(gradient_accumulation_steps=4), object()
        )


@pytest.mark.parametrize(
    "key", ["sample_packing", "cut_cross_entropy", "liger_fused_linear_cross_entropy"]
)
def test_plugin_refuses_packing_and_fused_losses(key):
    with pytest.raises(ValueError, match=f"{key}: True"):
        AnswerWeightedLossPlugin().post_trainer_create(
            DictDefault({"gradient_accumulation_steps": 1, key: True}), object()
        )
