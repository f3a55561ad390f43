"""The reference loop (reference.py) is the yardstick for the fast engine, so it is checked here
against a per-pair, per-word scalar computation in plain Python floats written from the spec
formulas (sections 4-6, 8b), not from reference.py."""
import dataclasses
import math

import pytest
import torch

from conftest import D, K, LENS, N_IMG, N_CAP, tiny
from model import Config, LabelHead
from reference import casc_scores, hinge_loss, hinge_loss_vectorized, label_head, train_loss

CAP_LENS = LENS.tolist()  # distinct, one full, one of a single word: a misplaced pad or swapped axis shows


def make_inputs(seed=0, dtype=torch.float64):
    """tiny()'s regions, words and head, with cap_lens, multi-hot targets (N_IMG, K) and pos_weight (K,)."""
    img, cap, _, head = tiny(seed, dtype)
    g = torch.Generator().manual_seed(seed + 100)
    targets = (torch.rand(N_IMG, K, generator=g) > 0.5).to(dtype)
    pos_weight = 1 + torch.rand(K, generator=g, dtype=dtype) * 3
    return img, cap, LENS, head, targets, pos_weight


# ---- scalar spec, lists of floats only ----
def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def raw_norm(col, kind):
    """One context item's raw scores against every query -> normalized (the query axis)."""
    clip = [x if x > 0 else 0.1 * x for x in col]
    if kind == 'softmax':
        z = sum(math.exp(x) for x in col)
        return [math.exp(x) / z for x in col]
    if kind in ('l2norm', 'clipped_l2norm'):
        v = clip if kind.startswith('clipped') else col
        n = math.sqrt(sum(x * x for x in v)) + 1e-8
        return [x / n for x in v]
    if kind in ('l1norm', 'clipped_l1norm'):
        v = clip if kind.startswith('clipped') else col
        n = sum(abs(x) for x in v) + 1e-8
        return [x / n for x in v]
    return {'clipped': clip, 'no_norm': col}[kind]


def attend(queries, contexts, kind, lam):
    """-> relevance per query, attended context vector per query."""
    nq, nc = len(queries), len(contexts)
    s = [[dot(q, c) for c in contexts] for q in queries]          # s[q][c]
    cols = [raw_norm([s[q][c] for q in range(nq)], kind) for c in range(nc)]
    rel, att = [], []
    for q in range(nq):
        e = [math.exp(lam * cols[c][q]) for c in range(nc)]
        a = [x / sum(e) for x in e]
        cq = [sum(a[c] * contexts[c][k] for c in range(nc)) for k in range(len(queries[q]))]
        rel.append(dot(queries[q], cq) / max(math.sqrt(dot(queries[q], queries[q]) * dot(cq, cq)), 1e-8))
        att.append(cq)
    return rel, att


def agg(rel, kind, lam):
    if kind == 'Mean':
        return sum(rel) / len(rel)
    if kind == 'Max':
        return max(rel)
    if kind == 'Sum':
        return sum(rel)
    return math.log(sum(math.exp(lam * r) for r in rel)) / lam


def mean_vec(vs):
    return [sum(v[k] for v in vs) / len(vs) for k in range(len(vs[0]))]


