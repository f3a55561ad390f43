"""The fast engine equals the authors' loop algorithm (reference.py), and trains."""
import dataclasses
import itertools

import pytest
import torch

import engine
import model
import reference as ref
from conftest import D, H, K, L, LENS, N_CAP, N_IMG, R, tiny
from engine import cross_attention, prepare
from model import CASC, Config, hinge_loss


def engine_scores(img, cap, mask, head, cfg, alpha=0.8):
    """CASC.scores of the prepared inputs, with cfg's score options and `head`'s weights (None: no head)."""
    m = CASC(dataclasses.replace(cfg, vocab_size=10, word_dim=4, embed_size=D, img_dim=3, label_hidden=H,
                                 num_labels=0 if head is None else K)).to(img.dtype)
    if head is not None:
        m.head.load_state_dict(head.state_dict())
    return m.scores(prepare(img, None, m.head), prepare(cap, mask, m.head), alpha=alpha)


@pytest.mark.parametrize('norm', engine.NORMS)
@pytest.mark.parametrize('cross_attn', ['all', 't2i', 'i2t'])
def test_scores_equal_authors_loop_every_norm_and_direction(norm, cross_attn):
    img, cap, mask, head = tiny()
    cfg = Config(raw_feature_norm=norm, cross_attn=cross_attn)
    with torch.no_grad():
        fast = engine_scores(img, cap, mask, head, cfg)
        slow = ref.casc_scores(img, cap, LENS, cfg, head)  # alpha 0.8
    torch.testing.assert_close(fast.local, slow['s_loc'], rtol=0, atol=1e-10)
    torch.testing.assert_close(fast.label, slow['s_label'], rtol=0, atol=1e-10)
    torch.testing.assert_close(fast.sims, slow['s'], rtol=0, atol=1e-10)


@pytest.mark.parametrize('t2i_agg,i2t_agg', list(itertools.product(engine.AGGS, engine.AGGS)))
def test_scores_equal_authors_loop_every_aggregation(t2i_agg, i2t_agg):
    img, cap, mask, head = tiny(seed=1)
    cfg = Config(t2i_agg_func=t2i_agg, i2t_agg_func=i2t_agg, lambda_lse=3.0)
    with torch.no_grad():
        fast = engine_scores(img, cap, mask, head, cfg)
        slow = ref.casc_scores(img, cap, LENS, cfg, head)
    for f, s in (('local', 's_loc'), ('sims', 's')):
        torch.testing.assert_close(getattr(fast, f), slow[s], rtol=0, atol=1e-10)


def test_float32_engine_within_1e5_of_reference():
    img, cap, mask, head = tiny(seed=2, dtype=torch.float32)
    with torch.no_grad():
        fast = engine_scores(img, cap, mask, head, Config())
        slow = ref.casc_scores(img.double(), cap.double(), LENS, Config(), head.double())
    assert (fast.sims.double() - slow['s']).abs().max() < 1e-5


def test_alpha_one_is_the_local_score_and_no_head_means_local():
    img, cap, mask, head = tiny()
    with torch.no_grad():
        fused = engine_scores(img, cap, mask, head, Config())
        alpha_one = engine_scores(img, cap, mask, head, Config(), alpha=1.0)
        headless = engine_scores(img, cap, mask, None, Config())  # num_labels 0: CASC-base / SCAN
    assert not torch.allclose(fused.sims, fused.local)  # the label term counts at alpha 0.8
    for out in (alpha_one, headless):
        assert out.label is None and out.logits_img is None and torch.equal(out.sims, out.local)
        torch.testing.assert_close(out.local, fused.local, rtol=0, atol=1e-12)


