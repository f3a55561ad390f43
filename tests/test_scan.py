"""SCAN's own checkpoints (kuanghuei/SCAN), written as its train.py writes them: evaluation.py must
score them exactly as SCAN's xattn_score_t2i / xattn_score_i2t do, for every option combination
SCAN can train, with the local score (they have no label head) and no --alpha needed.

The reference below is SCAN's algorithm (model.py: the encoders, func_attention, cosine_similarity,
the two xattn_score functions), restated one (image, caption) pair at a time in current PyTorch.
SCAN's l1norm and clipped_l1norm call an undefined l1norm_d and crash in SCAN itself: no SCAN
checkpoint has them."""
import argparse
import itertools
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import data
import evaluation
import vocab as vocab_lib

# Every option of SCAN's train.py, with its default, as its argparse Namespace holds them.
SCAN_OPTS = dict(data_path='./data/', data_name='precomp', vocab_path='./vocab/', margin=0.2, num_epochs=30,
                 batch_size=128, word_dim=300, embed_size=1024, grad_clip=2., num_layers=1, learning_rate=.0002,
                 lr_update=15, workers=10, log_step=10, val_step=500, logger_name='./runs/runX/log',
                 model_name='./runs/runX/checkpoint', resume='', max_violation=False, img_dim=2048,
                 no_imgnorm=False, no_txtnorm=False, raw_feature_norm='clipped_l2norm', agg_func='LogSumExp',
                 cross_attn='t2i', precomp_enc_type='basic', bi_gru=False, lambda_lse=6., lambda_softmax=9.)
SCAN_NORMS = ('clipped_l2norm', 'l2norm', 'clipped', 'softmax', 'no_norm')
SCAN_AGGS = ('LogSumExp', 'Mean', 'Max', 'Sum')
EPS = 1e-8


def scan_opt(vocab_size: int, **changes) -> argparse.Namespace:
    """SCAN's opt after `python train.py <changes>`: train.py then sets opt.vocab_size."""
    assert set(changes) <= set(SCAN_OPTS), set(changes) - set(SCAN_OPTS)
    return argparse.Namespace(**{**SCAN_OPTS, **changes, 'vocab_size': vocab_size})


# ---------------------------------------------------------------- SCAN's model, restated

def l2norm(x, dim):
    return x / (x.pow(2).sum(dim, keepdim=True).sqrt() + EPS)


class ScanImageEncoder(nn.Module):
    """EncoderImagePrecomp (basic) or EncoderImageWeightNormPrecomp: fc, then l2norm unless no_imgnorm.
    weight_norm is the old torch.nn.utils.weight_norm, whose state dict says fc.weight_g, fc.weight_v."""

    def __init__(self, opt):
        super().__init__()
        self.fc, self.no_imgnorm = nn.Linear(opt.img_dim, opt.embed_size), opt.no_imgnorm
        if opt.precomp_enc_type == 'weight_norm':
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', FutureWarning)
                self.fc = nn.utils.weight_norm(self.fc, dim=None)

    def forward(self, images):  # (n, R, img_dim) -> (n, R, d)
        x = self.fc(images)
        return x if self.no_imgnorm else l2norm(x, -1)


class ScanTextEncoder(nn.Module):
    """EncoderText: embed -> GRU (bi_gru: the two directions' halves averaged) -> l2norm unless no_txtnorm."""

    def __init__(self, opt):
        super().__init__()
        self.embed = nn.Embedding(opt.vocab_size, opt.word_dim)
        self.rnn = nn.GRU(opt.word_dim, opt.embed_size, opt.num_layers, batch_first=True, bidirectional=opt.bi_gru)
        self.opt = opt

    def forward(self, ids):  # one caption's ids (n_word,) -> (n_word, d): the GRU sees its words only
        out = self.rnn(self.embed(ids)[None])[0][0]
        if self.opt.bi_gru:
            d = self.opt.embed_size
            out = (out[:, :d] + out[:, d:]) / 2
        return out if self.opt.no_txtnorm else l2norm(out, -1)


def attend(query, context, opt):
    """func_attention for one pair: query (Lq, d), context (Lc, d) -> attended contexts (Lq, d).
    Raw scores are normalized over the queries, then softmax(lambda_softmax *) over the context."""
    raw = context @ query.T  # (Lc, Lq)
    norm = opt.raw_feature_norm
    if norm == 'softmax':
        raw = torch.softmax(raw, 1)
    if norm.startswith('clipped'):
        raw = F.leaky_relu(raw, 0.1)
    if norm.endswith('l2norm'):
        raw = l2norm(raw, 1)
    attn = torch.softmax(opt.lambda_softmax * raw.T, 1)  # (Lq, Lc)
    return attn @ context


