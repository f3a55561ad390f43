"""CASC: SCAN's stacked cross attention plus a multi-label head (Xu et al., TNNLS 2020).

Legend: B batch (n_img == n_cap == B in training), R regions (36), L max words in a batch
(<start> and <end> included), d embed (1024), K labels (500), H label-head hidden (512).

The all-pairs scores use three exact identities, so no (pairs x L x d)
tensor ever exists:
  * one product S = V W^T of all regions with all words serves t2i (words attend to regions)
    and i2t (regions attend to words);
  * the attended context c_q = sum_c a_qc x_c is never formed: q . c_q = sum_c a_qc s_qc and
    ||c_q||^2 = a_q^T G a_q with the context's Gram matrix G (R x R per image, L x L per caption);
  * the label head's first layer is linear, so W1 mean_q(c_q) = (mean_q a_q)^T (X W1^T): each
    region and word goes through W1 once, not every pair's context.
reference.py holds the authors' loop algorithm that these scores are tested against. For CPU
inference, fused.py (fused.cpp) computes everything after the product in one pass per pair.
"""
import math
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import fused

EPS = 1e-8
# Axes of the all-pairs region-word tensors (n_img, R, n_cap, L): the direction of attention is
# named by the axis it normalizes over (t2i: words query regions; i2t: regions query words).
REGION_AXIS, WORD_AXIS = 1, 3
NORMS = ('clipped_l2norm', 'l2norm', 'clipped_l1norm', 'l1norm', 'clipped', 'softmax', 'no_norm')
AGGS = ('Mean', 'Max', 'Sum', 'LogSumExp')
PRECISIONS = ('fp32', 'tf32', 'bf16')  # of the region-word product (region_word_product)


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


def safe_sqrt(x: Tensor) -> Tensor:
    """sqrt that is 0 with a zero (not NaN) gradient where x <= 0: zero vectors are padding."""
    pos = x > 0
    return torch.where(pos, x, 1.0).sqrt() * pos


def l2norm(x: Tensor, dim: int = -1) -> Tensor:
    """x / (||x||_2 + 1e-8) along dim; all-zero (padded) vectors stay zero with finite gradients."""
    return x / (safe_sqrt(x.pow(2).sum(dim, keepdim=True)) + EPS)


def softmax_last(x: Tensor) -> Tensor:
    """Softmax over the last axis. PyTorch's CPU kernel is ~10x slower when that axis is shorter
    than 16, so short ones are padded with -inf (exp(-inf) = 0: the same result)."""
    n = x.size(-1)
    if n >= 16:
        return torch.softmax(x, -1)
    return torch.softmax(F.pad(x, (0, 16 - n), value=-math.inf), -1)[..., :n]


def scaled_raw(x: Tensor, how: str, dim: int, lam: float, pad_bias: Tensor) -> Tensor:
    """lam * (raw scores normalized along the query axis `dim`, WORD_AXIS for t2i, REGION_AXIS for
    i2t). x (n_img, R, n_cap, L): region-word scores, already clipped (LeakyReLU) for the clipped_*
    norms, exactly zero on padded words; pad_bias (1, 1, n_cap, L) is 0 on real words and -inf on
    padding, so padding never enters a softmax."""
    if how == 'softmax':
        return lam * (softmax_last(x + pad_bias) if dim == WORD_AXIS else torch.softmax(x, dim))
    if how.endswith('l2norm'):  # (not vector_norm: 20x slower along the region axis on CPU)
        return x * (lam / (safe_sqrt(x.pow(2).sum(dim, keepdim=True)) + EPS))
    if how.endswith('l1norm'):
        return x * (lam / (x.abs().sum(dim, keepdim=True) + EPS))
    return x * lam  # 'clipped', 'no_norm'


def aggregate(rel: Tensor, mask: Optional[Tensor], how: str, lambda_lse: float) -> Tensor:
    """Pool relevances (..., Lq) over the query axis, ignoring masked-out queries -> (...)."""
    if mask is None:
        mask = torch.ones_like(rel, dtype=torch.bool)
    if how == 'Mean':
        return (rel * mask).sum(-1) / mask.sum(-1)
    if how == 'Sum':
        return (rel * mask).sum(-1)
    if how == 'Max':
        return rel.masked_fill(~mask, -math.inf).amax(-1)
    return torch.logsumexp(lambda_lse * rel.masked_fill(~mask, -math.inf), -1) / lambda_lse


