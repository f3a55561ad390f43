"""evaluation.py and report.py: ranks and recalls on hand-built scores, chunked scoring, parity
with the authors' loop, and the CLI end to end on the toy model of conftest.py (--save_sims,
--fold5, ensembles, --alpha/--cross_attn, the authors' and SCAN's checkpoint formats, clear
errors, the retrieval-examples report)."""
import argparse
import contextlib
import dataclasses
import io
import os
import re
import shutil
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import data
import evaluation
import labels as labels_lib
import model as model_lib
import reference as ref
import report
import scoring
import vocab as vocab_lib
from test_report import check_page, write_image
from test_scan import save_scan_checkpoint, scan_opt

from evaluation import compute_sims, encode_captions, encode_images, load_model, ranks, recall_metrics
from engine import cross_attention

N_TEST_PAIRS = 40 * 200  # test split: 40 images x 5 captions each
KEYS = [f'{d}_{m}' for d in ('i2t', 't2i') for m in ('r1', 'r5', 'r10', 'medr', 'meanr')] + ['rsum']
SIM_LINE = re.compile(r'similarity: (\d+) pairs in ([0-9.]+) s, (\d+) pairs/s')


# ---------------------------------------------------------------- ranks and recalls, by hand

def shifted_rows(sigma):
    """sims[i, j] = -((j - sigma[i]) % n): image i ranks captions sigma[i], sigma[i]+1, ... With
    sigma a permutation, caption i's image and image i's caption both have 0-based rank
    (i - sigma[i]) % n (in column j the n values (j - sigma[i]) % n are all distinct)."""
    n = len(sigma)
    return torch.tensor(-((np.arange(n)[None, :] - np.asarray(sigma)[:, None]) % n), dtype=torch.float32)


SIGMA = [0, 1, 2, 3, 9, 8, 4, 5, 6, 7]
RANKS = [0, 0, 0, 0, 5, 7, 2, 2, 2, 2]  # (i - SIGMA[i]) % 10


@pytest.mark.parametrize('im_div', [1, 5])
def test_identity_like_sims_give_perfect_recall_both_ways(im_div):
    n_img = 6
    n_cap = n_img * im_div
    g = torch.Generator().manual_seed(0)
    sims = 0.5 * torch.rand(n_img, n_cap, generator=g)
    sims[torch.arange(n_cap) // im_div, torch.arange(n_cap)] += 1.0  # every caption's own image highest
    i2t, t2i = ranks(sims, im_div)
    assert i2t.tolist() == [0] * n_img and t2i.tolist() == [0] * n_cap
    m = recall_metrics(sims, im_div)
    assert sorted(m) == sorted(KEYS)
    for d in ('i2t', 't2i'):
        assert m[f'{d}_r1'] == m[f'{d}_r5'] == m[f'{d}_r10'] == 100.0
        assert m[f'{d}_medr'] == m[f'{d}_meanr'] == 1.0
    assert m['rsum'] == 600.0


def test_known_permutation_gives_known_ranks_one_caption_per_image():
    sims = shifted_rows(SIGMA)
    i2t, t2i = ranks(sims, 1)
    assert i2t.tolist() == RANKS and t2i.tolist() == RANKS
    m = recall_metrics(sims, 1)
    # 1-based ranks 1,1,1,1,6,8,3,3,3,3: four at 1, eight under 6, all under 11.
    for d in ('i2t', 't2i'):
        assert (m[f'{d}_r1'], m[f'{d}_r5'], m[f'{d}_r10']) == pytest.approx((40.0, 80.0, 100.0))
        assert m[f'{d}_medr'] == 3.0  # sorted: 1 1 1 1 3 | 3 3 3 6 8
        assert m[f'{d}_meanr'] == pytest.approx(3.0)  # (4 + 4 * 3 + 6 + 8) / 10
    assert m['rsum'] == pytest.approx(440.0)


def test_known_permutation_gives_known_ranks_five_captions_per_image():
    # Each column of the 10 x 10 matrix becomes 5 captions of the same image, copy m lowered by
    # 0.001 m: a caption keeps its column's rank (t2i); an image's best caption is its copy 0,
    # and every wrong column above it brings its 5 copies (i2t rank = 5 x the column rank).
    base = shifted_rows(SIGMA)
    sims = (base[:, :, None] - 0.001 * torch.arange(5.0)).reshape(10, 50)
    i2t, t2i = ranks(sims, 5)
    assert i2t.tolist() == [5 * r for r in RANKS]
    assert t2i.tolist() == [r for r in RANKS for _ in range(5)]
    m = recall_metrics(sims, 5)
    # i2t 1-based: 1,1,1,1,26,36,11,11,11,11
    assert (m['i2t_r1'], m['i2t_r5'], m['i2t_r10']) == pytest.approx((40.0, 40.0, 40.0))
    assert m['i2t_medr'] == 11.0 and m['i2t_meanr'] == pytest.approx(11.0)
    assert (m['t2i_r1'], m['t2i_r5'], m['t2i_r10']) == pytest.approx((40.0, 80.0, 100.0))
    assert m['t2i_medr'] == 3.0 and m['t2i_meanr'] == pytest.approx(3.0)


@pytest.mark.parametrize('im_div', [1, 5])
def test_ties_count_against_the_query_so_a_constant_matrix_scores_zero(im_div):
    sims = torch.full((4, 4 * im_div), 0.3)
    i2t, t2i = ranks(sims, im_div)
    assert i2t.tolist() == [3 * im_div] * 4  # every wrong caption ties with the best true one
    assert t2i.tolist() == [3] * (4 * im_div)  # every other image ties with the true one
    m = recall_metrics(sims, im_div)
    assert m['i2t_r1'] == m['t2i_r1'] == 0.0


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), float('-inf')])
def test_a_nan_or_inf_score_is_refused_not_ranked_as_a_hit(bad):
    sims = torch.eye(4) * 0.5
    sims[2, 2] = bad  # a NaN compares false with everything: it would rank -1, a perfect hit
    with pytest.raises(ValueError, match=r'^1 of 16 scores are NaN or inf: not ranked$'):
        ranks(sims, 1)
    with pytest.raises(ValueError, match='NaN or inf'):
        recall_metrics(sims, 1)