def aggregate(rel, opt):
    if opt.agg_func == 'LogSumExp':
        return torch.log(torch.exp(opt.lambda_lse * rel).sum()) / opt.lambda_lse
    return {'Max': rel.max, 'Sum': rel.sum, 'Mean': rel.mean}[opt.agg_func]()


def scan_scores(img_emb, cap_embs, opt):
    """xattn_score_t2i (words attend to regions, aggregated over words) or xattn_score_i2t
    (regions attend to words, over regions), per opt.cross_attn: img_emb (n_img, R, d),
    cap_embs [(n_word, d)] -> (n_img, n_cap)."""
    sims = torch.empty(len(img_emb), len(cap_embs), dtype=img_emb.dtype)
    for i, regions in enumerate(img_emb):
        for j, words in enumerate(cap_embs):
            query, context = (words, regions) if opt.cross_attn == 't2i' else (regions, words)
            attended = attend(query, context, opt)
            rel = (query * attended).sum(1) / (query.norm(dim=1) * attended.norm(dim=1)).clamp(min=EPS)
            sims[i, j] = aggregate(rel, opt)
    return sims


def scan_model(opt, seed: int):
    """SCAN's two encoders with random weights (biases and weight_norm's g included)."""
    torch.manual_seed(seed)
    img_enc, txt_enc = ScanImageEncoder(opt), ScanTextEncoder(opt)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*img_enc.parameters(), *txt_enc.parameters()]:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return img_enc.eval(), txt_enc.eval()


def save_scan_checkpoint(path, img_enc, txt_enc, opt) -> str:
    """What SCAN's train.py writes: save_checkpoint({'epoch', 'model': SCAN.state_dict() (the list of
    the two encoders' state dicts), 'best_rsum', 'opt' (the Namespace), 'Eiters'})."""
    torch.save({'epoch': 7, 'model': [img_enc.state_dict(), txt_enc.state_dict()], 'best_rsum': 431.5,
                'opt': opt, 'Eiters': 8000}, path)
    return str(path)


# ---------------------------------------------------------------- every option combination

N_IMG, R, IMG_DIM, D, WORD_DIM, VOCAB = 3, 4, 10, 6, 5, 17
CAPTIONS = [[1, 5, 9, 2], [1, 16, 3, 7, 7, 11, 2], [1, 2], [1, 4, 13, 8, 2], [1, 6, 2]]  # lengths 4, 7, 2, 5, 3
LAMBDAS = [(9., 6.), (4., 5.), (20., 0.5)]  # (lambda_softmax, lambda_lse)
SWITCHES = list(itertools.product(('basic', 'weight_norm'), (False, True), (False, True), (False, True)))


def engine_scores(path: str, images, captions) -> torch.Tensor:
    """The checkpoint loaded as evaluation.py loads it, scoring in float64 -> (n_img, n_cap)."""
    model = checkpoint.load_model(path).model.double()
    lens = torch.tensor([len(c) for c in captions])
    ids = torch.zeros(len(captions), int(lens.max()), dtype=torch.long)
    for row, c in enumerate(captions):
        ids[row, :len(c)] = torch.tensor(c)
    with torch.no_grad():
        return model.scores(model.encode_images(images), model.encode_captions(ids, lens)).sims