class Side(NamedTuple):
    """One modality's items, prepared once for all their pairs (regions of images or words of captions)."""
    emb: Tensor  # (n, N, d) region or word embeddings, zero on padding
    mask: Optional[Tensor]  # (n, N) bool, True on real words; None for regions (all real)
    norm: Tensor  # (n, N) ||x||
    gram: Tensor  # (n, N, N) x_a . x_b
    proj: Optional[Tensor]  # (n, N, H) x W1^T, the label head's first layer (bias excluded)


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
        return self.fc2(torch.tanh(self.fc1(x)))

    def from_hidden(self, h: Tensor, precision: str = 'fp32') -> Tensor:
        """Second half, from first-layer products without the bias, W1 x (..., H) -> (..., K). A
        pair-axes-transposed view (n_img, n_cap, H) of caption-major memory is scored in place and
        returned as the same view. bf16: W2's product from bfloat16 inputs, as region_word_product."""
        swap = h.dim() == 3 and not h.is_contiguous() and h.transpose(0, 1).is_contiguous()
        h = h.transpose(0, 1) if swap else h
        if fused.plain(h, self.fc2.weight) and h.is_contiguous() and h.size(-1) % 8 == 0:
            hidden = fused.bias_tanh(h, self.fc1.bias)  # one pass instead of two; ATen's tanh is slow on the CPU
        else:
            hidden = torch.tanh(h + self.fc1.bias)
        hidden = hidden.flatten(0, -2)  # (pairs, H): one GEMM, its bias fused in addmm
        if precision == 'bf16':
            logits = (hidden.bfloat16() @ self.fc2.weight.bfloat16().T).to(h.dtype) + self.fc2.bias
        else:
            logits = torch.addmm(self.fc2.bias, hidden, self.fc2.weight.T)
        logits = logits.view(*h.shape[:-1], -1)
        return logits.transpose(0, 1) if swap else logits


def label_similarity(logits_img: Tensor, logits_txt: Tensor) -> Tensor:
    """cos(sigmoid(f(u_img)), sigmoid(f(u_txt))) over K: (..., K), (..., K) -> (...)."""
    if logits_img.dim() == 3 and fused.plain(logits_img, logits_txt) and logits_img.stride(-1) == logits_txt.stride(-1) == 1:
        return fused.label_cosine(logits_img, logits_txt)  # one pass, either pair order of memory
    p, q = torch.sigmoid(logits_img), torch.sigmoid(logits_txt)
    norms = torch.linalg.vector_norm(p, dim=-1) * torch.linalg.vector_norm(q, dim=-1)
    return torch.linalg.vecdot(p, q) / norms.clamp_min(EPS)


def region_word_product(a: Tensor, b: Tensor, precision: str = 'fp32') -> Tensor:
    """a (M, d) @ b (N, d)^T, the one large product, in `precision`: fp32 (exact), bf16 (inputs
    rounded to bfloat16, float32 result) or tf32 (inputs rounded to TF32's 10-bit mantissa). On
    CUDA, tf32 means the tensor cores, switched on once at start-up (util.set_precision) for
    every float32 product; elsewhere this product's TF32 rounding is emulated here."""
    if precision == 'bf16':
        return (a.bfloat16() @ b.bfloat16().T).to(a.dtype)
    if precision == 'tf32' and not a.is_cuda:  # round to nearest on the 13 mantissa bits that TF32 drops
        a, b = (((x.float().view(torch.int32) + 0x1000) & -0x2000).view(torch.float32).to(x.dtype) for x in (a, b))
    return a @ b.T