def test_ties_between_true_captions_do_not_hurt_but_a_tie_with_a_wrong_one_does():
    sims = torch.zeros(2, 10)
    sims[0, [0, 1]] = 1.0  # image 0: two of its own captions tie at the top
    sims[1, 5] = sims[1, 0] = 0.7  # image 1: its best caption (5) ties with image 0's caption 0
    i2t, t2i = ranks(sims, 5)
    assert i2t.tolist() == [0, 1]
    assert t2i[0].item() == 0 and t2i[5].item() == 0  # column 0: 1.0 vs 0.7; column 5: 0.7 vs 0
    sims[0, 5] = 0.7  # now image 0 ties with caption 5's own image
    assert ranks(sims, 5)[1][5].item() == 1


# ---------------------------------------------------------------- toy world: data, vocab, checkpoints

@pytest.fixture(scope='module')
def world(toy, toy_model, tmp_path_factory):
    """The toy data (conftest: 40 test images, 50 testall), its vocab and 20 labels, and three
    checkpoints: A, the toy model (conftest's, trained once per run); B, another model of the same
    vocabulary (A's weights, each scaled by 1 + 0.2 N(0, 1)), for ensembles; W, A with a fresh
    weight-normalized image encoder (--precomp_enc_type weight_norm). B and W need no training."""
    root = tmp_path_factory.mktemp('eval')
    a = str(toy_model / 'checkpoint_0.pth.tar')
    ckpt = torch.load(a, map_location='cpu', weights_only=True)
    g = torch.Generator().manual_seed(1)
    noisy = {k: v * (1 + 0.2 * torch.randn(v.shape, generator=g, dtype=v.dtype)) if v.is_floating_point() else v
             for k, v in ckpt['model'].items()}
    torch.save({**ckpt, 'model': noisy}, root / 'B.pth.tar')
    torch.manual_seed(2)
    img_enc = model_lib.EncoderImage(64, 32, 'weight_norm')  # --img_dim 64 --embed_size 32
    state = {k: v for k, v in ckpt['model'].items() if not k.startswith('img_enc.')}
    state.update({f'img_enc.{k}': v for k, v in img_enc.state_dict().items()})
    torch.save({**ckpt, 'model': state, 'opt': {**ckpt['opt'], 'precomp_enc_type': 'weight_norm'}}, root / 'W.pth.tar')
    vocab = vocab_lib.deserialize_vocab(os.path.join(toy.vocab_path, 'toy_precomp_vocab.json'))
    return SimpleNamespace(data=toy.data, vocab_path=toy.vocab_path, vocab=vocab, a=a, b=str(root / 'B.pth.tar'),
                           w=str(root / 'W.pth.tar'),
                           labels=labels_lib.load_labels(os.path.join(toy.vocab_path, 'toy_precomp_labels.json'))['labels'])


def run_eval(world, ckpt, *args, vocab_path=True):
    argv = ['--model_path', ckpt, '--data_path', world.data, '--device', 'cpu', *args]
    return evaluation.main(argv + (['--vocab_path', world.vocab_path] if vocab_path else []))


def eval_sims(world, tmp_path, ckpt, *args, name='sims.npy', **kw):
    """evaluation.main with --save_sims -> (metrics, the saved matrix)."""
    path = str(tmp_path / name)
    metrics = run_eval(world, ckpt, '--save_sims', path, *args, **kw)
    return metrics, np.load(path)


def exit_message(world, ckpt, *args, **kw):
    with pytest.raises(SystemExit) as exc:
        run_eval(world, ckpt, *args, **kw)
    return str(exc.value.code)


