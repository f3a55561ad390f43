"""The all-pairs engine: CASC's cross attention between every image and every caption, exact and fast.

Legend: n_img images of R regions, n_cap captions padded to L words (<start> and <end> included),
d embed, H label-head hidden, K labels. Everything here is a function of prepared Sides (embeddings
with their norms, Gram matrices and label-head projections) and of `cfg`, a model.Config of which
only the score options are read; model.py holds the encoders, the label head's weights, the CASC
module and the loss, and calls in here.

Three exact identities keep every (pairs x L x d) tensor from existing:
  * one product S = V W^T of all regions with all words serves t2i (words attend to regions)
    and i2t (regions attend to words);
  * the attended context c_q = sum_c a_qc x_c is never formed: q . c_q = sum_c a_qc s_qc and
    ||c_q||^2 = a_q^T G a_q with the context's Gram matrix G (R x R per image, L x L per caption);
  * the label head's first layer is linear, so W1 mean_q(c_q) = (mean_q a_q)^T (X W1^T): each
    region and word goes through W1 once, not every pair's context.
reference.py holds the authors' loop algorithm that these scores are tested against. For CPU
inference, fused.py (fused.cpp) computes everything after the product in one pass per pair.

To change the method: the raw-score normalization is scaled_raw, the attention and relevance
cross_attention (and its fused twin, fused.cpp, which applies() only to the norms it knows), the
pooling aggregate; a new score term is a field of CrossScores computed in cross_attention and
mixed into the ranking score in model.CASC.scores.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import fused

EPS = 1e-8
# Axes of the all-pairs region-word tensors (n_img, R, n_cap, L): the direction of attention is
# named by the axis it normalizes over (t2i: words query regions; i2t: regions query words).
REGION_AXIS, WORD_AXIS = 1, 3
NORMS = ('clipped_l2norm', 'l2norm', 'clipped_l1norm', 'l1norm', 'clipped', 'softmax', 'no_norm')
AGGS = ('Mean', 'Max', 'Sum', 'LogSumExp')
# On the CPU both large GEMMs write their rows padded to a multiple of this many floats (padded_rows):
# on the dev VM (AVX2, MKL) 1080 x 3750 products ran at 96-104 GFLOP/s into rows of 3750 floats, at
# 122 into rows of 3760; the head's 500 logits at 107-147 into rows of 500, 116-169 into rows of 512.
GEMM_LANES = 16
PRECISIONS = ('fp32', 'tf32', 'bf16')  # of the large products (region_word_product, head_logits)
PRECISION_HELP = ('fp32: exact; bf16: the region-word product and the label head\'s second layer from bfloat16 '
                  'inputs; tf32: on CUDA every float32 product and cuDNN\'s (set for the whole process), '
                  'elsewhere the region-word product with TF32\'s rounding')


def safe_sqrt(x: Tensor) -> Tensor:
    """sqrt that is 0 with a zero (not NaN) gradient where x <= 0: zero vectors are padding."""
    pos = x > 0
    return torch.where(pos, x, 1.0).sqrt() * pos


def l2norm(x: Tensor, dim: int = -1) -> Tensor:
    """x / (||x||_2 + 1e-8) along dim; all-zero (padded) vectors stay zero with finite gradients."""
    return x / l2_denominator(x, dim)


def l2_denominator(x: Tensor, dim: int) -> Tensor:
    """||x||_2 + 1e-8 along dim, kept (the one l2 norm of l2norm and the l2norm raw scores)."""
    return safe_sqrt(x.pow(2).sum(dim, keepdim=True)) + EPS


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
        return x * (lam / l2_denominator(x, dim))
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


def label_similarity(logits_img: Tensor, logits_txt: Tensor) -> Tensor:
    """cos(sigmoid(f(u_img)), sigmoid(f(u_txt))) over K: (..., K), (..., K) -> (...)."""
    if logits_img.dim() == 3 and fused.plain(logits_img, logits_txt) and logits_img.stride(-1) == logits_txt.stride(-1) == 1:
        return fused.label_cosine(logits_img, logits_txt)  # one pass, either pair order of memory
    p, q = torch.sigmoid(logits_img), torch.sigmoid(logits_txt)
    norms = torch.linalg.vector_norm(p, dim=-1) * torch.linalg.vector_norm(q, dim=-1)
    return torch.linalg.vecdot(p, q) / norms.clamp_min(EPS)


def _memory_order(x: Tensor) -> tuple:
    """x (n_img, n_cap, H), or a pair-axes-transposed view of caption-major memory -> (x in its memory's
    order, whether the pair axes were swapped): the head's pair-wise steps run on it in place."""
    swap = x.dim() == 3 and not x.is_contiguous() and x.transpose(0, 1).is_contiguous()
    return (x.transpose(0, 1) if swap else x), swap