class QuadForm(torch.autograd.Function):
    """||c_q||^2 = a_q^T G a_q for every query of every pair, where c_q = sum_c a_qc x_c.

    attn (n_img, R, n_cap, L); gram (n_img, R, R) when regions are the context (t2i, -> (n_img,
    n_cap, L)) or (n_cap, L, L) when words are (i2t, -> (n_img, R, n_cap)). Backward recomputes
    G a instead of keeping it: one (pairs x R x L) tensor less per direction in training."""

    @staticmethod
    def _batched(attn: Tensor, over_words: bool) -> Tensor:
        """-> (batch, context, queries): per image (R, n_cap*L), or per caption (L, n_img*R)."""
        n_img, R, n_cap, L = attn.shape
        if over_words:
            return attn.permute(2, 3, 0, 1).reshape(n_cap, L, n_img * R)
        return attn.reshape(n_img, R, n_cap * L)

    @staticmethod
    def forward(ctx, attn: Tensor, gram: Tensor, over_words: bool) -> Tensor:
        ctx.save_for_backward(attn, gram)
        ctx.over_words = over_words
        n_img, R, n_cap, L = attn.shape
        a = QuadForm._batched(attn, over_words)
        quad = (a * torch.bmm(gram, a)).sum(1)  # (batch, queries)
        return quad.view(n_cap, n_img, R).permute(1, 2, 0) if over_words else quad.view(n_img, n_cap, L)

    @staticmethod
    def backward(ctx, grad: Tensor):
        attn, gram = ctx.saved_tensors
        n_img, R, n_cap, L = attn.shape
        a = QuadForm._batched(attn, ctx.over_words)
        g = (grad.permute(2, 0, 1).reshape(n_cap, 1, n_img * R) if ctx.over_words
             else grad.reshape(n_img, 1, n_cap * L))  # (batch, 1, queries)
        grad_a = 2 * torch.bmm(gram, a) * g  # G is symmetric
        grad_a = (grad_a.view(n_cap, L, n_img, R).permute(2, 3, 0, 1) if ctx.over_words
                  else grad_a.view_as(attn))
        grad_gram = torch.bmm(a * g, a.transpose(1, 2)) if ctx.needs_input_grad[1] else None
        return grad_a, grad_gram, None


def prepare(emb: Tensor, mask: Optional[Tensor], head: Optional[LabelHead]) -> Side:
    """Per-item quantities shared by all of an item's pairs: emb (n, N, d) -> Side."""
    if mask is not None:  # padded words exactly zero, so their raw scores are exactly zero
        emb = emb * mask[..., None]
    norm = torch.linalg.vector_norm(emb, dim=-1)  # (n, N)
    gram = emb @ emb.transpose(1, 2)  # (n, N, N)
    proj = None if head is None else emb @ head.fc1.weight.T  # (n, N, H)
    return Side(emb, mask, norm, gram, proj)


def _region_word(img: Side, cap: Side, cfg: Config, precision: str) -> tuple:
    """-> s_rw (n_img, R, n_cap, L) region-word dot products v_r . w_l of every pair, raw (the
    same, clipped for the clipped_* norms), pad_bias (1, 1, n_cap, L): 0 on real words, -inf on padding."""
    n_img, R, d = img.emb.shape
    n_cap, L, _ = cap.emb.shape
    s_rw = region_word_product(img.emb.reshape(n_img * R, d), cap.emb.reshape(n_cap * L, d), precision)
    s_rw = s_rw.view(n_img, R, n_cap, L)
    pad_bias = torch.zeros_like(cap.norm).masked_fill_(~cap.mask, -math.inf)[None, None]
    raw = F.leaky_relu(s_rw, 0.1) if cfg.raw_feature_norm.startswith('clipped') else s_rw
    return s_rw, raw, pad_bias


def t2i_attention(img: Side, cap: Side, cfg: Config, precision: str = 'fp32') -> Tensor:
    """Where each word looks: (n_img, n_cap, L, R), word l's t2i attention over the regions of
    each image (sums to 1 over R on real words, 0 on padded words): the weights of S_t2i."""
    _, raw, pad_bias = _region_word(img, cap, cfg, precision)
    attn = torch.softmax(scaled_raw(raw, cfg.raw_feature_norm, WORD_AXIS, cfg.lambda_softmax_avg, pad_bias),
                         REGION_AXIS)
    return attn.permute(0, 2, 3, 1) * cap.mask[None, :, :, None]  # (n_img, R, n_cap, L) -> (n_img, n_cap, L, R)


class Attended(NamedTuple):
    """cross_attention's results for n_img images and n_cap captions."""
    s_t2i: Tensor  # (n_img, n_cap) text-to-image relevance, aggregated over words
    s_i2t: Tensor  # (n_img, n_cap) image-to-text relevance, aggregated over regions
    h_img: Optional[Tensor]  # (n_img, n_cap, H) W1 u_img (LabelHead.from_hidden adds b1), when the sides
    h_txt: Optional[Tensor]  # (n_img, n_cap, H) W1 u_txt: ... carry head projections; else None


