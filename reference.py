"""The authors' CASC scoring, as a faithful slow loop: one caption at a time, sliced to its true
length and repeated over all images, with every attended vector materialized (as in their
model.py, minus its bugs: padded words masked out, float32, any device). It is the yardstick of every exactness
claim about the engine (model.py) in the tests, and the "authors' algorithm" of bench.py;
nothing else imports it. Slow on purpose: every step is written out to be checked by eye.

Works on encoded embeddings only: img_emb (n_img, R, d), cap_emb (n_cap, L, d) with anything
past cap_lens (n_cap,) ignored. The hyperparameters are a model.Config's; the label head is the
model's LabelHead, whose weights are applied here from the spec's formula. Device- and
dtype-agnostic; differentiable.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from model import Config, LabelHead


def l2norm(x: Tensor, dim: int) -> Tensor:
    return x / (x.pow(2).sum(dim, keepdim=True).sqrt() + 1e-8)


def l1norm(x: Tensor, dim: int) -> Tensor:
    return x / (x.abs().sum(dim, keepdim=True) + 1e-8)


def _clip(x):
    return F.leaky_relu(x, 0.1)  # "clipped" is LeakyReLU(0.1), not ReLU (spec 8b)


# Raw-score normalizations over dim 1 of (n, Lq, Lc), i.e. along the QUERY axis (spec 8b).
RAW_NORMS = {
    'softmax': lambda x: torch.softmax(x, dim=1),
    'l2norm': lambda x: l2norm(x, 1),
    'clipped_l2norm': lambda x: l2norm(_clip(x), 1),
    'l1norm': lambda x: l1norm(x, 1),
    'clipped_l1norm': lambda x: l1norm(_clip(x), 1),
    'clipped': _clip,
    'no_norm': lambda x: x,
}


def func_attention(query: Tensor, context: Tensor, *, raw_feature_norm: str, smooth: float):
    """query (n, Lq, d), context (n, Lc, d), no padding -> weighted context (n, Lq, d), attn (n, Lq, Lc)"""
    scores = query @ context.transpose(1, 2)                    # (n, Lq, Lc)
    scores = RAW_NORMS[raw_feature_norm](scores)                # normalized over queries
    attn = torch.softmax(smooth * scores, dim=2)                # then softmax over the context
    return attn @ context, attn                                 # (n, Lq, d)


def cosine_similarity(x1: Tensor, x2: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    """x1, x2 (..., d, ...) -> (...) with `dim` reduced; SCAN's form, the clamp is on the product."""
    return (x1 * x2).sum(dim) / (x1.norm(dim=dim) * x2.norm(dim=dim)).clamp(min=eps)


def aggregate(rel: Tensor, agg: str, lambda_lse: float) -> Tensor:
    """rel (..., Lq) relevances per query -> (...)"""
    if agg == 'Mean':
        return rel.mean(-1)
    if agg == 'Max':
        return rel.amax(-1)
    if agg == 'Sum':
        return rel.sum(-1)
    if agg == 'LogSumExp':  # = log(sum exp(lambda R)) / lambda, computed stably
        return torch.logsumexp(lambda_lse * rel, dim=-1) / lambda_lse
    raise ValueError(f'unknown agg {agg!r}')


def xattn(img_emb, cap_emb, cap_lens, *, words_query: bool, raw_feature_norm: str, lambda_softmax: float,
          agg: str, lambda_lse: float):
    """Words query regions (t2i) or regions query words (i2t) -> sims (n_img, n_cap) and
    u (n_img, n_cap, d), the mean over queries of the attended contexts (u_img for t2i, u_txt for i2t)."""
    n_img = img_emb.size(0)
    cols, pooled = [], []
    for i, n_words in enumerate(torch.as_tensor(cap_lens).tolist()):
        words = cap_emb[i, :n_words].expand(n_img, -1, -1)  # (n_img, n_words, d): padding never seen
        query, context = (words, img_emb) if words_query else (img_emb, words)
        attended, _ = func_attention(query, context, raw_feature_norm=raw_feature_norm,
                                     smooth=lambda_softmax)              # (n_img, Lq, d)
        rel = cosine_similarity(query, attended, dim=2)                   # (n_img, Lq)
        cols.append(aggregate(rel, agg, lambda_lse))                      # (n_img,)
        pooled.append(attended.mean(1))  # all queries: <start>/<end> count for u_img (spec 8b)
    return torch.stack(cols, 1), torch.stack(pooled, 1)


def label_head(x: Tensor, head: LabelHead) -> Tensor:
    """x (..., d) -> logits (..., K) = W2 tanh(W1 x + b1) + b2, with the weights of `head`."""
    return F.linear(torch.tanh(F.linear(x, head.fc1.weight, head.fc1.bias)), head.fc2.weight, head.fc2.bias)