def test_gram_identity_for_attended_norms():
    """||sum_c a_c x_c||^2 == a^T G a, the identity that spares the attended vectors."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(R, D, generator=g, dtype=torch.float64)
    a = torch.softmax(torch.randn(L, R, generator=g, dtype=torch.float64), -1)
    side = prepare(x[None], None, None)
    torch.testing.assert_close((a @ x).pow(2).sum(-1), ((a @ side.gram[0]) * a).sum(-1))


def test_padding_changes_no_score():
    """Appending padded word positions (with garbage that the mask hides) changes nothing."""
    img, cap, mask, head = tiny(seed=4)
    wide = torch.cat([cap, torch.zeros(N_CAP, 3, D, dtype=cap.dtype)], 1)
    wide_mask = torch.cat([mask, torch.zeros(N_CAP, 3, dtype=torch.bool)], 1)
    cfg = Config()
    with torch.no_grad():
        a = engine_scores(img, cap, mask, head, cfg)
        b = engine_scores(img, wide, wide_mask, head, cfg)
    torch.testing.assert_close(a.sims, b.sims, rtol=0, atol=1e-12)


def test_chunks_equal_one_shot():
    """Scoring any sub-block of images x captions gives the same numbers as all pairs at once."""
    img, cap, mask, head = tiny(seed=5)
    cfg = Config()
    with torch.no_grad():
        full = engine_scores(img, cap, mask, head, cfg).sims
        for i0, i1, j0, j1 in ((0, 1, 0, 5), (1, 3, 2, 5), (2, 3, 4, 5)):
            part = engine_scores(img[i0:i1], cap[j0:j1], mask[j0:j1], head, cfg).sims
            torch.testing.assert_close(part, full[i0:i1, j0:j1], rtol=0, atol=1e-12)


@pytest.mark.parametrize('max_violation', [False, True])
def test_hinge_loss_hand_example(max_violation):
    sims = torch.tensor([[0.9, 0.8, 0.1], [0.5, 0.4, 0.3], [0.2, 0.7, 0.6]])
    # margin 0.2. cost_cap[i, j] = [0.2 + s_ij - s_ii]_+ : row 0: j=1 0.1; row 1: j=0 0.3, j=2 0.1;
    # row 2: j=1 0.3. cost_img[i, j] = [0.2 + s_ij - s_jj]_+ : col 0: i=1 0.0 (0.2+0.5-0.9 < 0);
    # col 1: i=0 0.6, i=2 0.5; col 2: i=1 0.0 (0.2+0.3-0.6 < 0), i=0 0.
    expected = (0.1 + 0.3 + 0.3) + 0.6 if max_violation else (0.1 + 0.3 + 0.1 + 0.3) + (0.6 + 0.5)
    got = hinge_loss(sims, 0.2, max_violation)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert got.item() == pytest.approx(ref.hinge_loss(sims, 0.2, max_violation).item(), abs=1e-6)


def test_training_loss_equals_authors_loss_and_uses_pos_weight():
    torch.manual_seed(0)
    cfg = Config(vocab_size=30, word_dim=6, embed_size=D, img_dim=10, num_labels=K, label_hidden=H)
    m = CASC(cfg).double()
    B = 4
    images = torch.rand(B, R, 10, dtype=torch.float64)
    lengths = torch.tensor([6, 3, 5, 2])
    captions = torch.randint(4, 30, (B, 6)) * (torch.arange(6) < lengths[:, None])
    targets = (torch.rand(B, K) > 0.5).double()
    pos_weight = torch.linspace(0.5, 4.0, K, dtype=torch.float64)
    out = m(images, captions, lengths, targets, pos_weight)
    img_emb, cap_emb = m.img_enc(images), m.txt_enc(captions, lengths)
    expected = ref.train_loss(img_emb, cap_emb, lengths, targets, cfg, m.head, pos_weight)
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-10)
    other = m(images, captions, lengths, targets, pos_weight * 2)
    assert abs(other.label_loss.item() - out.label_loss.item()) > 1e-3


def test_gradients_reach_every_parameter_and_stay_finite_with_short_captions():
    torch.manual_seed(0)
    for enc_type in ('basic', 'weight_norm'):
        cfg = Config(vocab_size=30, word_dim=6, embed_size=D, img_dim=10, num_labels=K, label_hidden=H,
                     precomp_enc_type=enc_type, num_layers=2)
        m = CASC(cfg)
        lengths = torch.tensor([7, 1, 2, 3])  # mostly padding: the NaN trap of spec 8b
        captions = torch.randint(4, 30, (4, 7)) * (torch.arange(7) < lengths[:, None])
        out = m(torch.rand(4, R, 10), captions, lengths, (torch.rand(4, K) > 0.5).float(), torch.ones(K))
        out.loss.backward()
        for name, p in m.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert torch.isfinite(p.grad).all(), name


def test_text_encoder_ignores_padding():
    """The (bidirectional) GRU never sees pads: extra padding leaves every real word's embedding."""
    torch.manual_seed(0)
    enc = model.EncoderText(30, 6, D, num_layers=1, bi_gru=True)
    ids = torch.tensor([[1, 5, 7, 2, 0], [1, 9, 2, 0, 0]])
    lens = torch.tensor([4, 3])
    a = enc(ids, lens)
    b = enc(torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], 1), lens)
    torch.testing.assert_close(a, b[:, :5])
    assert (b[:, 5:] == 0).all() and (a[1, 3:] == 0).all()