def cross_attention(img: Side, cap: Side, cfg: Config, precision: str = 'fp32') -> Attended:
    """All pairs of n_img images and n_cap captions, both directions at once. u_img is the mean
    over words of the t2i attended image contexts, u_txt the mean over regions of the i2t word
    contexts; h_* are their first label-head layer W1 u (bias excluded)."""
    if fused.applies(img, cap, cfg.raw_feature_norm):  # CPU inference: the same numbers in one pass (fused.cpp)
        return _fused_cross_attention(img, cap, cfg, precision)
    s_rw, raw, pad_bias = _region_word(img, cap, cfg, precision)
    h_img = h_txt = None

    # t2i: words query regions. Normalize over words, softmax over regions.
    attn = torch.softmax(scaled_raw(raw, cfg.raw_feature_norm, WORD_AXIS, cfg.lambda_softmax_avg, pad_bias),
                         REGION_AXIS)  # (n_img, R, n_cap, L)
    dot = (attn * s_rw).sum(REGION_AXIS)  # w_l . c_l: (n_img, n_cap, L)
    ctx_norm = safe_sqrt(QuadForm.apply(attn, img.gram, False))  # ||c_l|| = sqrt(a^T G a): (n_img, n_cap, L)
    rel = dot / (cap.norm[None] * ctx_norm).clamp_min(EPS)
    s_t2i = aggregate(rel, cap.mask[None], cfg.t2i_agg_func, cfg.lambda_lse)
    if img.proj is not None:  # u_img's attention: mean over real words, (n_img, n_cap, R)
        word_weight = cap.mask.to(attn.dtype) / cap.mask.sum(1, keepdim=True)  # (n_cap, L)
        h_img = torch.bmm((attn * word_weight).sum(WORD_AXIS).transpose(1, 2), img.proj)  # (n_img, n_cap, H)
    del attn, dot, rel

    # i2t: regions query words. Normalize over regions, softmax over the real words.
    logits = scaled_raw(raw, cfg.raw_feature_norm, REGION_AXIS, cfg.lambda_softmax_lse, pad_bias)
    attn = softmax_last(logits + pad_bias)  # (n_img, R, n_cap, L)
    del logits, raw
    dot = (attn * s_rw).sum(WORD_AXIS)  # v_r . c_r: (n_img, R, n_cap)
    ctx_norm = safe_sqrt(QuadForm.apply(attn, cap.gram, True))  # ||c_r||: (n_img, R, n_cap)
    rel = dot / (img.norm[:, :, None] * ctx_norm).clamp_min(EPS)
    s_i2t = aggregate(rel.transpose(1, 2), None, cfg.i2t_agg_func, cfg.lambda_lse)
    if cap.proj is not None:  # u_txt's attention: mean over regions, (n_cap, n_img, L)
        h_txt = torch.bmm(attn.mean(REGION_AXIS).transpose(0, 1), cap.proj).transpose(0, 1)  # (n_img, n_cap, H)
    return Attended(s_t2i, s_i2t, h_img, h_txt)


def _fused_cross_attention(img: Side, cap: Side, cfg: Config, precision: str) -> Attended:
    """cross_attention by fused.cpp: only the product and the head's small batched products are
    full-size tensors; the rest happens per pair, in cache."""
    n_img, R, d = img.emb.shape
    n_cap, L, _ = cap.emb.shape
    s_rw = region_word_product(img.emb.reshape(n_img * R, d), cap.emb.reshape(n_cap * L, d), precision)
    s_t2i, s_i2t, w_img, w_txt = fused.cross_attention(  # w_img (n_img, n_cap, R), w_txt (n_cap, n_img, L)
        s_rw, img, cap, raw_feature_norm=cfg.raw_feature_norm, lambda_t2i=cfg.lambda_softmax_avg,
        lambda_i2t=cfg.lambda_softmax_lse, t2i_agg=cfg.t2i_agg_func, i2t_agg=cfg.i2t_agg_func,
        lambda_lse=cfg.lambda_lse, pooled=img.proj is not None or cap.proj is not None)
    h_img = None if img.proj is None else torch.bmm(w_img, img.proj)  # (n_img, n_cap, H)
    h_txt = None if cap.proj is None else torch.bmm(w_txt, cap.proj).transpose(0, 1)  # (n_img, n_cap, H)
    return Attended(s_t2i, s_i2t, h_img, h_txt)