@pytest.fixture(scope='module')
def base(world, tmp_path_factory):
    """Checkpoint A on the test split with the defaults: metrics, sims (40, 200), the folder of
    --save_sims (sims.npy, sims_ranks.npz) and what main printed."""
    folder = tmp_path_factory.mktemp('base')
    with contextlib.redirect_stdout(io.StringIO()) as out:
        metrics, sims = eval_sims(world, folder, world.a, '--split', 'test')
    return SimpleNamespace(metrics=metrics, sims=sims, folder=folder, out=out.getvalue())


@pytest.fixture(scope='module')
def local_a(world, tmp_path_factory):
    """Checkpoint A at --alpha 1: the local score alone (40, 200)."""
    return eval_sims(world, tmp_path_factory.mktemp('local'), world.a, '--alpha', '1')[1]


@pytest.fixture(scope='module')
def encoded(world):
    """Checkpoint A loaded directly, the test split, and its encoded images (one Side)."""
    model = load_model(world.a).model
    ds = data.PrecompDataset(world.data, 'toy_precomp', 'test', world.vocab)
    return SimpleNamespace(model=model, ds=ds, img=encode_images(model, ds.images))


def local_scores_loop(model, ds, imgs, caps, **overrides):
    """The authors' loop (reference.py) on the model's own encoder outputs, with the model's
    Config but for `overrides` (e.g. cross_attn)."""
    lens = torch.tensor([len(ds.captions[k]) for k in caps])
    ids = torch.zeros(len(caps), int(lens.max()), dtype=torch.long)
    for row, k in enumerate(caps):
        ids[row, :lens[row]] = torch.tensor(ds.captions[k])
    with torch.no_grad():
        img_emb = model.img_enc(torch.from_numpy(np.array(ds.images[imgs], dtype=np.float32)))
        cap_emb = model.txt_enc(ids, lens)
        return ref.casc_scores(img_emb, cap_emb, lens, dataclasses.replace(model.cfg, **overrides), model.head)


IMGS, CAPS = [0, 7, 23, 39], [0, 3, 17, 36, 120, 199]


# ---------------------------------------------------------------- the CLI end to end

def test_main_returns_every_metric_and_prints_the_pair_rate(base):
    metrics, out = base.metrics, base.out
    assert sorted(metrics) == sorted(KEYS)
    assert metrics['rsum'] == pytest.approx(sum(metrics[f'{d}_r{k}'] for d in ('i2t', 't2i') for k in (1, 5, 10)))
    assert all(np.isfinite(v) for v in metrics.values())
    match = SIM_LINE.search(out)
    assert match, out
    n_pairs, seconds, rate = int(match[1]), float(match[2]), int(match[3])
    assert n_pairs == N_TEST_PAIRS and seconds >= 0 and rate > 0
    assert f'rsum: {metrics["rsum"]:.1f}' in out


def test_scores_equal_the_authors_loop_on_the_encoded_toy_test_split(encoded, base):
    slow = local_scores_loop(encoded.model, encoded.ds, IMGS, CAPS)
    assert base.sims.dtype == np.float32
    np.testing.assert_allclose(base.sims[np.ix_(IMGS, CAPS)], slow['s'].numpy(), rtol=0, atol=1e-5)


def test_save_sims_writes_the_float32_matrix_and_consistent_ranks(encoded, base):
    metrics, sims = base.metrics, base.sims
    assert sims.dtype == np.float32 and sims.shape == (40, 200)
    direct = compute_sims(encoded.model, encoded.img, encode_captions(encoded.model, encoded.ds.captions),
                          progress=False)
    np.testing.assert_allclose(sims, direct.numpy(), rtol=0, atol=1e-6)
    rk = np.load(base.folder / 'sims_ranks.npz')
    i2t, t2i = ranks(torch.from_numpy(sims), 5)
    np.testing.assert_array_equal(rk['i2t'], i2t.numpy() + 1)  # 1-based
    np.testing.assert_array_equal(rk['t2i'], t2i.numpy() + 1)
    assert rk['i2t'].shape == (40,) and rk['t2i'].shape == (200,) and rk['i2t'].min() >= 1
    assert metrics['i2t_r1'] == pytest.approx(100 * np.mean(rk['i2t'] == 1))
    assert metrics['t2i_r1'] == pytest.approx(100 * np.mean(rk['t2i'] == 1))
    assert f'Image to text: R@1 {100 * np.mean(rk["i2t"] == 1):.1f} ' in base.out
    assert f'Text to image: R@1 {100 * np.mean(rk["t2i"] == 1):.1f} ' in base.out


def test_chunked_scoring_equals_one_shot_whatever_the_memory_budget(encoded, monkeypatch):
    model, img = encoded.model, encoded.img
    caps = encode_captions(model, encoded.ds.captions, batch_size=200)  # one caption batch
    monkeypatch.setattr(scoring, 'CACHE_CELLS', 1 << 40)  # no cache-sized cap: truly one shot
    monkeypatch.setattr(scoring, 'FUSED_CELLS', 1 << 40)
    one_shot = compute_sims(model, img, caps, memory_gb=64.0, progress=False)
    (_, cap), = caps
    n_c, L = cap.mask.shape
    R = img.emb.shape[1]
    per_image = n_c * (R * L * scoring.BYTES_PER_CELL + 16 * (model.cfg.num_labels + model.cfg.label_hidden))
    for budget in (1e-12, 3.5 * per_image / 2 ** 30):  # chunks of 1 image; of 3 (40 = 13 x 3 + 1)
        chunked = compute_sims(model, img, caps, memory_gb=budget, progress=False)
        torch.testing.assert_close(chunked, one_shot, rtol=0, atol=1e-6)