def _local(img_emb, cap_emb, cap_lens, cfg: Config) -> dict:
    common = dict(raw_feature_norm=cfg.raw_feature_norm, lambda_lse=cfg.lambda_lse)
    s_t2i, u_img = xattn(img_emb, cap_emb, cap_lens, words_query=True, lambda_softmax=cfg.lambda_softmax_avg,
                         agg=cfg.t2i_agg_func, **common)
    s_i2t, u_txt = xattn(img_emb, cap_emb, cap_lens, words_query=False, lambda_softmax=cfg.lambda_softmax_lse,
                         agg=cfg.i2t_agg_func, **common)
    s_loc = {'t2i': s_t2i, 'i2t': s_i2t, 'all': (s_t2i + s_i2t) / 2}[cfg.cross_attn]
    return dict(s_t2i=s_t2i, s_i2t=s_i2t, s_loc=s_loc, u_img=u_img, u_txt=u_txt)


def casc_scores(img_emb: Tensor, cap_emb: Tensor, cap_lens: Tensor, cfg: Config,
                head: Optional[LabelHead] = None) -> dict:
    """img_emb (n_img, R, d), cap_emb (n_cap, L, d), cap_lens (n_cap,) -> dict of (n_img, n_cap)
    's_t2i', 's_i2t', 's_loc', 's', plus 'u_img', 'u_txt' (n_img, n_cap, d) and, with a head,
    'logits_img', 'logits_txt' (n_img, n_cap, K) and 's_label'. Uses cfg's raw_feature_norm,
    lambda_softmax_avg, lambda_softmax_lse, t2i_agg_func, i2t_agg_func, lambda_lse, cross_attn, alpha."""
    out = _local(img_emb, cap_emb, cap_lens, cfg)
    out['s'] = out['s_loc']
    if head is not None:
        # The label term always pairs t2i's u_img with i2t's u_txt, whatever cross_attn is.
        out['logits_img'] = label_head(out['u_img'], head)                # (n_img, n_cap, K)
        out['logits_txt'] = label_head(out['u_txt'], head)
        out['s_label'] = cosine_similarity(out['logits_img'].sigmoid(), out['logits_txt'].sigmoid(), dim=-1)
        out['s'] = cfg.alpha * out['s_loc'] + (1 - cfg.alpha) * out['s_label']
    return out


def hinge_loss(scores: Tensor, margin: float, max_violation: bool) -> Tensor:
    """scores (B, B), matched pairs on the diagonal -> scalar. Explicit loops: the yardstick."""
    B = scores.size(0)
    zero = scores.new_zeros(())
    # cost_cap[i][j]: caption j outranks image i's own caption; cost_img[i][j]: image i outranks caption j's own image
    cost_cap = [[zero if i == j else (margin + scores[i, j] - scores[i, i]).clamp(min=0) for j in range(B)]
                for i in range(B)]
    cost_img = [[zero if i == j else (margin + scores[i, j] - scores[j, j]).clamp(min=0) for j in range(B)]
                for i in range(B)]
    if max_violation:  # the hardest negative per query: per image (row) and per caption (column)
        return (sum(max(cost_cap[i]) for i in range(B))
                + sum(max(cost_img[i][j] for i in range(B)) for j in range(B)))
    return sum(sum(row) for row in cost_cap) + sum(sum(row) for row in cost_img)


def hinge_loss_vectorized(scores: Tensor, margin: float, max_violation: bool) -> Tensor:
    """scores (B, B) -> scalar; SCAN's vectorized ContrastiveLoss, what the authors ran. train_loss
    uses it so the baseline's timing is not dominated by hinge_loss's B^2 Python loop (tested equal)."""
    diag = scores.diag()
    eye = torch.eye(scores.size(0), dtype=torch.bool, device=scores.device)
    cost_cap = (margin + scores - diag[:, None]).clamp(min=0).masked_fill(eye, 0)   # (B, B)
    cost_img = (margin + scores - diag[None, :]).clamp(min=0).masked_fill(eye, 0)   # (B, B)
    if max_violation:
        return cost_cap.amax(1).sum() + cost_img.amax(0).sum()
    return cost_cap.sum() + cost_img.sum()


def train_loss(img_emb: Tensor, cap_emb: Tensor, cap_lens: Tensor, targets: Tensor, cfg: Config,
               head: LabelHead, pos_weight: Tensor) -> Tensor:
    """img_emb (B, R, d), cap_emb (B, L, d), cap_lens (B,), targets (B, K) multi-hot -> scalar loss
    hinge(s_loc) + label_weight * (BCE(f(u_img_ii), y) + BCE(f(u_txt_ii), y)) (the paper's loss), with
    cfg's score options, margin, max_violation and label_weight. As the authors: all B x B pooled
    contexts are materialized, the head sees the diagonal only."""
    out = _local(img_emb, cap_emb, cap_lens, cfg)
    ii = torch.arange(img_emb.size(0), device=img_emb.device)
    logits_img = label_head(out['u_img'][ii, ii], head)                   # (B, K)
    logits_txt = label_head(out['u_txt'][ii, ii], head)                   # (B, K)
    # Default 'mean' reduction: averaged over B and K, once per context vector (spec 8b).
    bce = (F.binary_cross_entropy_with_logits(logits_img, targets, pos_weight=pos_weight)
           + F.binary_cross_entropy_with_logits(logits_txt, targets, pos_weight=pos_weight))
    return hinge_loss_vectorized(out['s_loc'], cfg.margin, cfg.max_violation) + cfg.label_weight * bce