def local_score(att: Attended, cross_attn: str) -> Tensor:
    """S_loc (n_img, n_cap): t2i, i2t, or (CASC, 'all') their average."""
    if cross_attn == 'all':
        return (att.s_t2i + att.s_i2t) / 2
    return att.s_t2i if cross_attn == 't2i' else att.s_i2t


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
        att = cross_attention(img, cap, cfg, precision)
        local = local_score(att, cfg.cross_attn)
        if self.head is None or alpha == 1.0:
            return Scores(local, local, None, None)
        logits_img = self.head.from_hidden(att.h_img, precision)  # (n_img, n_cap, K)
        label = label_similarity(logits_img, self.head.from_hidden(att.h_txt, precision))
        return Scores(alpha * local + (1 - alpha) * label, local, label, logits_img)

    def forward(self, images: Tensor, captions: Tensor, lengths: Tensor, targets: Optional[Tensor] = None,
                pos_weight: Optional[Tensor] = None, gather=None) -> Loss:
        """Training loss of a batch of B matched pairs (image i with caption i).

        images (B, R, img_dim), captions (B, L), lengths (B,), targets (B, K) multi-hot.
        With several processes (parallel.py), each holds B_p consecutive pairs of the global batch
        and `gather` concatenates a tensor (B_p, ...) of every process into (B, ...), with
        gradients: this process scores its images against all captions, and the loss is the
        global batch's, the same number on every process.
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


def grouped_cross_attention(img: Side, cap: Side, cfg: Config, first: int = 0, group: int = 32) -> Attended:
    """Training's cross attention of n images with B captions, image i matching caption first + i,
    over groups of `group` captions of similar length, each padded only to its own longest: pairs
    are independent, so the scores are exactly those of one call, with far fewer padded cells.
    Returns s_t2i, s_i2t (n, B) and, with head projections, h_img, h_txt (n, H) of the matched pairs."""
    n = img.emb.size(0)
    lengths = cap.mask.sum(1)  # (B,)
    order = torch.argsort(lengths, descending=True, stable=True)
    s_t2i, s_i2t, h_img, h_txt, rows = [], [], [], [], []
    for idx in order.split(group):
        L = int(lengths[idx[0]])
        sub = Side(cap.emb[idx, :L], cap.mask[idx, :L], cap.norm[idx, :L], cap.gram[idx, :L, :L],
                   None if cap.proj is None else cap.proj[idx, :L])
        att = cross_attention(img, sub, cfg)
        s_t2i.append(att.s_t2i), s_i2t.append(att.s_i2t)
        if att.h_img is not None:  # the matched pairs among the group's captions
            cols = ((idx >= first) & (idx < first + n)).nonzero().squeeze(1)
            rows.append(idx[cols] - first)
            h_img.append(att.h_img[rows[-1], cols]), h_txt.append(att.h_txt[rows[-1], cols])
    inverse = torch.argsort(order)  # back to batch order
    s_t2i, s_i2t = torch.cat(s_t2i, 1)[:, inverse], torch.cat(s_i2t, 1)[:, inverse]
    if not rows:
        return Attended(s_t2i, s_i2t, None, None)
    image_order = torch.argsort(torch.cat(rows))
    return Attended(s_t2i, s_i2t, torch.cat(h_img)[image_order], torch.cat(h_txt)[image_order])


def hinge_loss(sims: Tensor, margin: float, max_violation: bool) -> Tensor:
    """SCAN's triplet loss; sims (B, B) image-major with matched pairs on the diagonal -> scalar."""
    pos = sims.diagonal()
    eye = torch.eye(sims.size(0), dtype=torch.bool, device=sims.device)
    cost_cap = (margin + sims - pos[:, None]).clamp(min=0).masked_fill(eye, 0)  # image i vs caption j
    cost_img = (margin + sims - pos[None, :]).clamp(min=0).masked_fill(eye, 0)  # caption j vs image i
    if max_violation:  # only the hardest negative per query (VSE++)
        return cost_cap.amax(1).sum() + cost_img.amax(0).sum()
    return cost_cap.sum() + cost_img.sum()