@pytest.mark.parametrize('min_items', [1, None])  # None: MIN_ITEMS as it is
def test_chunk_size_does_not_grow_with_the_split(encoded, monkeypatch, min_items):
    """The largest chunk scored is the same for a split and for a split twice as large (MIN_ITEMS,
    the least number of work items a pass is cut into, only makes chunks smaller: with it, a small
    split's chunks may be smaller than a large one's, never larger than the memory budget's)."""
    if min_items:
        monkeypatch.setattr(scoring, 'MIN_ITEMS', min_items)
    monkeypatch.setattr(scoring, 'FUSED_CELLS', scoring.CACHE_CELLS)  # a cap that bites on the toy split's 40 images
    model, img = encoded.model, encoded.img
    caps = encode_captions(model, encoded.ds.captions)
    double = type(img)(*(None if t is None else torch.cat([t, t]) for t in img))
    largest = []
    for side in (img, double):
        cells, scores = [], model.scores
        model.scores = lambda i, c, **kw: cells.append(i.emb.shape[0] * i.emb.shape[1] * c.mask.numel()) or scores(i, c, **kw)
        try:
            sims = compute_sims(model, side, caps, progress=False)
        finally:
            del model.scores
        largest.append(max(cells))
        assert sims.shape == (side.emb.shape[0], len(encoded.ds.captions))
    bound = max(scoring.cache_cells(model.cfg), max(c.mask.numel() for _, c in caps) * img.emb.shape[1])
    assert (largest[0] == largest[1] if min_items else largest[0] <= largest[1]) and largest[1] <= bound


@pytest.mark.parametrize('batch_size', [1, 7])
def test_caption_batch_size_does_not_change_the_scores(encoded, base, batch_size):
    model, img, caps = encoded.model, encoded.img, encoded.ds.captions[:36]  # 7: five batches and one of 1
    everything = compute_sims(model, img, encode_captions(model, caps, batch_size=len(caps)), progress=False)
    batched = encode_captions(model, caps, batch_size=batch_size)
    assert sorted(torch.cat([idx for idx, _ in batched]).tolist()) == list(range(len(caps)))
    sims = compute_sims(model, img, batched, progress=False)
    torch.testing.assert_close(sims, everything, rtol=0, atol=1e-6)
    np.testing.assert_allclose(everything.numpy(), base.sims[:, :36], rtol=0, atol=1e-6)


def test_fold5_is_the_mean_of_five_directly_scored_blocks(world, encoded, tmp_path, capsys):
    metrics = run_eval(world, world.a, '--split', 'testall', '--fold5', '--save_sims', str(tmp_path / 'f.npy'))
    assert int(SIM_LINE.search(capsys.readouterr().out)[1]) == 5 * 10 * 50
    model = encoded.model
    ds = data.PrecompDataset(world.data, 'toy_precomp', 'testall', world.vocab)
    per_fold = []
    for f in range(5):
        img = encode_images(model, ds.images[10 * f:10 * (f + 1)])
        caps = encode_captions(model, ds.captions[50 * f:50 * (f + 1)])
        sims = compute_sims(model, img, caps, progress=False)
        np.testing.assert_allclose(np.load(tmp_path / f'f_fold{f}.npy'), sims.numpy(), rtol=0, atol=1e-6)
        per_fold.append(recall_metrics(sims, 5))
    assert sorted(metrics) == sorted(KEYS)
    for k in KEYS:
        assert metrics[k] == pytest.approx(np.mean([m[k] for m in per_fold]), abs=1e-9), k
    whole = recall_metrics(compute_sims(model, encode_images(model, ds.images),
                                        encode_captions(model, ds.captions), progress=False), 5)
    assert metrics['i2t_meanr'] < whole['i2t_meanr']  # 10 candidates per query, not 50


