"""CASC: SCAN's stacked cross attention plus a multi-label head (Xu et al., TNNLS 2020).

What a reader of the paper looks for: the options (Config), the image and text encoders, the label
head, the CASC module with its evaluation score (CASC.scores, the one place score terms are mixed)
and its training loss (CASC.forward, hinge_loss). The all-pairs cross attention they call is
engine.py, exact and fast; reference.py is the authors' loop it is tested against.

Legend: B batch (n_img == n_cap == B in training), R regions (36), L max words in a batch
(<start> and <end> included), d embed (1024), K labels (500), H label-head hidden (512).
"""
import math
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from engine import (AGGS, NORMS, Side, grouped_cross_attention, head_from_hidden, head_logits, l2norm,
                    label_similarity, local_score, cross_attention, prepare)


@dataclass(frozen=True)
class Config:
    """Model, score and loss hyperparameters (the authors' option names). Defaults = full CASC."""
    vocab_size: int = 8481
    word_dim: int = 300
    embed_size: int = 1024
    img_dim: int = 2048
    num_layers: int = 1
    bi_gru: bool = True
    precomp_enc_type: str = 'basic'
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    raw_feature_norm: str = 'clipped_l2norm'
    cross_attn: str = 'all'
    t2i_agg_func: str = 'Mean'
    i2t_agg_func: str = 'LogSumExp'
    lambda_softmax_avg: float = 9.0  # t2i softmax temperature
    lambda_softmax_lse: float = 4.0  # i2t softmax temperature
    lambda_lse: float = 5.0
    num_labels: int = 500  # 0: no label head (CASC-base / SCAN)
    label_hidden: int = 512
    alpha: float = 0.8  # weight of the local score in the evaluation score
    margin: float = 0.2
    max_violation: bool = True
    label_weight: float = 10.0

    @classmethod
    def from_opt(cls, opt: dict, **overrides) -> 'Config':
        """Build from an options dict (argparse vars or a checkpoint's 'opt'), by field name."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in opt.items() if k in names}, **overrides})

    def __post_init__(self):
        for name, value, allowed in (('raw_feature_norm', self.raw_feature_norm, NORMS),
                                     ('t2i_agg_func', self.t2i_agg_func, AGGS),
                                     ('i2t_agg_func', self.i2t_agg_func, AGGS),
                                     ('cross_attn', self.cross_attn, ('all', 't2i', 'i2t')),
                                     ('precomp_enc_type', self.precomp_enc_type, ('basic', 'weight_norm'))):
            if value not in allowed:
                raise ValueError(f'--{name} {value!r}: expected one of {", ".join(allowed)}')


class EncoderImage(nn.Module):
    """Region features (n, R, img_dim) -> l2-normalized embeddings (n, R, d)."""

    def __init__(self, img_dim: int, embed_size: int, enc_type: str = 'basic', no_imgnorm: bool = False):
        super().__init__()
        self.fc = nn.Linear(img_dim, embed_size)
        self.no_imgnorm = no_imgnorm
        if enc_type == 'weight_norm':
            self.fc = nn.utils.parametrizations.weight_norm(self.fc, dim=None)
        else:  # Xavier uniform, as in SCAN
            r = math.sqrt(6.0) / math.sqrt(img_dim + embed_size)
            nn.init.uniform_(self.fc.weight, -r, r)
            nn.init.zeros_(self.fc.bias)

    def forward(self, images: Tensor) -> Tensor:
        x = self.fc(images)
        return x if self.no_imgnorm else l2norm(x)


class EncoderText(nn.Module):
    """Word ids (n, L) + true lengths (n,) -> word embeddings (n, L, d), zero past each length."""

    def __init__(self, vocab_size: int, word_dim: int, embed_size: int, num_layers: int = 1,
                 bi_gru: bool = True, no_txtnorm: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=bi_gru)
        self.bi_gru, self.no_txtnorm, self.embed_size = bi_gru, no_txtnorm, embed_size
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, captions: Tensor, lengths: Tensor) -> Tensor:
        n, L = captions.shape
        # Packing keeps padding out of the GRU in both directions (spec 8b).
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(captions), lengths.cpu(),
                                                   batch_first=True, enforce_sorted=False)
        out, _ = nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=L)
        if self.bi_gru:  # average the two directions: (n, L, 2d) -> (n, L, d)
            out = (out[..., :self.embed_size] + out[..., self.embed_size:]) / 2
        return out if self.no_txtnorm else l2norm(out)


class LabelHead(nn.Module):
    """f(x) = W2 tanh(W1 x + b1) + b2: (..., d) -> (..., K) label logits."""

    def __init__(self, embed_size: int, hidden: int, num_labels: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_size, hidden)
        self.fc2 = nn.Linear(hidden, num_labels)

    def forward(self, x: Tensor) -> Tensor:
        return self.from_hidden(x @ self.fc1.weight.T)

    def from_hidden(self, h: Tensor, precision: str = 'fp32') -> Tensor:
        """From first-layer products without the bias, W1 x (..., H) -> (..., K) logits
        (engine.head_from_hidden: the one place the second layer is applied)."""
        return head_from_hidden(h, self.fc1.bias, self.fc2.weight, self.fc2.bias, precision)

    def logits(self, hidden: Tensor, precision: str = 'fp32') -> Tensor:
        """From the hidden layer tanh(W1 x + b1) (..., H) -> (..., K) logits (engine.head_logits)."""
        return head_logits(hidden, self.fc2.weight, self.fc2.bias, precision)


class Scores(NamedTuple):
    """Evaluation scores of all pairs of n_img images and n_cap captions."""
    sims: Tensor  # (n_img, n_cap) the ranking score: alpha * local + (1 - alpha) * label (local without a head)
    local: Tensor  # (n_img, n_cap) S_loc
    label: Optional[Tensor]  # (n_img, n_cap) S_label, cosine of the two label distributions; None without a head
    logits_img: Optional[Tensor]  # (n_img, n_cap, K) label logits of each pair's attended image


class Loss(NamedTuple):
    """The training loss of a (global) batch of B matched pairs."""
    loss: Tensor  # scalar: hinge + label_weight * label_loss
    hinge: Tensor  # scalar: SCAN's triplet loss on S_loc
    label_loss: Optional[Tensor]  # scalar: BCE of both label predictions; None without the head's loss
    logits_img: Optional[Tensor]  # (B, K) label logits of the matched pairs' attended images
    targets: Optional[Tensor]  # (B, K) their multi-hot labels


class CASC(nn.Module):
    """Image encoder, text encoder and label head; scores and the training loss."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.img_enc = EncoderImage(cfg.img_dim, cfg.embed_size, cfg.precomp_enc_type, cfg.no_imgnorm)
        self.txt_enc = EncoderText(cfg.vocab_size, cfg.word_dim, cfg.embed_size, cfg.num_layers,
                                   cfg.bi_gru, cfg.no_txtnorm)
        self.head = LabelHead(cfg.embed_size, cfg.label_hidden, cfg.num_labels) if cfg.num_labels else None

    def encode_images(self, images: Tensor) -> Side:
        """images (n, R, img_dim) -> prepared regions."""
        return prepare(self.img_enc(images), None, self.head)

    def encode_captions(self, captions: Tensor, lengths: Tensor) -> Side:
        """captions (n, L) ids, lengths (n,) -> prepared words."""
        mask = torch.arange(captions.size(1), device=captions.device) < lengths.to(captions.device)[:, None]
        return prepare(self.txt_enc(captions, lengths), mask, self.head)

    def scores(self, img: Side, cap: Side, alpha: Optional[float] = None, precision: str = 'fp32') -> Scores:
        """Evaluation scores of all pairs of the prepared images and captions. The one place where
        score terms are fused."""
        cfg = self.cfg
        alpha = cfg.alpha if alpha is None else alpha
        if self.head is None or alpha == 1.0:  # the local score alone: no head work
            att = cross_attention(img._replace(proj=None), cap._replace(proj=None), cfg, precision)
            local = local_score(att, cfg.cross_attn)
            return Scores(local, local, None, None)
        att = cross_attention(img, cap, cfg, precision, self.head.fc1.bias)  # h_*: the head's hidden layers
        local = local_score(att, cfg.cross_attn)
        logits_img = self.head.logits(att.h_img, precision)  # (n_img, n_cap, K)
        label = label_similarity(logits_img, self.head.logits(att.h_txt, precision))
        return Scores(alpha * local + (1 - alpha) * label, local, label, logits_img)

    def forward(self, images: Tensor, captions: Tensor, lengths: Tensor, targets: Optional[Tensor] = None,
                pos_weight: Optional[Tensor] = None, gather=None) -> Loss:
        """Training loss of a batch of B matched pairs (image i with caption i).

        images (B, R, img_dim), captions (B, L), lengths (B,), targets (B, K) multi-hot.
        With several processes (parallel.py), each holds B_p consecutive pairs of the global batch
        and `gather` concatenates a tensor (B_p, ...) of every process into (B, ...), with
        gradients: this process scores its images against all captions, and the loss is the
        global batch's, the same number on every process.

        The invariant torchrun relies on: every term of the loss is computed from gathered tensors
        (the (B, B) scores, the B label logits and targets), so each process holds the whole loss
        and parallel.average_gradients' mean over N processes is the single-process gradient. A
        term computed from this process's share alone would end up scaled by 1/N: gather it first.
        """
        cfg = self.cfg
        use_head = self.head is not None and targets is not None and cfg.label_weight > 0
        img = self.encode_images(images)
        cap = self.encode_captions(captions, lengths)
        if not use_head:
            img, cap = img._replace(proj=None), cap._replace(proj=None)
        first = 0  # the global batch index of this process's first pair
        if gather is not None:
            first = gather.offset
            cap = Side(*(None if t is None else gather(t) for t in cap))  # every caption of the batch
        att = grouped_cross_attention(img, cap, cfg, first)
        sims = local_score(att, cfg.cross_attn)  # (B_p, B): rows of this process's images
        hinge = hinge_loss(sims if gather is None else gather(sims), cfg.margin, cfg.max_violation)
        if not use_head:
            return Loss(hinge, hinge, None, None, None)
        logits = [self.head.from_hidden(att.h_img), self.head.from_hidden(att.h_txt)]  # (B_p, K): matched pairs only
        if gather is not None:
            logits, targets = [gather(x) for x in logits], gather(targets)
        label_loss = sum(F.binary_cross_entropy_with_logits(x, targets, pos_weight=pos_weight) for x in logits)
        return Loss(hinge + cfg.label_weight * label_loss, hinge, label_loss, logits[0], targets)


def hinge_loss(sims: Tensor, margin: float, max_violation: bool) -> Tensor:
    """SCAN's triplet loss; sims (B, B) image-major with matched pairs on the diagonal -> scalar."""
    pos = sims.diagonal()
    eye = torch.eye(sims.size(0), dtype=torch.bool, device=sims.device)
    cost_cap = (margin + sims - pos[:, None]).clamp(min=0).masked_fill(eye, 0)  # image i vs caption j
    cost_img = (margin + sims - pos[None, :]).clamp(min=0).masked_fill(eye, 0)  # caption j vs image i
    if max_violation:  # only the hardest negative per query (VSE++)
        return cost_cap.amax(1).sum() + cost_img.amax(0).sum()
    return cost_cap.sum() + cost_img.sum()