def head_scalar(x, W1, b1, W2, b2):
    h = [math.tanh(dot(w, x) + b) for w, b in zip(W1, b1)]
    return [dot(w, h) + b for w, b in zip(W2, b2)]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def scalar_pair(img, words, head, cfg):
    """One image (R lists), one caption (its true words), head weights (lists) -> dict of floats."""
    r_t2i, att_t2i = attend(words, img, cfg.raw_feature_norm, cfg.lambda_softmax_avg)
    r_i2t, att_i2t = attend(img, words, cfg.raw_feature_norm, cfg.lambda_softmax_lse)
    out = {'s_t2i': agg(r_t2i, cfg.t2i_agg_func, cfg.lambda_lse),
           's_i2t': agg(r_i2t, cfg.i2t_agg_func, cfg.lambda_lse)}
    out['s_loc'] = {'t2i': out['s_t2i'], 'i2t': out['s_i2t'],
                    'all': (out['s_t2i'] + out['s_i2t']) / 2}[cfg.cross_attn]
    li = head_scalar(mean_vec(att_t2i), *head)   # u_img: mean over all words, incl. <start>/<end>
    lt = head_scalar(mean_vec(att_i2t), *head)   # u_txt: mean over all regions
    pi, pt = [sigmoid(x) for x in li], [sigmoid(x) for x in lt]
    out['s_label'] = dot(pi, pt) / max(math.sqrt(dot(pi, pi) * dot(pt, pt)), 1e-8)
    out['s'] = 0.8 * out['s_loc'] + 0.2 * out['s_label']
    out['logits_img'], out['logits_txt'] = li, lt
    return out


CASES = ([dict(raw_feature_norm=n) for n in
          ['clipped_l2norm', 'softmax', 'l2norm', 'l1norm', 'clipped_l1norm', 'clipped', 'no_norm']]
         + [dict(t2i_agg_func='LogSumExp', i2t_agg_func='Mean'), dict(t2i_agg_func='Max', i2t_agg_func='Sum'),
            dict(cross_attn='t2i'), dict(cross_attn='i2t', raw_feature_norm='softmax')])


def head_lists(head: LabelHead) -> list:
    return [p.tolist() for p in (head.fc1.weight, head.fc1.bias, head.fc2.weight, head.fc2.bias)]


@pytest.mark.parametrize('case', CASES, ids=lambda c: '-'.join(map(str, c.values())))
def test_casc_scores_match_per_pair_scalar_spec(case):
    cfg = Config(**case)  # the paper's settings but for the case; alpha 0.8
    img, cap, lens, head, _, _ = make_inputs()
    with torch.no_grad():
        out = casc_scores(img, cap, lens, cfg, head)
    for i in range(N_IMG):
        for j in range(N_CAP):
            want = scalar_pair(img[i].tolist(), cap[j, :CAP_LENS[j]].tolist(), head_lists(head), cfg)
            for key, val in want.items():
                assert out[key][i, j].tolist() == pytest.approx(val, abs=1e-10, rel=0), (key, i, j)


def test_garbage_padding_changes_nothing():
    img, cap, lens, head, targets, pos_weight = make_inputs()
    junk, g, cfg = cap.clone(), torch.Generator().manual_seed(2), Config()
    for j, n in enumerate(CAP_LENS):
        junk[j, n:] = 100 * torch.randn(cap.size(1) - n, D, generator=g, dtype=cap.dtype)
    a, b = casc_scores(img, cap, lens, cfg, head), casc_scores(img, junk, lens, cfg, head)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    B = N_IMG  # train on the first B matched pairs
    junk.requires_grad_(True)
    loss_junk = train_loss(img, junk[:B], lens[:B], targets, cfg, head, pos_weight)
    loss = train_loss(img, cap[:B], lens[:B], targets, cfg, head, pos_weight)
    assert torch.equal(loss, loss_junk)
    loss_junk.backward()
    grad = junk.grad
    assert torch.isfinite(grad).all()
    for j in range(B):
        assert (grad[j, CAP_LENS[j]:] == 0).all() and (grad[j, :CAP_LENS[j]] != 0).any()