def test_alpha_and_cross_attn_select_the_score(world, encoded, base, local_a, tmp_path):
    fused, local = base.sims, local_a
    assert not np.allclose(local, fused, atol=1e-4)
    slow = local_scores_loop(encoded.model, encoded.ds, IMGS, CAPS)
    np.testing.assert_allclose(local[np.ix_(IMGS, CAPS)], slow['s_loc'].numpy(), rtol=0, atol=1e-5)
    # sims = alpha * local + (1 - alpha) * label: the label term is (fused - 0.8 local) / 0.2
    label = (fused - 0.8 * local) / 0.2
    np.testing.assert_allclose(label[np.ix_(IMGS, CAPS)], slow['s_label'].numpy(), rtol=0, atol=1e-4)
    caps = encode_captions(encoded.model, encoded.ds.captions, batch_size=200)
    half = compute_sims(encoded.model, encoded.img, caps, alpha=0.5, progress=False).numpy()
    np.testing.assert_allclose(half, 0.5 * local + 0.5 * label, rtol=0, atol=1e-4)

    (idx, cap), = caps
    with torch.inference_mode():
        engine = cross_attention(encoded.img, cap, encoded.model.cfg)
    one_way_local = {}
    for direction in ('t2i', 'i2t'):
        _, one_way = eval_sims(world, tmp_path, world.a, '--cross_attn', direction, name=f'{direction}.npy')
        assert not np.allclose(one_way, fused, atol=1e-4)
        # the label term pairs t2i's u_img with i2t's u_txt whatever the local direction
        slow_dir = local_scores_loop(encoded.model, encoded.ds, IMGS, CAPS, cross_attn=direction)
        np.testing.assert_allclose(one_way[np.ix_(IMGS, CAPS)], slow_dir['s'].numpy(), rtol=0, atol=1e-5)
        _, one_way_local[direction] = eval_sims(world, tmp_path, world.a, '--cross_attn', direction,
                                                '--alpha', '1', name=f'{direction}_a1.npy')
        expected = torch.empty(40, 200)
        expected[:, idx] = getattr(engine, f's_{direction}')  # the model's own s_t2i / s_i2t
        np.testing.assert_allclose(one_way_local[direction], expected.numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(one_way_local[direction][np.ix_(IMGS, CAPS)], slow[f's_{direction}'].numpy(),
                                   rtol=0, atol=1e-5)
    np.testing.assert_allclose((one_way_local['t2i'] + one_way_local['i2t']) / 2, local, rtol=0, atol=1e-6)


def test_ensemble_averages_the_two_score_matrices(world, base, tmp_path):
    _, sims_b = eval_sims(world, tmp_path, world.b, name='b.npy')
    assert not np.allclose(base.sims, sims_b, atol=1e-3)  # another seed, another model
    _, both = eval_sims(world, tmp_path, world.a, '--model_path2', world.b, name='ab.npy')
    np.testing.assert_allclose(both, (base.sims + sims_b) / 2, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- the authors' and SCAN's checkpoints

AUTHORS_OPTS = ('data_path data_name vocab_path margin num_epochs batch_size word_dim embed_size grad_clip '
                'num_layers learning_rate lr_update workers log_step val_step logger_name model_name resume '
                'max_violation img_dim no_imgnorm no_txtnorm raw_feature_norm t2i_agg_func i2t_agg_func '
                'cross_attn precomp_enc_type bi_gru lambda_lse lambda_softmax_avg lambda_softmax_lse').split()


def authors_checkpoint(world, ours, path, parts=None):
    """Our checkpoint rewritten as the release does: a list of the modules' state dicts and the
    options as an argparse.Namespace, with a vocab_path that does not exist on this machine."""
    model, opt = load_model(ours)[:2]
    if parts is None:
        parts = [model.img_enc.state_dict(), model.txt_enc.state_dict(), model.head.state_dict()]
    ns = argparse.Namespace(**{k: opt[k] for k in AUTHORS_OPTS})
    ns.vocab_path = '/nonexistent/authors/vocab'
    ns.caption_vocab, ns.caption_np = './vocab/f30k_caption_vocab.pkl', './data/f30k_np/'
    ns.vocab_size = len(world.vocab)
    torch.save({'model': parts, 'opt': ns, 'epoch': 3, 'best_rsum': 0, 'Eiters': 5}, path)
    return str(path)


def test_authors_checkpoint_format_gives_the_same_scores(world, base, tmp_path):
    path = authors_checkpoint(world, world.a, tmp_path / 'authors.pth.tar')
    message = exit_message(world, path, vocab_path=False)  # it stores no vocabulary: --vocab_path is required
    assert path in message and 'stores no vocabulary' in message and '--vocab_path' in message
    metrics, sims = eval_sims(world, tmp_path, path)
    np.testing.assert_array_equal(sims, base.sims)
    assert metrics == base.metrics


def test_authors_weight_norm_checkpoint_with_old_key_names_loads(world, tmp_path):
    _, ours = eval_sims(world, tmp_path, world.w, name='ours.npy')
    model = load_model(world.w).model
    assert 'fc.parametrizations.weight.original0' in model.img_enc.state_dict()
    # What torch.nn.utils.weight_norm (before parametrizations) saved: fc.weight_g, fc.weight_v, fc.bias.
    old = nn.Linear(64, 32)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        nn.utils.weight_norm(old, dim=None)
    with torch.no_grad():
        old.weight_g.copy_(model.img_enc.fc.parametrizations.weight.original0)
        old.weight_v.copy_(model.img_enc.fc.parametrizations.weight.original1)
        old.bias.copy_(model.img_enc.fc.bias)
    img_state = {f'fc.{k}': v for k, v in old.state_dict().items()}
    assert sorted(img_state) == ['fc.bias', 'fc.weight_g', 'fc.weight_v']
    path = authors_checkpoint(world, world.w, tmp_path / 'authors_wn.pth.tar',
                              parts=[img_state, model.txt_enc.state_dict(), model.head.state_dict()])
    _, sims = eval_sims(world, tmp_path, path, name='theirs.npy')
    np.testing.assert_array_equal(sims, ours)


def test_scan_checkpoint_scores_with_its_own_options_and_the_local_score(world, tmp_path):
    """A's encoders saved as SCAN's train.py saves a model (SCAN's option names and defaults, one
    direction) score as A's own t2i or i2t local score, with no --alpha: there is no label head."""
    model, opt = load_model(world.a)[:2]
    sizes = {k: opt[k] for k in ('img_dim', 'embed_size', 'word_dim', 'num_layers', 'bi_gru', 'raw_feature_norm')}
    for direction, agg, lam in (('t2i', 't2i_agg_func', 'lambda_softmax_avg'),
                                ('i2t', 'i2t_agg_func', 'lambda_softmax_lse')):
        ns = scan_opt(len(world.vocab), cross_attn=direction, agg_func=opt[agg], lambda_softmax=opt[lam],
                      lambda_lse=opt['lambda_lse'], data_name='toy_precomp', vocab_path='/nonexistent/scan/vocab',
                      **sizes)
        path = save_scan_checkpoint(tmp_path / f'scan_{direction}.pth.tar', model.img_enc, model.txt_enc, ns)
        _, scan = eval_sims(world, tmp_path, path, name=f'scan_{direction}.npy')
        _, ours = eval_sims(world, tmp_path, world.a, '--cross_attn', direction, '--alpha', '1',
                            name=f'a_{direction}.npy')
        np.testing.assert_allclose(scan, ours, rtol=0, atol=1e-6)  # same encoders, no head
    message = exit_message(world, path, '--alpha', '0.8')
    assert path in message and '--alpha 1' in message and 'label head' in message


# ---------------------------------------------------------------- errors

def _spring(marker):
    """Would run if a checkpoint were unpickled with weights_only=False."""
    with open(marker, 'w') as f:
        f.write('constructed')
    return 'sprung'


class Trap:
    """Pickles as a call to _spring: loading it executes code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _spring, (self.marker,)


def test_loading_never_unpickles_arbitrary_objects(world, tmp_path):
    ckpt = torch.load(world.a, map_location='cpu', weights_only=True)
    marker = tmp_path / 'sprung.txt'
    ckpt['opt'] = {**ckpt['opt'], 'payload': Trap(str(marker))}
    path = str(tmp_path / 'trap.pth.tar')
    torch.save(ckpt, path)
    message = exit_message(world, path)
    assert path in message and 'refused' in message and 'could run code' in message
    assert 'weights_only' not in message  # torch's advice to turn the safety off is not passed on
    assert not marker.exists()
    # The trap is real: an unrestricted load runs it.
    assert torch.load(path, map_location='cpu', weights_only=False)['opt']['payload'] == 'sprung'
    assert marker.read_text() == 'constructed'


def test_missing_checkpoint_names_the_path(world, tmp_path):
    path = str(tmp_path / 'nowhere' / 'model_best.pth.tar')
    message = exit_message(world, path)
    assert path in message and 'not found' in message


def test_corrupt_checkpoints_are_not_readable(world, tmp_path):
    junk = tmp_path / 'junk.pth.tar'
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    truncated = tmp_path / 'truncated.pth.tar'
    blob = open(world.a, 'rb').read()
    truncated.write_bytes(blob[:len(blob) // 2])
    for path in (str(junk), str(truncated)):
        message = exit_message(world, path)
        assert path in message and 'not a readable' in message


def test_vocabulary_of_another_size_names_the_file_and_both_sizes(world, tmp_path):
    small = vocab_lib.Vocabulary()
    for w in list(world.vocab.word2idx)[:10]:
        small.add_word(w)
    os.makedirs(tmp_path / 'v')
    vocab_file = str(tmp_path / 'v' / 'toy_precomp_vocab.json')
    vocab_lib.serialize_vocab(small, vocab_file)
    # A checkpoint that stores no vocabulary (the authors' format) trusts --vocab_path, but not its size.
    path = authors_checkpoint(world, world.a, tmp_path / 'authors.pth.tar')
    message = exit_message(world, path, '--vocab_path', str(tmp_path / 'v'), vocab_path=False)
    assert vocab_file in message and path in message
    assert re.search(r'\b10\b', message) and re.search(rf'\b{len(world.vocab)}\b', message)
    # This project's checkpoints store their vocabulary: a shorter one is named at its first missing id.
    message = exit_message(world, world.a, '--vocab_path', str(tmp_path / 'v'), vocab_path=False)
    assert vocab_file in message and world.a in message and 'id 10 is missing (it has 10 words)' in message


def test_missing_split_names_the_missing_file(world):
    message = exit_message(world, world.a, '--split', 'nosuch')
    assert os.path.join(world.data, 'toy_precomp', 'nosuch_ims.npy') in message


# ---------------------------------------------------------------- NaN and inf scores: refused, naming their cause

def nan_checkpoint(world, tmp_path) -> str:
    """Checkpoint A with one NaN weight (one element of the image encoder's fc) -> its path."""
    ckpt = torch.load(world.a, map_location='cpu', weights_only=True)
    ckpt['model']['img_enc.fc.weight'][3, 5] = float('nan')
    path = str(tmp_path / 'nan.pth.tar')
    torch.save(ckpt, path)
    return path


def test_a_checkpoint_with_one_nan_weight_is_refused_naming_it_and_the_weight(world, tmp_path, capsys):
    path = nan_checkpoint(world, tmp_path)
    message = exit_message(world, path, '--split', 'test', '--save_sims', str(tmp_path / 's.npy'))
    assert message.startswith(f'error: {path}: weight img_enc.fc.weight holds NaN or inf, so ')
    assert 'refusing to rank them' in message and '\n' not in message
    assert 'rsum' not in capsys.readouterr().out and not os.path.exists(tmp_path / 's.npy')
    # validation in training scores through the same function (train.validate -> evaluate_arrays)
    ds = data.PrecompDataset(world.data, 'toy_precomp', 'dev', world.vocab)
    with pytest.raises(ValueError, match=r'^the model: weight img_enc.fc.weight holds NaN or inf'):
        evaluation.evaluate_arrays(load_model(path).model, ds.images, ds.captions, progress=False)


def test_features_whose_scores_overflow_are_refused_naming_the_file_and_image(world, tmp_path, capsys):
    """Finite features too large for float32 through the encoder (3e38): they pass the NaN/inf scan
    of the features file, but their scores are NaN. Image 13 of the test split; with --fold5 on
    testall, image 33 is image 3 of fold 3, named by its index in the file."""
    folder = tmp_path / 'toy_precomp'
    shutil.copytree(os.path.join(world.data, 'toy_precomp'), folder)
    for split, i in (('test', 13), ('testall', 33)):
        ims = np.load(folder / f'{split}_ims.npy')
        ims[i] = 3e38
        np.save(folder / f'{split}_ims.npy', ims)
        fold5 = ['--fold5'] if split == 'testall' else []
        message = exit_message(world, world.a, '--data_path', str(tmp_path), '--split', split, *fold5)
        assert message.startswith(f'error: {folder / f"{split}_ims.npy"}: image {i} gives NaN or inf scores with '
                                  f'{world.a}, whose weights are finite'), message
        assert 'similarity:' not in capsys.readouterr().out  # no metrics (--fold5 printed folds 0-2's)


# ---------------------------------------------------------------- the retrieval examples report

def split_captions(world, split):
    return open(os.path.join(world.data, 'toy_precomp', f'{split}_caps.txt'), encoding='utf-8').read().splitlines()


def check_sentence_rankings(path, caps, folds):
    """Every sentence query of the page (parsed: test_report.check_page) lists the top-5 images of
    that sentence's own scores, with their scores and marks: folds are consecutive (n_img, n_img * 5)
    blocks of the split; the sentence is found by its text, so the check does not depend on how the
    page numbers sentences. -> the page."""
    page = check_page(str(path))
    sections = page.root.all('section', 'text-query')
    assert sections
    for section in sections:
        (k,) = [k for k, c in enumerate(caps) if c == section.one('q', 'query').text()]  # toy captions: unique
        n_img, n_cap = folds[0].shape
        f, j = divmod(k, n_cap)
        top = np.argsort(-folds[f][:, j], kind='stable')[:5]
        results = section.all('li', 'result')
        assert [li.one('span', 'image').text() for li in results] == [f'image {n_img * f + i}' for i in top]
        np.testing.assert_allclose([float(li.one('span', 'score').text()) for li in results], folds[f][top, j],
                                   atol=6e-5)
        assert [li.one('span', 'mark').text() for li in results] == \
            ['correct' if i == j // 5 else 'wrong' for i in top]
        for li, i in zip(results, top):
            assert [c.text() for c in li.one('ol', 'captions').all('li')] == caps[5 * (n_img * f + i):][:5]
    return page


def test_examples_report_shows_top_sentences_labels_and_images(world, base, tmp_path):
    out = tmp_path / 'report'
    run_eval(world, world.a, '--examples', '2', '--out', str(out))
    caps = split_captions(world, 'test')
    page = check_sentence_rankings(out / 'examples.html', caps, [base.sims])
    images = page.root.all('section', 'image-query')
    assert [s.one('h3').text() for s in images] == ['Image 0', 'Image 39']  # 2 queries spread over 40 images
    for section, i in zip(images, (0, 39)):
        results = section.all('li', 'result')
        top = np.argsort(-base.sims[i], kind='stable')[:3]
        assert [li.one('span', 'caption').text() for li in results] == [caps[j] for j in top]
        assert [li.one('span', 'mark').text() for li in results] == ['correct' if j // 5 == i else 'wrong' for j in top]
        labels = section.all('li', 'label')
        assert len(labels) == 10 and {li.one('span', 'word').text() for li in labels} <= set(world.labels)
        probs = [float(li.one('span', 'prob').text()) for li in labels]
        assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
    sentences = page.root.all('section', 'text-query')
    assert sentences[0].one('q').text() == caps[0]  # sentence 0 is a query
    assert not page.root.all('img', 'thumb') and len(page.root.all('div', 'noimg')) == 2 + 2 * 5  # no --image_dir
    for section in sentences:  # where each word of the sentence looks in its top image
        figures = section.all('li', 'result')[0].all('figure')
        assert figures and not section.all('li', 'result')[1].all('figure')
        assert [f.one('figcaption').text() for f in figures] == vocab_lib.tokenize(section.one('q').text())
        for f in figures:
            with Image.open(out / f.one('img').attrs['src']) as im:
                assert im.size == (report.CANVAS, report.CANVAS)

    names_file = os.path.join(world.data, 'toy_precomp', 'test_image_names.txt')
    with open(names_file, 'w', encoding='utf-8') as f:
        f.write('\n'.join(f'{1000 + i}.jpg' for i in range(40)) + '\n')
    image_dir = tmp_path / 'flickr30k-images'
    for i in range(40):
        write_image(str(image_dir / f'{1000 + i}.jpg'), size=(300, 200))
    out = tmp_path / 'with_images'
    try:
        run_eval(world, world.a, '--examples', '2', '--out', str(out), '--image_dir', str(image_dir))
    finally:
        os.remove(names_file)
    page = check_sentence_rankings(out / 'examples.html', caps, [base.sims])
    thumbs = page.root.all('img', 'thumb')
    assert len(thumbs) == 2 + 2 * 5 and not page.root.all('div', 'noimg')
    assert page.root.all('section', 'image-query')[0].one('img').attrs['src'] == 'img_000000.jpg'
    assert page.root.all('section', 'image-query')[0].one('span', 'name').text() == '1000.jpg'
    for name in {t.attrs['src'] for t in thumbs}:
        with Image.open(out / name) as im:
            assert im.size == (256, 171)  # 300 x 200 at most 256 px
    for f in page.root.all('figure'):  # heat maps over the thumbnail
        with Image.open(out / f.one('img').attrs['src']) as im:
            assert im.size == (256, 171)


def test_an_examples_report_or_its_pictures_are_not_replaced_without_overwrite(world, tmp_path, capsys):
    out = tmp_path / 'report'
    run_eval(world, world.a, '--examples', '1', '--out', str(out))
    written = {f: (out / f).read_bytes() for f in os.listdir(out)}
    capsys.readouterr()
    message = exit_message(world, world.a, '--examples', '1', '--out', str(out))
    assert message == (f'error: {out / "examples.html"} exists (a page written before): pass --overwrite to '
                       f'replace the page and its pictures, or choose another --out')
    assert 'similarity:' not in capsys.readouterr().out  # refused before any scoring
    os.remove(out / 'examples.html')  # the pictures of a page are the user's too
    message = exit_message(world, world.a, '--examples', '1', '--out', str(out))
    assert message.startswith(f'error: {out / "s0_r1_w1.png"} exists') and '--overwrite' in message
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == {f: b for f, b in written.items()
                                                                    if f != 'examples.html'}
    run_eval(world, world.a, '--examples', '1', '--out', str(out), '--overwrite')
    assert (out / 'examples.html').read_bytes() == written['examples.html']
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'holiday.jpg').write_bytes(b'a photo')  # other files in --out are no page's
    run_eval(world, world.a, '--examples', '1', '--out', str(tmp_path / 'mine'))
    assert (tmp_path / 'mine' / 'holiday.jpg').read_bytes() == b'a photo'


def test_examples_report_of_a_checkpoint_validated_on_the_local_score(world, tmp_path):
    # train.py --alpha 1 (validate on the local score) stores alpha 1.0 in the checkpoint's
    # options; the report still has a label head to show.
    ckpt = torch.load(world.a, map_location='cpu', weights_only=True)
    ckpt['opt'] = {**ckpt['opt'], 'alpha': 1.0}
    path = str(tmp_path / 'alpha1.pth.tar')
    torch.save(ckpt, path)
    run_eval(world, path, '--examples', '1', '--out', str(tmp_path / 'report'))
    page = check_page(str(tmp_path / 'report' / 'examples.html'))
    assert len(page.root.all('ol', 'labels')) == 1 and len(page.root.all('li', 'label')) == 10


def test_fold5_examples_rank_each_sentence_with_its_own_scores(world, tmp_path):
    out = tmp_path / 'report'
    run_eval(world, world.a, '--split', 'testall', '--fold5', '--examples', '2', '--out', str(out),
             '--save_sims', str(tmp_path / 'f.npy'))
    folds = [np.load(tmp_path / f'f_fold{f}.npy') for f in range(5)]
    check_sentence_rankings(out / 'examples.html', split_captions(world, 'testall'), folds)