def head_hidden(h: Tensor, b1: Tensor) -> Tensor:
    """The label head's hidden layer tanh(h + b1) from first-layer products without the bias,
    h = W1 x (..., H). A pair-axes-transposed view (n_img, n_cap, H) of caption-major memory is
    computed in place and returned as the same view."""
    h, swap = _memory_order(h)
    if fused.plain(h, b1) and h.is_contiguous() and h.size(-1) % 8 == 0:
        hidden = fused.bias_tanh(h, b1)  # one pass instead of two; ATen's tanh is slow on the CPU
    else:
        hidden = torch.tanh(h + b1)
    return hidden.transpose(0, 1) if swap else hidden


def head_logits(hidden: Tensor, w2: Tensor, b2: Tensor, precision: str = 'fp32') -> Tensor:
    """The label head's second layer W2 hidden + b2: (..., H) -> (..., K) logits, one GEMM over all
    pairs (a transposed view as in head_hidden). bf16: from bfloat16 inputs, as region_word_product."""
    hidden, swap = _memory_order(hidden)
    flat = hidden.flatten(0, -2)  # (pairs, H): one GEMM, its bias fused in addmm
    if precision == 'bf16':
        logits = (flat.bfloat16() @ w2.bfloat16().T).to(hidden.dtype) + b2
    else:
        out = padded_rows(flat.size(0), w2.size(0)) if fused.plain(flat, w2, b2) else None
        logits = torch.addmm(b2, flat, w2.T, out=out)
    logits = logits.view(*hidden.shape[:-1], -1)
    return logits.transpose(0, 1) if swap else logits


def head_from_hidden(h: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, precision: str = 'fp32') -> Tensor:
    """The label head's second half, W2 tanh(h + b1) + b2, from first-layer products without the
    bias h = W1 x (..., H) -> (..., K)."""
    return head_logits(head_hidden(h, b1), w2, b2, precision)


def padded_rows(m: int, n: int, lanes: int = GEMM_LANES) -> Tensor:
    """An uninitialized float32 (m, n) view of rows padded to a multiple of `lanes` floats, for a
    GEMM's out=: BLAS writes rows of any stride, no copy."""
    return torch.empty(m, n + -n % lanes)[:, :n]


def region_word_product(a: Tensor, b: Tensor, precision: str = 'fp32', lanes: int = 1) -> Tensor:
    """a (M, d) @ b (N, d)^T, the one large product, in `precision`: fp32 (exact), bf16 (inputs
    rounded to bfloat16, float32 result) or tf32 (inputs rounded to TF32's 10-bit mantissa). On
    CUDA, tf32 means the tensor cores, switched on once at start-up (util.set_precision) for
    every float32 product; elsewhere this product's TF32 rounding is emulated here. lanes > 1: a
    (M, N) view of rows padded to a multiple of `lanes` (GEMM_LANES), for fp32 on the CPU."""
    if lanes > 1 and precision == 'fp32' and fused.plain(a, b):
        return torch.mm(a, b.T, out=padded_rows(a.size(0), b.size(0), lanes))
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


def prepare(emb: Tensor, mask: Optional[Tensor], head=None) -> Side:
    """Per-item quantities shared by all of an item's pairs: emb (n, N, d) -> Side; head: the
    model.LabelHead whose first layer W1 projects every region or word once (None: no projections)."""
    if mask is not None:  # padded words exactly zero, so their raw scores are exactly zero
        emb = emb * mask[..., None]
    norm = torch.linalg.vector_norm(emb, dim=-1)  # (n, N)
    gram = emb @ emb.transpose(1, 2)  # (n, N, N)
    proj = None if head is None else emb @ head.fc1.weight.T  # (n, N, H)
    return Side(emb, mask, norm, gram, proj)


def _region_word(img: Side, cap: Side, cfg, precision: str) -> tuple:
    """-> s_rw (n_img, R, n_cap, L) region-word dot products v_r . w_l of every pair, raw (the
    same, clipped for the clipped_* norms), pad_bias (1, 1, n_cap, L): 0 on real words, -inf on padding."""
    n_img, R, d = img.emb.shape
    n_cap, L, _ = cap.emb.shape
    s_rw = region_word_product(img.emb.reshape(n_img * R, d), cap.emb.reshape(n_cap * L, d), precision)
    s_rw = s_rw.view(n_img, R, n_cap, L)
    pad_bias = torch.zeros_like(cap.norm).masked_fill_(~cap.mask, -math.inf)[None, None]
    raw = F.leaky_relu(s_rw, 0.1) if cfg.raw_feature_norm.startswith('clipped') else s_rw
    return s_rw, raw, pad_bias