def test_train_loss_is_hinge_plus_weighted_mean_bce():
    img, cap, lens, head, targets, pos_weight = make_inputs()
    B, cfg = N_IMG, Config()  # margin 0.2, max_violation, label_weight 10
    out = casc_scores(img, cap[:B], lens[:B], cfg, head)
    want = hinge_loss(out['s_loc'], 0.2, True)
    for logits in (out['logits_img'], out['logits_txt']):
        bce = 0.  # -[p y log sigma(x) + (1 - y) log(1 - sigma(x))], mean over B and K
        for i in range(B):
            for k in range(K):
                x, y, p = logits[i, i, k].item(), targets[i, k].item(), pos_weight[k].item()
                bce -= p * y * math.log(sigmoid(x)) + (1 - y) * math.log(1 - sigmoid(x))
        want = want + 10 * bce / (B * K)
    got = train_loss(img, cap[:B], lens[:B], targets, cfg, head, pos_weight)
    assert got.item() == pytest.approx(want.item(), abs=1e-10)
    for change in (dict(margin=0.5), dict(max_violation=False), dict(label_weight=3.)):  # cfg's loss options are read
        assert train_loss(img, cap[:B], lens[:B], targets, dataclasses.replace(cfg, **change), head,
                          pos_weight).item() != pytest.approx(got.item(), abs=1e-6), change


# Hand-computed, margin 0.2, rows = images, columns = captions:
#   S = [[0.9, 0.5, 0.8], [0.3, 0.7, 0.6], [0.4, 0.95, 0.2]]
# caption retrieval, [m + S(i,j) - S(i,i)]_+ per row, j != i:
#   row 0: 0.2+0.5-0.9 -> 0,    0.2+0.8-0.9 = 0.1
#   row 1: 0.2+0.3-0.7 -> 0,    0.2+0.6-0.7 = 0.1
#   row 2: 0.2+0.4-0.2 = 0.4,   0.2+0.95-0.2 = 0.95     sum 1.55, row maxima 0.1+0.1+0.95 = 1.15
# image retrieval, [m + S(i,j) - S(j,j)]_+ per column, i != j:
#   col 0: 0.2+0.3-0.9 -> 0,    0.2+0.4-0.9 -> 0
#   col 1: 0.2+0.5-0.7 = 0,     0.2+0.95-0.7 = 0.45
#   col 2: 0.2+0.8-0.2 = 0.8,   0.2+0.6-0.2 = 0.6       sum 1.85, column maxima 0+0.45+0.8 = 1.25
# total: sum 1.55 + 1.85 = 3.40; max_violation 1.15 + 1.25 = 2.40
HAND_S = [[0.9, 0.5, 0.8], [0.3, 0.7, 0.6], [0.4, 0.95, 0.2]]


@pytest.mark.parametrize('max_violation,want', [(False, 3.40), (True, 2.40)])
def test_hinge_loss_hand_computed(max_violation, want):
    scores = torch.tensor(HAND_S, dtype=torch.float64)
    assert hinge_loss(scores, 0.2, max_violation).item() == pytest.approx(want, abs=1e-12)
    assert hinge_loss_vectorized(scores, 0.2, max_violation).item() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize('max_violation', [False, True])
def test_hinge_vectorized_equals_loop(max_violation):
    scores = torch.randn(7, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(hinge_loss(scores, 0.2, max_violation),
                          hinge_loss_vectorized(scores, 0.2, max_violation), atol=1e-12)


def test_label_head_has_tanh():
    # x = 0.5, W1 = [[2]], b1 = 0 -> tanh(1) = 0.761594...; W2 = [[1], [-2]], b2 = [0.5, 0]
    x = torch.tensor([[0.5]], dtype=torch.float64)
    head = LabelHead(1, 1, 2).double()
    with torch.no_grad():
        for p, v in zip(head.parameters(), ([[2.]], [0.], [[1.], [-2.]], [0.5, 0.])):  # W1, b1, W2, b2
            p.copy_(torch.tensor(v))
        out = label_head(x, head)
    t = math.tanh(1.0)
    assert out[0].tolist() == pytest.approx([t + 0.5, -2 * t], abs=1e-12)   # no tanh would give [1.5, -2]


def test_float32_and_autograd_reach_every_input():
    img, cap, lens, head, targets, pos_weight = make_inputs(dtype=torch.float32)
    img.requires_grad_(True)
    loss = train_loss(img, cap[:N_IMG], lens[:N_IMG], targets, Config(), head, pos_weight)
    assert loss.dtype == torch.float32
    loss.backward()
    for t in (img, *head.parameters()):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