def test_config_rejects_unknown_options_naming_the_flag():
    with pytest.raises(ValueError, match='--raw_feature_norm'):
        Config(raw_feature_norm='relu')
    with pytest.raises(ValueError, match='--cross_attn'):
        Config(cross_attn='both')


@pytest.mark.parametrize('over_words', [False, True])
def test_quad_form_gradients(over_words):
    """QuadForm's hand-written backward (it recomputes G a) against autograd's numerical check."""
    g = torch.Generator().manual_seed(6)
    attn = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4 if over_words else 2, 5 if over_words else 3, 6, generator=g, dtype=torch.float64)
    gram = (x @ x.transpose(1, 2)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, G: engine.QuadForm.apply(a, G, over_words), (attn, gram))


def test_training_gradients_equal_the_authors_loss_gradients():
    torch.manual_seed(1)
    cfg = Config(vocab_size=30, word_dim=6, embed_size=D, img_dim=10, num_labels=K, label_hidden=H)
    m = CASC(cfg).double()
    images = torch.rand(4, R, 10, dtype=torch.float64)
    lengths = torch.tensor([6, 3, 5, 2])
    captions = torch.randint(4, 30, (4, 6)) * (torch.arange(6) < lengths[:, None])
    targets = (torch.rand(4, K) > 0.5).double()
    m(images, captions, lengths, targets, torch.ones(K, dtype=torch.float64)).loss.backward()
    fast = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    ref.train_loss(m.img_enc(images), m.txt_enc(captions, lengths), lengths, targets, cfg, m.head,
                   torch.ones(K, dtype=torch.float64)).backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(fast[n], p.grad, rtol=1e-7, atol=1e-9, msg=n)


def test_reduced_precision_products_stay_close_and_fp32_is_exact():
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(50, 64, generator=g), torch.randn(40, 64, generator=g)
    exact = a.double() @ b.double().T
    products = {p: engine.region_word_product(a, b, p) for p in ('fp32', 'tf32', 'bf16')}
    assert all(x.dtype == torch.float32 and x.shape == (50, 40) for x in products.values())
    err = {p: (x.double() - exact).abs().max().item() for p, x in products.items()}
    # fp32 rounds only float32 sums (about 1e-5 here); tf32 keeps 10 mantissa bits of the inputs (about 1e-2), bf16 7
    assert err['fp32'] < 1e-4 < err['tf32'] < err['bf16'] < 0.5, err
    x = torch.tensor([1.0 + 2 ** -11, 1.0 + 2 ** -10 + 2 ** -12])
    assert engine.region_word_product(x[:, None], torch.ones(1, 1), 'tf32').flatten().tolist() == [1.0 + 2 ** -10, 1.0 + 2 ** -10]


@pytest.mark.parametrize('group', [1, 2, 3, 8])
def test_grouped_training_attention_equals_one_call(group):
    """Length groups (uneven last group included) give exactly the all-at-once scores and the
    matched pairs' head inputs."""
    img, cap, mask, head = tiny(seed=8)
    img = img[[0, 1, 2, 0, 1]]  # 5 matched pairs
    sides = prepare(img, None, head), prepare(cap, mask, head)
    full = cross_attention(*sides, Config())
    grouped = engine.grouped_cross_attention(*sides, Config(), group=group)
    for k in ('s_t2i', 's_i2t'):
        torch.testing.assert_close(getattr(grouped, k), getattr(full, k), rtol=0, atol=1e-12)
    for k in ('h_img', 'h_txt'):
        torch.testing.assert_close(getattr(grouped, k), getattr(full, k).diagonal().T, rtol=0, atol=1e-12)