def _t2i_attention(raw: Tensor, pad_bias: Tensor, cfg) -> Tensor:
    """raw (n_img, R, n_cap, L) region-word scores -> t2i attention (n_img, R, n_cap, L): normalized
    over the words (the queries), softmax over the regions (the context)."""
    return torch.softmax(scaled_raw(raw, cfg.raw_feature_norm, WORD_AXIS, cfg.lambda_softmax_avg, pad_bias),
                         REGION_AXIS)


def t2i_attention(img: Side, cap: Side, cfg, precision: str = 'fp32') -> Tensor:
    """Where each word looks: (n_img, n_cap, L, R), word l's t2i attention over the regions of
    each image (sums to 1 over R on real words, 0 on padded words): the weights of S_t2i."""
    _, raw, pad_bias = _region_word(img, cap, cfg, precision)
    attn = _t2i_attention(raw, pad_bias, cfg)
    return attn.permute(0, 2, 3, 1) * cap.mask[None, :, :, None]  # (n_img, R, n_cap, L) -> (n_img, n_cap, L, R)


class CrossScores(NamedTuple):
    """cross_attention's scores for n_img images and n_cap captions: the relevance of each direction,
    and the label head's first layer of each pair's pooled attended contexts."""
    s_t2i: Tensor  # (n_img, n_cap) text-to-image relevance, aggregated over words
    s_i2t: Tensor  # (n_img, n_cap) image-to-text relevance, aggregated over regions
    h_img: Optional[Tensor]  # (n_img, n_cap, H) W1 u_img, or the hidden layer tanh(W1 u_img + b1) given b1,
    h_txt: Optional[Tensor]  # (n_img, n_cap, H) the same of u_txt: when the sides carry head projections


def cross_attention(img: Side, cap: Side, cfg, precision: str = 'fp32', b1: Optional[Tensor] = None) -> CrossScores:
    """All pairs of n_img images and n_cap captions, both directions at once. u_img is the mean
    over words of the t2i attended image contexts, u_txt the mean over regions of the i2t word
    contexts; h_* are their first label-head layer W1 u (bias excluded), or given the head's first
    bias b1 (H,), its hidden layer tanh(W1 u + b1)."""
    if fused.applies(img, cap, cfg.raw_feature_norm):  # CPU inference: the same numbers in one pass (fused.cpp)
        return _fused_cross_attention(img, cap, cfg, precision, b1)
    s_rw, raw, pad_bias = _region_word(img, cap, cfg, precision)
    h_img = h_txt = None

    # t2i: words query regions. Normalize over words, softmax over regions.
    attn = _t2i_attention(raw, pad_bias, cfg)  # (n_img, R, n_cap, L)
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
    if b1 is not None:
        h_img, h_txt = (None if h is None else head_hidden(h, b1) for h in (h_img, h_txt))
    return CrossScores(s_t2i, s_i2t, h_img, h_txt)


def _fused_cross_attention(img: Side, cap: Side, cfg, precision: str, b1: Optional[Tensor]) -> CrossScores:
    """cross_attention by fused.cpp: only the product is a full-size tensor; the rest, the head's
    first layer of the pooled contexts and its tanh included, happens per pair, in cache."""
    n_img, R, d = img.emb.shape
    n_cap, L, _ = cap.emb.shape
    s_rw = region_word_product(img.emb.reshape(n_img * R, d), cap.emb.reshape(n_cap * L, d), precision, GEMM_LANES)
    return CrossScores(*fused.cross_attention(  # s_t2i, s_i2t (n_img, n_cap), h_img, h_txt (n_img, n_cap, H)
        s_rw, img, cap, raw_feature_norm=cfg.raw_feature_norm, lambda_t2i=cfg.lambda_softmax_avg,
        lambda_i2t=cfg.lambda_softmax_lse, t2i_agg=cfg.t2i_agg_func, i2t_agg=cfg.i2t_agg_func,
        lambda_lse=cfg.lambda_lse, b1=b1))


def local_score(att: CrossScores, cross_attn: str) -> Tensor:
    """S_loc (n_img, n_cap): t2i, i2t, or (CASC, 'all') their average."""
    if cross_attn == 'all':
        return (att.s_t2i + att.s_i2t) / 2
    return att.s_t2i if cross_attn == 't2i' else att.s_i2t


def grouped_cross_attention(img: Side, cap: Side, cfg, first: int = 0, group: int = 32) -> CrossScores:
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
        return CrossScores(s_t2i, s_i2t, None, None)
    image_order = torch.argsort(torch.cat(rows))
    return CrossScores(s_t2i, s_i2t, torch.cat(h_img)[image_order], torch.cat(h_txt)[image_order])