@pytest.mark.parametrize('raw_feature_norm', SCAN_NORMS)
@pytest.mark.parametrize('agg_func', SCAN_AGGS)
@pytest.mark.parametrize('cross_attn', ['t2i', 'i2t'])
def test_scan_checkpoints_score_as_scans_own_xattn_score(tmp_path, cross_attn, agg_func, raw_feature_norm):
    """Each of SCAN's directions, aggregations and norms, with every combination of its encoder
    switches (basic/weight_norm, bi_gru, no_imgnorm, no_txtnorm) and several temperatures."""
    images = torch.randn(N_IMG, R, IMG_DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for k, (enc_type, bi_gru, no_imgnorm, no_txtnorm) in enumerate(SWITCHES):
        lambda_softmax, lambda_lse = LAMBDAS[k % len(LAMBDAS)]
        opt = scan_opt(VOCAB, cross_attn=cross_attn, agg_func=agg_func, raw_feature_norm=raw_feature_norm,
                       precomp_enc_type=enc_type, bi_gru=bi_gru, no_imgnorm=no_imgnorm, no_txtnorm=no_txtnorm,
                       lambda_softmax=lambda_softmax, lambda_lse=lambda_lse, img_dim=IMG_DIM, embed_size=D,
                       word_dim=WORD_DIM, max_violation=True)
        img_enc, txt_enc = scan_model(opt, seed=k)
        path = save_scan_checkpoint(tmp_path / f'scan_{k}.pth.tar', img_enc, txt_enc, opt)
        with torch.no_grad():
            img_enc, txt_enc = img_enc.double(), txt_enc.double()
            expected = scan_scores(img_enc(images), [txt_enc(torch.tensor(c)) for c in CAPTIONS], opt)
        torch.testing.assert_close(engine_scores(path, images, CAPTIONS), expected, rtol=0, atol=1e-10,
                                   msg=lambda m: f'{vars(opt)}: {m}')


def test_scan_option_names_are_mapped_onto_both_directions():
    """SCAN applies agg_func and lambda_softmax to whichever direction scores; lambda_lse keeps its name.
    This project's own options (and the authors', which use CASC's names) are left as they are."""
    opt = vars(scan_opt(VOCAB, cross_attn='i2t', agg_func='Mean', lambda_softmax=4., lambda_lse=5.))
    cfg = checkpoint.Config.from_opt(checkpoint.scan_options(opt))
    assert (cfg.cross_attn, cfg.t2i_agg_func, cfg.i2t_agg_func) == ('i2t', 'Mean', 'Mean')
    assert (cfg.lambda_softmax_avg, cfg.lambda_softmax_lse, cfg.lambda_lse) == (4., 4., 5.)
    casc = {'t2i_agg_func': 'Mean', 'i2t_agg_func': 'LogSumExp', 'lambda_softmax_avg': 9., 'lambda_lse': 5.}
    assert checkpoint.scan_options(casc) is casc


# ---------------------------------------------------------------- evaluation.py end to end

def scan_toy_checkpoint(toy, tmp_path, seed=0, **changes):
    """A SCAN model of the toy data's sizes (64-dim features) and vocabulary, saved as SCAN saves it,
    its options naming folders of the machine it was trained on -> (path, img_enc, txt_enc, opt, vocab)."""
    vocab = vocab_lib.deserialize_vocab(os.path.join(toy.vocab_path, 'toy_precomp_vocab.json'))
    opt = scan_opt(len(vocab), data_name='toy_precomp', data_path='/home/someone/data',
                   vocab_path='/home/someone/vocab', img_dim=64, embed_size=16, word_dim=8, **changes)
    img_enc, txt_enc = scan_model(opt, seed)
    return save_scan_checkpoint(tmp_path / f'scan_{seed}.pth.tar', img_enc, txt_enc, opt), img_enc, txt_enc, opt, vocab


IMGS, CAPS = [0, 7, 23, 39], [0, 3, 17, 36, 120, 199]


# SCAN's README commands: t2i with LogSumExp; i2t with Mean (AVG), lambda_softmax 4
@pytest.mark.parametrize('changes', [dict(max_violation=True, bi_gru=True, agg_func='LogSumExp', lambda_lse=6,
                                          lambda_softmax=9),
                                     dict(max_violation=True, bi_gru=True, cross_attn='i2t', agg_func='Mean',
                                          lambda_softmax=4)])
def test_evaluation_py_scores_a_scan_checkpoint_as_scan_does_without_alpha(toy, tmp_path, changes):
    path, img_enc, txt_enc, opt, vocab = scan_toy_checkpoint(toy, tmp_path, **changes)
    sims_path = tmp_path / 'sims.npy'
    metrics = evaluation.main(['--model_path', path, '--data_path', toy.data, '--vocab_path', toy.vocab_path,
                               '--split', 'test', '--device', 'cpu', '--save_sims', str(sims_path)])
    assert np.isfinite(metrics['rsum'])
    ds = data.PrecompDataset(toy.data, 'toy_precomp', 'test', vocab)
    with torch.no_grad():
        expected = scan_scores(img_enc(torch.from_numpy(np.array(ds.images[IMGS]))),
                               [txt_enc(torch.tensor(ds.captions[k])) for k in CAPS], opt)
    np.testing.assert_allclose(np.load(sims_path)[np.ix_(IMGS, CAPS)], expected.numpy(), rtol=0, atol=1e-5)


def test_a_scan_checkpoint_with_alpha_below_1_is_refused(toy, tmp_path):
    """No label head: asking for the CASC score's label term is refused, naming the checkpoint."""
    path = scan_toy_checkpoint(toy, tmp_path)[0]
    with pytest.raises(SystemExit) as exc:
        evaluation.main(['--model_path', path, '--data_path', toy.data, '--vocab_path', toy.vocab_path,
                         '--device', 'cpu', '--alpha', '0.8'])
    message = str(exc.value.code)
    assert path in message and 'label head' in message and '--alpha 1' in message
