"""Task heads over fused text states: a word-level CRF tagger (MNER) and a marker-pair
relation classifier (MRE)."""

from __future__ import annotations

import torch
from torch import nn
from torchcrf import CRF


def gather_positions(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """states [B, T, H], positions [B, W] (long) -> [B, W, H]."""
    index = positions.unsqueeze(-1).expand(-1, -1, states.size(-1))
    return states.gather(1, index)


class CRFTagger(nn.Module):
    """Dropout -> linear -> CRF over words, each word read at its first sub-token.

    Only first sub-tokens enter the CRF: the states are gathered into a compact word sequence
    (`word_index`, padded, with `word_mask`), so continuation sub-tokens carry no label and the
    CRF transitions link consecutive words, not sub-tokens.
    """

    def __init__(self, hidden_size: int, num_tags: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.emit = nn.Linear(hidden_size, num_tags)
        self.crf = CRF(num_tags, batch_first=True)

    def emissions(self, states: torch.Tensor, word_index: torch.Tensor) -> torch.Tensor:
        return self.emit(self.dropout(gather_positions(states, word_index)))

    def loss(
        self,
        states: torch.Tensor,
        word_index: torch.Tensor,
        word_mask: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Mean negative log-likelihood per sentence."""
        emissions = self.emissions(states, word_index)
        return -self.crf(emissions, labels, mask=word_mask.bool(), reduction="mean")

    @torch.no_grad()
    def decode(
        self, states: torch.Tensor, word_index: torch.Tensor, word_mask: torch.Tensor
    ) -> list[list[int]]:
        """Viterbi tag ids per sentence, one per kept word."""
        return self.crf.decode(self.emissions(states, word_index), mask=word_mask.bool())


class RelationHead(nn.Module):
    """Concat of the states at the head and tail start markers -> dropout -> linear."""

    def __init__(self, hidden_size: int, num_relations: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classify = nn.Linear(2 * hidden_size, num_relations)

    def forward(
        self, states: torch.Tensor, head_pos: torch.Tensor, tail_pos: torch.Tensor
    ) -> torch.Tensor:
        pair = gather_positions(states, torch.stack([head_pos, tail_pos], dim=1))
        return self.classify(self.dropout(pair.flatten(1)))