@pytest.mark.parametrize('norm', engine.NORMS)
def test_t2i_attention_equals_the_authors_loop_for_every_pair(norm):
    """engine.t2i_attention (where each word looks, drawn by the search page) is the attention of
    the reference loop's func_attention for words querying regions, pair by pair; 0 on padding."""
    img, cap, mask, head = tiny()
    cfg = Config(raw_feature_norm=norm)
    attn = engine.t2i_attention(prepare(img, None, None), prepare(cap, mask, None), cfg)
    assert attn.shape == (N_IMG, N_CAP, L, R)
    for i in range(N_IMG):
        for j, n_words in enumerate(LENS.tolist()):
            _, expected = ref.func_attention(cap[j:j + 1, :n_words], img[i:i + 1], raw_feature_norm=norm,
                                             smooth=cfg.lambda_softmax_avg)  # (1, n_words, R)
            torch.testing.assert_close(attn[i, j, :n_words], expected[0], rtol=0, atol=1e-10)
            assert not attn[i, j, n_words:].any()
    torch.testing.assert_close(attn.sum(-1), mask[None].expand(N_IMG, -1, -1).to(attn.dtype), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- the CPU's fused kernel (fused.cpp)

@pytest.fixture
def kernel():
    import fused
    if fused.library() is None:
        pytest.skip('fused.cpp could not be built here (no C++ compiler?): scoring runs the eager code')
    return fused


@pytest.fixture
def eager(monkeypatch):
    """Within the test, engine.py runs its eager code (as without a compiler, or with CASC_FUSED=0)."""
    import fused
    monkeypatch.setitem(fused._state, 'tried', True)
    monkeypatch.setitem(fused._state, 'lib', None)


def paper_like(seed: int, dtype=torch.float32) -> tuple:
    """36 regions (4 pad lanes in the kernel's last block of 8), captions of 1 to 25 words (1 to 4
    blocks of 8), H = 16 (the head's fused tanh), K = 13 (the cosine's scalar tail)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([25, 1, 8, 9, 16, 17, 3])
    img = engine.l2norm(torch.randn(4, 36, 24, generator=g, dtype=dtype))
    mask = torch.arange(25) < lens[:, None]
    cap = engine.l2norm(torch.randn(7, 25, 24, generator=g, dtype=dtype)) * mask[..., None]
    head = model.LabelHead(24, 16, 13).to(dtype)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.5, generator=g)
    return img, cap, mask, lens, head


def scores_of(img, cap, mask, head, cfg, **kw):
    m = CASC(dataclasses.replace(cfg, embed_size=img.size(-1), label_hidden=head.fc1.out_features,
                                 num_labels=head.fc2.out_features)).to(img.dtype)
    m.head.load_state_dict(head.state_dict())
    with torch.inference_mode():
        return m.scores(prepare(img, None, m.head), prepare(cap, mask, m.head), **kw)


@pytest.mark.parametrize('norm', ['clipped_l2norm', 'l2norm', 'clipped_l1norm', 'l1norm', 'clipped', 'no_norm'])
@pytest.mark.parametrize('t2i_agg,i2t_agg', [('Mean', 'LogSumExp'), ('Max', 'Sum'), ('LogSumExp', 'Mean'), ('Sum', 'Max')])
def test_fused_kernel_equals_the_eager_engine_and_the_authors_loop(kernel, norm, t2i_agg, i2t_agg, request):
    img, cap, mask, lens, head = paper_like(seed=9)
    cfg = Config(raw_feature_norm=norm, t2i_agg_func=t2i_agg, i2t_agg_func=i2t_agg)
    assert kernel.applies(prepare(img, None, None), prepare(cap, mask, None), norm)
    fast = scores_of(img, cap, mask, head, cfg)
    request.getfixturevalue('eager')
    slow = scores_of(img, cap, mask, head, cfg)
    with torch.no_grad():
        authors = ref.casc_scores(img.double(), cap.double(), lens, cfg, head.double())
    tol = 1e-5 if 'Sum' in (t2i_agg, i2t_agg) else 2e-6  # float32 sums of up to 36 terms
    for f in ('sims', 'local', 'label', 'logits_img'):
        torch.testing.assert_close(getattr(fast, f), getattr(slow, f), rtol=0, atol=tol, msg=f)
    assert (fast.sims.double() - authors['s']).abs().max() < 1e-5


def test_fused_chunks_equal_one_shot_with_an_uneven_last_chunk(kernel):
    img, cap, mask, _, head = paper_like(seed=10)
    full = scores_of(img, cap, mask, head, Config()).sims
    for i0, i1, j0, j1 in ((0, 3, 0, 7), (3, 4, 0, 7), (0, 4, 2, 5), (1, 2, 6, 7)):
        part = scores_of(img[i0:i1], cap[j0:j1], mask[j0:j1], head, Config()).sims
        torch.testing.assert_close(part, full[i0:i1, j0:j1], rtol=0, atol=1e-6)


def test_without_a_compiler_scoring_falls_back_to_eager(kernel, monkeypatch, caplog):
    img, cap, mask, _, head = paper_like(seed=11)
    fast = scores_of(img, cap, mask, head, Config()).sims
    monkeypatch.setenv('CXX', 'no-such-compiler-casc')
    monkeypatch.setitem(kernel._state, 'tried', False)
    monkeypatch.setitem(kernel._state, 'lib', None)
    with caplog.at_level('WARNING'):
        slow = scores_of(img, cap, mask, head, Config()).sims
    assert kernel.library() is None and 'eager scoring' in caplog.text
    torch.testing.assert_close(fast, slow, rtol=0, atol=2e-6)


def test_without_openmp_the_kernel_runs_its_own_threads_with_identical_scores(kernel, monkeypatch, tmp_path):
    """A compiler without OpenMP (here: one that rejects the flag) builds the kernel on std::thread."""
    img, cap, mask, _, head = paper_like(seed=17)
    img = torch.cat([img] * 20)  # 80 images x 7 captions = 560 pairs: 9 blocks, over 2 threads
    omp = scores_of(img, cap, mask, head, Config())
    monkeypatch.setattr(kernel, 'OPENMP', '-fno-such-option-casc')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    monkeypatch.setitem(kernel._state, 'tried', False)
    monkeypatch.setitem(kernel._state, 'lib', None)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        own = scores_of(img, cap, mask, head, Config())
    finally:
        torch.set_num_threads(threads)
    assert kernel.library() is not None and len(list((tmp_path / 'casc').glob('fused_*.so'))) == 1
    for f in ('sims', 'label', 'logits_img'):
        assert torch.equal(getattr(omp, f), getattr(own, f)), f


def test_kernel_stays_out_of_training_float64_and_softmax_norm(kernel):
    img, cap, mask, _, _ = paper_like(seed=12)
    sides = prepare(img, None, None), prepare(cap, mask, None)
    assert kernel.applies(*sides, 'clipped_l2norm')
    assert not kernel.applies(*sides, 'softmax')  # not in the kernel: eager
    assert not kernel.applies(prepare(img.double(), None, None), prepare(cap.double(), mask, None), 'l2norm')
    trained = prepare(img.requires_grad_(), None, None)
    assert not kernel.applies(trained, sides[1], 'l2norm')  # gradients: eager (QuadForm's backward)


def test_cpu_gemms_write_padded_rows_with_the_same_products(kernel):
    """engine.GEMM_LANES: 175 region-word products per row and K = 13 logits are written in rows of
    176 and 16 floats (MKL runs ~30% faster on rows of a multiple of 8 here); the views hold the same
    numbers as the plain products. Training (gradients wanted) gets plain contiguous products."""
    g = torch.Generator().manual_seed(21)
    a, b, h = torch.randn(72, 24, generator=g), torch.randn(175, 24, generator=g), torch.randn(4, 7, 16, generator=g)
    w2, b2 = torch.randn(13, 16, generator=g), torch.randn(13, generator=g)
    with torch.inference_mode():
        s = engine.region_word_product(a, b, 'fp32', engine.GEMM_LANES)
        logits = engine.head_logits(h, w2, b2)
        assert s.shape == (72, 175) and s.stride() == (176, 1)
        assert logits.shape == (4, 7, 13) and logits.stride() == (7 * 16, 16, 1)
        torch.testing.assert_close(s, a @ b.T, rtol=0, atol=1e-6)
        torch.testing.assert_close(logits, torch.addmm(b2, h.flatten(0, 1), w2.T).view(4, 7, 13), rtol=0, atol=1e-6)
        assert engine.region_word_product(a, b, 'bf16', engine.GEMM_LANES).is_contiguous()  # fp32 only
    w2.requires_grad_()
    assert engine.head_logits(h, w2, b2).is_contiguous()
    assert engine.region_word_product(a.requires_grad_(), b, 'fp32', engine.GEMM_LANES).is_contiguous()


@pytest.mark.parametrize('use_kernel', [True, False])
def test_label_head_scores_a_transposed_view_in_place(use_kernel, request):
    img, cap, mask, _, head = paper_like(seed=13)
    request.getfixturevalue('kernel' if use_kernel else 'eager')
    h = torch.randn(7, 4, 16)  # caption-major memory, seen as (n_img, n_cap, H)
    with torch.inference_mode():
        view, copy = head.from_hidden(h.transpose(0, 1)), head.from_hidden(h.transpose(0, 1).contiguous())
        expected = head.fc2(torch.tanh(h.transpose(0, 1) + head.fc1.bias))
    assert view.shape == (4, 7, 13) and view.stride(-1) == 1
    assert view.stride(1) > view.stride(0) >= 13  # caption-major memory, as h's: no copy of the pairs
    torch.testing.assert_close(view, copy, rtol=0, atol=1e-6)
    torch.testing.assert_close(view, expected, rtol=0, atol=1e-5)


def test_bf16_scores_stay_close_to_fp32():
    img, cap, mask, _, head = paper_like(seed=14)
    exact, bf16 = (scores_of(img, cap, mask, head, Config(), precision=p) for p in ('fp32', 'bf16'))
    diff = (exact.sims - bf16.sims).abs().max().item()
    assert 0 < diff < 2e-2, diff  # both large products (region-word and the head's W2) from bfloat16 inputs
    assert (exact.logits_img - bf16.logits_img).abs().max() > 0


def test_fused_kernel_threads_give_identical_results(kernel):
    """Blocks of 64 pairs go to whichever thread is free: results identical for any thread count."""
    img, cap, mask, _, head = paper_like(seed=15)
    img = torch.cat([img] * 5)  # 20 images x 7 captions = 140 pairs: 3 blocks
    sides = prepare(img, None, head), prepare(cap, mask, head)
    s_rw = sides[0].emb.flatten(0, 1) @ sides[1].emb.flatten(0, 1).T  # (20 * 36, 7 * 25)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            outs.append(kernel.cross_attention(s_rw, *sides, raw_feature_norm='clipped_l2norm', lambda_t2i=9.0,
                                               lambda_i2t=4.0, t2i_agg='Mean', i2t_agg='LogSumExp', lambda_lse=6.0,
                                               b1=head.fc1.bias.detach()))
    finally:
        torch.set_num_threads(threads)
    assert outs[0][2].shape == outs[0][3].shape == (20, 7, 16)  # h_img, h_txt: the head's hidden layers
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize('hidden', [16, 75])  # 75: blocks of 64 and of 8 lanes, and a scalar tail of 3
def test_fused_kernel_gives_the_heads_first_layer_and_hidden_layer_of_the_pooled_contexts(kernel, hidden, request):
    img, cap, mask, _, _ = paper_like(seed=16)
    head = model.LabelHead(24, hidden, 13)
    with torch.inference_mode():
        sides = prepare(img, None, head), prepare(cap, mask, head)
        fast = [cross_attention(*sides, Config(), b1=b1) for b1 in (None, head.fc1.bias)]
        request.getfixturevalue('eager')
        slow = [cross_attention(*sides, Config(), b1=b1) for b1 in (None, head.fc1.bias)]
    for f, s in zip(fast, slow):
        for k in ('s_t2i', 's_i2t', 'h_img', 'h_txt'):
            assert getattr(f, k).shape == getattr(s, k).shape
            torch.testing.assert_close(getattr(f, k), getattr(s, k), rtol=0, atol=2e-6, msg=k)
    torch.testing.assert_close(fast[1].h_img, torch.tanh(slow[0].h_img + head.fc1.bias), rtol=0, atol=2e-6)
    assert (fast[1].h_txt - fast[0].h_txt).abs().max() > 0.1  # the bias and tanh were applied
