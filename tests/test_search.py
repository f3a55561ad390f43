"""search.py (issue 10): text queries -> top images, query images -> top captions, with exactly
evaluation.py's scores (--save_sims on the same split), ranks of a stable sort (equal scores to the
lower index), the top k streamed over chunks equal to a full sort for any chunk size, the one chunk
planner (scoring.plan_chunks) giving compute_sims the chunks it scored before, refusals with one
line, the --json schema and the tables, the Searcher API; the HTML page of --out: Searcher.attention
equal to the authors' loop, the heat maps drawn from it on the grid or the split's boxes, the labels
of the pair, thumbnails with --image_dir, hostile data as text only. conftest's toy model, on toy
splits of this module's sizes."""
import contextlib
import dataclasses
import io
import json
import os
import pathlib
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import encode
import evaluation
import labels as labels_lib
import model as model_lib
import reference as ref
import featstore
import report
import scoring
import search
import toy as toy_lib
import util
import vocab as vocab_lib
from model import Config
from test_cli_safety import help_entries
from test_report import HOSTILE, check_page, pictures_in, write_image

TRAINING_FIXTURES = {'world'}  # fixtures that train a model: their tests are slow (conftest)

N_IMG, N_CAP = 30, 150  # the toy test split: 30 images, 5 captions each
SIZES = {'train': 40, 'dev': 10, 'test': N_IMG}
DUP, OF = 7, 3  # in the 'dup' split, image 7 and its captions are copies of image 3's


# ---------------------------------------------------------------- the toy world

@pytest.fixture(scope='module')
def world(tmp_path_factory, toy, toy_model):
    """conftest's toy model (a copy of its checkpoint: search.py writes its index beside it), with its
    vocabulary and 20 labels, on toy data of SIZES: the test split (no image names), and 'dup': the test split with image 7 and its 5 captions replaced by copies of image 3
    and its captions, with image names (1000.jpg .. 1029.jpg: a names file never repeats one). Also
    evaluation.py --save_sims on both splits: the scores search must reproduce."""
    root = tmp_path_factory.mktemp('search')
    data_path = root / 'data'
    folder = toy_lib.make_toy(str(data_path), sizes=SIZES)
    ims = np.load(os.path.join(folder, 'test_ims.npy'))
    caps = open(os.path.join(folder, 'test_caps.txt'), encoding='utf-8').read().splitlines()
    ims[DUP], caps[5 * DUP:5 * DUP + 5] = ims[OF], caps[5 * OF:5 * OF + 5]
    np.save(os.path.join(folder, 'dup_ims.npy'), ims)
    names = [f'{1000 + i}.jpg' for i in range(N_IMG)]
    for kind, lines in (('caps', caps), ('image_names', names)):
        with open(os.path.join(folder, f'dup_{kind}.txt'), 'w', encoding='utf-8') as f:
            f.write('\n'.join(lines) + '\n')
    os.makedirs(root / 'A')
    ckpt = str(shutil.copy(toy_model / 'checkpoint_0.pth.tar', root / 'A' / 'checkpoint_0.pth.tar'))
    with contextlib.redirect_stdout(io.StringIO()):
        sims = {}
        for split in ('test', 'dup'):
            path = str(root / f'{split}_sims.npy')
            evaluation.main(['--model_path', ckpt, '--data_path', str(data_path), '--split', split,
                             '--save_sims', path, '--device', 'cpu'])
            sims[split] = np.load(path)  # (30, 150) float32
    captions = {s: open(os.path.join(folder, f'{s}_caps.txt'), encoding='utf-8').read().splitlines()
                for s in ('test', 'dup')}
    return SimpleNamespace(root=root, data=str(data_path), ckpt=ckpt, sims=sims, captions=captions, names=names,
                           vocab=pathlib.Path(toy.vocab_path))


@pytest.fixture(scope='module')
def searcher(world):
    return search.Searcher(world.ckpt, world.data, 'test', device='cpu')


@pytest.fixture(scope='module')
def dup(world):
    return search.Searcher(world.ckpt, world.data, 'dup', device='cpu')


def run(world, capsys, *args, split='test', model_path=None) -> tuple:
    """search.main on the world's checkpoint -> (returned results, stdout, stderr)."""
    capsys.readouterr()
    results = search.main(['--model_path', model_path or world.ckpt, '--data_path', world.data, '--split', split,
                           '--device', 'cpu', *args])
    out, err = capsys.readouterr()
    return results, out, err


def refusal(world, capsys, *args, **kw) -> str:
    """search.main's one-line error; nothing on stdout."""
    with pytest.raises(SystemExit) as exc:
        run(world, capsys, *args, **kw)
    msg = exc.value.code
    assert isinstance(msg, str) and msg.startswith('error: ') and '\n' not in msg, msg
    assert capsys.readouterr().out == ''
    return msg


def indices(res: dict) -> list:
    return [r['index'] for r in res['results']]


def scores(res: dict) -> np.ndarray:
    return np.array([r['score'] for r in res['results']])


def same_results(a: list, b: list) -> bool:
    """The same queries, ranks, items and texts, and the same scores up to float32 rounding (which
    moves with the padding and the batch sizes a query is scored with: ~1e-7)."""
    strip = lambda results: [{**res, 'results': [{**r, 'score': None} for r in res['results']]}  # noqa: E731
                             for res in results]
    return strip(a) == strip(b) and all(np.allclose(scores(x), scores(y), rtol=0, atol=1e-6) for x, y in zip(a, b))


def stable_order(values: np.ndarray) -> list:
    """Highest first, equal values in index order."""
    return np.argsort(-values, kind='stable').tolist()


# ---------------------------------------------------------------- the scores are evaluation.py's

def test_text_queries_equal_to_captions_score_that_captions_column_in_stable_order(world, searcher):
    js = [0, 7, 64, 113, 149]
    results = searcher.text([world.captions['test'][j] for j in js], k=N_IMG)
    for j, res in zip(js, results):
        column = world.sims['test'][:, j]
        assert sorted(indices(res)) == list(range(N_IMG))  # every image once
        np.testing.assert_allclose(scores(res), column[indices(res)], rtol=0, atol=1e-6)
        assert indices(res) == stable_order(column)
        assert [r['rank'] for r in res['results']] == list(range(1, N_IMG + 1))


def test_image_queries_score_that_images_row_in_stable_order_and_mark_its_captions(world, searcher):
    rows = [0, 3, 29, 3]  # a query twice gets the same answer twice
    results = searcher.image(rows, k=N_CAP)
    assert [res['image'] for res in results] == rows
    for i, res in zip(rows, results):
        row = world.sims['test'][i]
        np.testing.assert_allclose(scores(res), row[indices(res)], rtol=0, atol=1e-6)
        assert indices(res) == stable_order(row)
        assert [r['correct'] for r in res['results']] == [j // 5 == i for j in indices(res)]
        assert [r['caption'] for r in res['results']] == [world.captions['test'][j] for j in indices(res)]
    assert results[1] == results[3]


def test_equal_scores_go_to_the_lower_index_both_ways(world, dup):
    # Image 7 is a copy of image 3: every caption scores them equally (exactly, in evaluation.py too).
    sims = world.sims['dup']
    np.testing.assert_array_equal(sims[DUP], sims[OF])
    res, = dup.text(world.captions['dup'][5 * OF], k=N_IMG)
    rank = {r['index']: (r['rank'], r['score']) for r in res['results']}
    assert rank[OF][1] == rank[DUP][1] and rank[OF][0] < rank[DUP][0]
    assert indices(res) == stable_order(sims[:, 5 * OF])
    # Captions 35..39 are copies of 15..19: each query image scores them equally, the lower index first.
    for i in (OF, DUP):
        res, = dup.image(i, k=N_CAP)
        rank = {r['index']: r for r in res['results']}
        for j in range(5 * OF, 5 * OF + 5):
            first, second = rank[j], rank[j + 5 * (DUP - OF)]
            assert first['score'] == second['score'] and first['rank'] < second['rank']
            assert (first['correct'], second['correct']) == ((True, False) if i == OF else (False, True))
        assert indices(res) == stable_order(sims[i])


# ---------------------------------------------------------------- the top k, streamed

@pytest.mark.parametrize('k', [1, 4, 23])
def test_merge_topk_over_chunks_equals_a_full_stable_sort(k):
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 6, (5, 23), generator=g).float()  # (n_q, n): many ties
    gallery = torch.randperm(23, generator=g)  # items arrive in any order (captions come by length)
    full = torch.empty_like(values).scatter_(1, gallery.expand(5, -1), values)  # by gallery index
    expected = torch.stack([torch.tensor(stable_order(row.numpy())[:k]) for row in full])
    for step in (1, 3, 10, 23):  # 23 = 7 x 3 + 2 = 2 x 10 + 3: uneven last chunks
        best = None
        for j0 in range(0, 23, step):
            best = scoring.merge_topk(best, values[:, j0:j0 + step], gallery[j0:j0 + step], k)
        assert torch.equal(best[1], expected), step
        assert torch.equal(best[0], full.gather(1, expected))


@pytest.mark.parametrize('step', [1, 7, N_IMG])
def test_streamed_search_equals_a_full_sort_for_any_chunk_size(world, searcher, monkeypatch, step):
    chunks = []

    def plan(n, *args, **kw):  # fixed chunks: 30 = 4 x 7 + 2
        chunks.append([(i0, min(i0 + step, n)) for i0 in range(0, n, step)])
        return chunks[-1]

    monkeypatch.setattr(scoring, 'plan_chunks', plan)
    js = [2, 50, 148]
    for j, res in zip(js, searcher.text([world.captions['test'][j] for j in js], k=5)):
        assert indices(res) == stable_order(world.sims['test'][:, j])[:5]
    assert chunks[0] == [(i0, min(i0 + step, N_IMG)) for i0 in range(0, N_IMG, step)]
    # Image queries: the gallery's captions come in batches of any size (150 = 21 x 7 + 3).
    model, sims = searcher.model, world.sims['test']
    query = evaluation.encode_images(model, searcher.dataset.images[[0, 11, 29]])
    caps = evaluation.encode_captions(model, searcher.dataset.captions, batch_size=step)
    values, found = scoring.top_captions(model, query, caps, k=9)
    for i, row, vals in zip([0, 11, 29], found.tolist(), values.numpy()):
        assert row == stable_order(sims[i])[:9]
        np.testing.assert_allclose(vals, sims[i, row], rtol=0, atol=1e-6)


def test_a_tiny_memory_budget_scores_one_item_per_chunk_with_the_same_results(world, searcher):
    tiny = search.Searcher(world.ckpt, world.data, 'test', device='cpu', eval_memory_gb=1e-12)
    queries = world.captions['test'][:3]
    assert same_results(tiny.text(queries, k=8), searcher.text(queries, k=8))
    assert same_results(tiny.image([4, 5], k=8), searcher.image([4, 5], k=8))


def old_chunks(n_img, n_c, R, L, cfg, device, memory_gb) -> list:
    """compute_sims' chunks before scoring.plan_chunks existed (its loop, verbatim)."""
    per_image = n_c * (R * L * scoring.BYTES_PER_CELL + 16 * (cfg.num_labels + cfg.label_hidden))
    step = int(memory_gb * 2 ** 30 // per_image)
    if torch.device(device).type == 'cpu':
        step = min(step, scoring.cache_cells(cfg) // (n_c * R * L))
    step = max(1, step)
    return [(i0, min(i0 + step, n_img)) for i0 in range(0, n_img, step)]


def test_the_planner_gives_compute_sims_the_chunks_it_scored_before(searcher):
    for cfg in (Config(), Config(num_labels=0)):
        for n_img, n_c, R, L in ((1, 1, 36, 3), (1000, 128, 36, 14), (5000, 17, 36, 60), (29, 128, 12, 9)):
            for device in ('cpu', 'cuda'):
                for memory_gb in (1e-12, 0.01, 2.0, 64.0):
                    plan = scoring.plan_chunks(n_img, n_c, R, L, cfg, device, memory_gb)
                    assert plan == old_chunks(n_img, n_c, R, L, cfg, device, memory_gb)
                    assert plan[0][0] == 0 and plan[-1][1] == n_img
                    assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))
    # and compute_sims scores exactly the planned chunks, for every caption batch
    model, img = searcher.model, searcher.gallery_images()
    caps = evaluation.encode_captions(model, searcher.dataset.captions, batch_size=64)
    scored, score = [], model.scores
    model.scores = lambda i, c, **kw: scored.append((i.emb.shape[0], c.mask.shape)) or score(i, c, **kw)
    try:
        evaluation.compute_sims(model, img, caps, memory_gb=1e-5, progress=False)
    finally:
        del model.scores
    planned = [(i1 - i0, cap.mask.shape) for _, cap in caps
               for i0, i1 in scoring.plan_chunks(N_IMG, *cap.mask.shape, 12, model.cfg, 'cpu', 1e-5)]
    assert scored == planned and len(planned) > len(caps)  # several chunks per caption batch


# ---------------------------------------------------------------- queries and refusals

def test_unknown_words_are_named_on_stderr_and_scored_as_unk(world, capsys):
    known = 'a red dog and a blue cat'
    assert all(w in vocab_lib.deserialize_vocab(str(world.vocab / 'toy_precomp_vocab.json')).word2idx
               for w in vocab_lib.tokenize(known))
    results, out, err = run(world, capsys, '--json', '--query', 'a red zebroid and a blue cat',
                            '--query', 'a red quokka and a blue cat', '--query', known)
    assert "'zebroid'" in err and "'quokka'" in err and 'not in the vocabulary' in err
    assert err.count('warning:') == 2 and 'warning' not in out
    assert results[0]['results'] == results[1]['results']  # both words are <unk>
    assert results[0]['results'] != results[2]['results']


def test_empty_punctuation_only_and_over_long_queries_are_refused_before_loading(world, searcher, capsys):
    nowhere = str(world.root / 'no_such.pth.tar')  # the query is refused before the checkpoint is read
    for query in ('', '   ', ' ... !', '?!'):
        msg = refusal(world, capsys, '--query', 'a red dog', '--query', query, model_path=nowhere)
        assert repr(query) in msg and 'no words' in msg
    msg = refusal(world, capsys, '--query', 'dog ' * 600, model_path=nowhere)
    assert '2,400 characters' in msg and 'more than a caption' in msg
    with pytest.raises(ValueError, match='no words'):
        searcher.text(['a dog', '...'])


def test_bad_image_indices_and_names_are_refused_naming_the_range_or_file(world, capsys):
    for bad in ('30', '-1', '99999'):
        msg = refusal(world, capsys, '--image', '0', '--image', bad)
        assert f'--image {bad}' in msg and '0..29' in msg
    names_file = os.path.join(world.data, 'toy_precomp', 'test_image_names.txt')
    msg = refusal(world, capsys, '--image', '1003.jpg')  # the test split has no names file
    assert "'1003.jpg'" in msg and names_file in msg and 'does not exist' in msg
    dup_names = os.path.join(world.data, 'toy_precomp', 'dup_image_names.txt')
    msg = refusal(world, capsys, '--image', 'nosuch.jpg', split='dup')
    assert "'nosuch.jpg'" in msg and dup_names in msg and 'no image of that name' in msg and '0..29' in msg


def test_image_index_names_the_parameter_it_is_given(searcher, dup):
    """The command line's --image (the default) or the server's image: no rewriting of messages after."""
    for param in ('--image', 'image'):
        for bad, says in ((30, '30: no such image, the test split has images 0..29'),
                          ('1003.jpg', "'1003.jpg': not an image index (0..29)")):
            with pytest.raises(ValueError) as e:
                searcher.image_index(bad, param)
            assert str(e.value).startswith(f'{param} {says}'), e.value
    with pytest.raises(ValueError, match='^--image -1: no such image'):
        searcher.image_index('-1')
    with pytest.raises(ValueError, match="^image 'nosuch.jpg': no image of that name in"):
        dup.image_index('nosuch.jpg', 'image')


@pytest.fixture
def bad_names(world):
    """write(lines) -> the 'bad' split: the test split's images and captions with these image names."""
    folder = os.path.join(world.data, 'toy_precomp')
    for kind in ('ims.npy', 'caps.txt'):
        shutil.copyfile(os.path.join(folder, f'test_{kind}'), os.path.join(folder, f'bad_{kind}'))
    path = os.path.join(folder, 'bad_image_names.txt')

    def write(lines):
        with open(path, 'w', encoding='utf-8') as f:
            f.write('\n'.join(lines) + '\n')
        return path
    yield write
    for kind in ('ims.npy', 'caps.txt', 'image_names.txt'):
        os.remove(os.path.join(folder, f'bad_{kind}'))


def test_a_bad_names_file_is_refused_naming_its_line_when_the_split_is_opened(world, bad_names, capsys):
    # image_names.read_image_names's rules hold without --image_dir too (test_report.py tests each one)
    good = [f'{1000 + i}.jpg' for i in range(N_IMG)]
    for lines, why in ((good[:7] + [good[3]] + good[8:], "line 8: '1003.jpg' names the same image as line 4"),
                       (good[:-1], f'has {N_IMG - 1} names but its split has {N_IMG} images'),
                       (good[:2] + ['../1002.jpg'] + good[3:], "line 3: '../1002.jpg' has a '..' part"),
                       (good[:2] + ['/1002.jpg'] + good[3:], "line 3: '/1002.jpg' is an absolute path"),
                       (good[:29] + [' 1029.jpg'], "line 30: ' 1029.jpg' has leading or trailing whitespace")):
        path = bad_names(lines)
        msg = refusal(world, capsys, '--query', 'a dog', split='bad')  # a text query shows no names, still refused
        assert msg.startswith(f'error: {path}') and why in msg, msg
    bad_names(good)  # and once right, it serves names
    assert run(world, capsys, '--json', '--image', '1029.jpg', split='bad')[0][0]['image'] == N_IMG - 1


def test_images_are_found_by_name(world, dup, capsys):
    results, _, _ = run(world, capsys, '--json', '--image', '1005.jpg', '--image', '5', split='dup')
    assert results[0] == results[1] and same_results(results[:1], dup.image(5, k=10))
    assert results[0]['image'] == 5 and results[0]['image_name'] == '1005.jpg'


def test_queries_file_skips_blank_lines_and_refuses_a_non_utf8_line(world, capsys, tmp_path):
    path = tmp_path / 'queries.txt'
    path.write_bytes('\ufeffa red dog\n\n   \nA blue cat!\r\n\n'.encode('utf-8'))  # BOM, CRLF, blank lines
    from_file, _, _ = run(world, capsys, '--json', '--queries', str(path))
    one_by_one, _, _ = run(world, capsys, '--json', '--query', 'a red dog', '--query', 'A blue cat!')
    assert [r['query'] for r in from_file] == ['a red dog', 'A blue cat!'] and from_file == one_by_one
    path.write_bytes(b'a red dog\n\na caf\xe9 cat\n')  # Latin-1, not UTF-8
    msg = refusal(world, capsys, '--queries', str(path))
    assert str(path) in msg and 'line 3' in msg and 'not UTF-8' in msg
    path.write_bytes(b'a red dog\n...\n')
    msg = refusal(world, capsys, '--queries', str(path))
    assert str(path) in msg and 'line 2' in msg and 'no words' in msg
    path.write_bytes(b'\n \n')
    assert 'no queries' in refusal(world, capsys, '--queries', str(path))
    assert 'file not found' in refusal(world, capsys, '--queries', str(tmp_path / 'nowhere.txt'))


def test_k_is_capped_at_the_gallery_and_must_be_positive(world, capsys):
    results, _, _ = run(world, capsys, '--json', '--k', '1000', '--query', 'a red dog')
    assert len(results[0]['results']) == N_IMG
    results, _, _ = run(world, capsys, '--json', '--k', '1000', '--image', '0')
    assert len(results[0]['results']) == N_CAP
    for bad in ('0', '-3', '2.5'):
        with pytest.raises(SystemExit) as exc:
            search.parse_args(['--model_path', world.ckpt, '--query', 'dog', '--k', bad])
        assert exc.value.code == 2 and 'positive integer' in capsys.readouterr().err


# ---------------------------------------------------------------- output: JSON, tables, API

def check_schema(res: dict, k: int, names: bool):
    """One --json object: every key and type, ranks 1..k, scores from the highest."""
    rows = res['results']
    if 'query' in res:
        assert set(res) == {'query', 'results'} and isinstance(res['query'], str)
        keys = {'rank', 'index', 'score'} | ({'image_name'} if names else set())
    else:
        assert set(res) == {'image', 'results'} | ({'image_name'} if names else set())
        assert type(res['image']) is int and (not names or isinstance(res['image_name'], str))
        keys = {'rank', 'index', 'score', 'caption', 'correct'}
    assert [r['rank'] for r in rows] == list(range(1, k + 1))
    for r in rows:
        assert set(r) == keys
        assert type(r['rank']) is int and type(r['index']) is int and type(r['score']) is float
        assert all(isinstance(r[key], str) for key in ('image_name', 'caption') if key in keys)
        assert 'correct' not in keys or type(r['correct']) is bool
    assert [r['score'] for r in rows] == sorted((r['score'] for r in rows), reverse=True)


@pytest.mark.parametrize('split', ['test', 'dup'])  # without and with image names
def test_json_prints_one_object_per_query_per_line_with_every_key(world, capsys, split):
    for args, n in ((['--query', 'a red dog', '--query', 'a green tree'], 2), (['--image', '3', '--image', '8'], 2)):
        results, out, err = run(world, capsys, '--json', '--k', '4', *args, split=split)
        lines = out.splitlines()
        assert len(lines) == n and [json.loads(line) for line in lines] == results
        for res in results:
            check_schema(res, 4, names=split == 'dup')
    assert results[0]['results'][0]['correct'] in (True, False)
    if split == 'dup':
        assert results[0]['image_name'] == '1003.jpg'


def test_tables_show_rank_score_index_name_or_caption(world, capsys):
    results, out, err = run(world, capsys, '--k', '3', '--query', 'a red zebroid', split='dup')
    lines = out.splitlines()
    assert lines[0] == 'query: "a red zebroid"' and lines[1].split() == ['rank', 'score', 'image', 'name']
    for line, r in zip(lines[2:5], results[0]['results']):
        assert line.split() == [str(r['rank']), f'{r["score"]:.4f}', str(r['index']), r['image_name']]
    assert 'zebroid' in err and 'warning' not in out
    results, out, _ = run(world, capsys, '--k', '2', '--image', '1', '--image', '2')
    blocks = out.strip().split('\n\n')
    assert len(blocks) == 2
    for block, res in zip(blocks, results):
        lines = block.splitlines()
        assert lines[0] == f'image {res["image"]}'
        assert lines[1].split() == ['rank', 'score', 'caption', 'correct', 'text']
        for line, r in zip(lines[2:], res['results']):
            assert line.split()[:4] == [str(r['rank']), f'{r["score"]:.4f}', str(r['index']),
                                        'yes' if r['correct'] else 'no']
            assert line.endswith(r['caption'])


def test_searcher_api_returns_what_the_cli_prints_and_encodes_each_gallery_once(world, capsys, monkeypatch):
    calls = []
    for name in ('encode_images', 'encode_captions'):
        real = getattr(search, name)
        monkeypatch.setattr(search, name, lambda x, *a, real=real, name=name, **kw:
                            calls.append((name, len(a[0]))) or real(x, *a, **kw))
    api = search.Searcher(world.ckpt, data_path=world.data, split='dup', device='cpu')
    assert calls == []  # nothing encoded before a query needs it
    queries = ['a red dog', 'a photo of a cat']
    texts, images = api.text(queries, k=3), api.image([1, '1004.jpg'], k=3)
    assert same_results(api.text('a red dog', k=3), texts[:1]) and same_results(api.image(4, k=3), images[1:])
    galleries = [c for c in calls if c[1] in (N_IMG, N_CAP)]  # the queries are 1 or 2 items
    assert galleries == [('encode_images', N_IMG), ('encode_captions', N_CAP)]
    monkeypatch.undo()
    assert texts == run(world, capsys, '--json', '--k', '3', '--query', queries[0], '--query', queries[1],
                        split='dup')[0]
    assert images == run(world, capsys, '--json', '--k', '3', '--image', '1', '--image', '4', split='dup')[0]
    with pytest.raises(ValueError, match='positive integer'):
        api.text('a dog', k=0)


def test_help_states_every_default_once(capsys):
    with pytest.raises(SystemExit) as exc:
        search.parse_args(['--help'])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and '(default: None)' not in out
    entries = help_entries(out)
    assert {e.split()[0].rstrip(',') for e in entries} >= {'--query', '--queries', '--image', '--k', '--json',
                                                            '--split', '--alpha', '--eval_memory_gb'}
    for invocation, text in entries.items():
        if not invocation.startswith('-h'):
            assert text.count('(default: ') + text.count('(required)') == 1, (invocation, text)
            assert text.endswith(')'), (invocation, text)


# ---------------------------------------------------------------- the HTML page (--out)

R = 12  # the toy data's regions: a 3 x 4 grid


@pytest.fixture(scope='module')
def image_dir(world):
    """The 'dup' split's pictures, 1000.jpg .. 1029.jpg, of a few sizes."""
    folder = world.root / 'images'
    for i, name in enumerate(world.names):
        write_image(str(folder / name), size=(80 + 10 * (i % 3), 60), colour=(8 * i, 100, 200))
    return str(folder)


@contextlib.contextmanager
def boxes_file(world, split, boxes=None):
    """{split}_boxes.npy beside the split (random boxes in [0, 1], or `boxes`) while in the block."""
    if boxes is None:
        rng = np.random.default_rng(1)
        corner = rng.uniform(0, 0.7, (N_IMG, R, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(0.05, 0.3, (N_IMG, R, 2))], 2).astype(np.float32)
    path = os.path.join(world.data, 'toy_precomp', f'{split}_boxes.npy')
    np.save(path, boxes)
    try:
        yield boxes
    finally:
        os.remove(path)


def encoded_pair(api, query: str, i: int) -> tuple:
    """The query's words, image i and the query encoded directly (Sides of 1)."""
    words = vocab_lib.tokenize(query)
    img = evaluation.encode_images(api.model, api.dataset.images[i:i + 1])
    cap = evaluation.encode_captions(api.model, [vocab_lib.encode(api.vocab, words)])[0][1]
    return words, img, cap


@pytest.mark.parametrize('norm', model_lib.NORMS)
def test_attention_equals_the_authors_loop_for_that_pair(searcher, monkeypatch, norm):
    monkeypatch.setattr(searcher.model, 'cfg', dataclasses.replace(searcher.model.cfg, raw_feature_norm=norm))
    for query, i in (('a red dog and a blue cat', 0), ('green tree', 17), ('the tree zebroid', 29)):
        words, attn = searcher.attention(query, i)
        expected_words, img, cap = encoded_pair(searcher, query, i)
        n_words = len(words) + 2  # with <start> and <end>
        _, loop = ref.func_attention(cap.emb[:, :n_words].double(), img.emb.double(), raw_feature_norm=norm,
                                     smooth=searcher.model.cfg.lambda_softmax_avg)  # (1, n_words, R)
        assert words == expected_words and attn.shape == (len(words), R) and attn.dtype == torch.float32
        torch.testing.assert_close(attn.double(), loop[0, 1:-1], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match='no words'):
        searcher.attention('...', 0)


def label_probs(api, query: str, i: int) -> torch.Tensor:
    """sigmoid of the label head's logits for the pair (K,)."""
    _, img, cap = encoded_pair(api, query, i)
    with torch.inference_mode():
        return torch.sigmoid(api.model.scores(img, cap, alpha=0.0).logits_img[0, 0])


def test_labels_of_many_images_are_each_images_with_the_query_encoded_once(dup, monkeypatch):
    query, images = 'a red dog and a blue cat', [3, '1007.jpg', 0, 29, 3]  # dup has names: 1007.jpg is image 7
    encoded, encode_captions = [], encode.encode_captions  # encode.encode_pairs encodes the query
    monkeypatch.setattr(encode, 'encode_captions', lambda *a, **kw: encoded.append(a) or encode_captions(*a, **kw))
    probs = dup.predicted_labels(query, images)
    assert len(encoded) == 1 and probs.shape == (5, dup.model.cfg.num_labels) and probs.dtype == torch.float32
    for row, i in zip(probs, [3, 7, 0, 29, 3]):
        assert torch.equal(row, dup.predicted_labels(query, i)) and torch.equal(row, label_probs(dup, query, i))
    for bad, says in (([], 'no images'), ([1, 30], '--image 30: no such image')):
        with pytest.raises(ValueError, match=says):
            dup.predicted_labels(query, bad)


@pytest.mark.parametrize('split, pictures, boxes', [('test', False, False), ('test', False, True),
                                                    ('dup', True, False), ('dup', True, True)])
def test_text_query_page_shows_top_images_heat_maps_of_each_word_and_labels(world, searcher, dup, image_dir,
                                                                             capsys, tmp_path, split, pictures, boxes):
    api = dup if split == 'dup' else searcher
    out = tmp_path / 'page'
    queries = ['a red dog and a blue cat', 'green tree']
    args = ['--json', '--k', '4', '--query', queries[0], '--query', queries[1], '--out', str(out)]
    with boxes_file(world, split) if boxes else contextlib.nullcontext() as box:
        results, stdout, err = run(world, capsys, *args, *(['--image_dir', image_dir] if pictures else []),
                                   split=split)
    assert [json.loads(line) for line in stdout.splitlines()] == results  # stdout stays JSON
    assert f'page written to {out / "index.html"}' in err
    caps = world.captions[split]
    page = check_page(str(out / 'index.html'), queries)
    sections = page.root.all('section', 'text-query')
    labels = labels_lib.load_labels(str(world.vocab / 'toy_precomp_labels.json'))['labels']
    expected_pictures = set()
    for q, (section, res) in enumerate(zip(sections, results)):
        assert section.one('q', 'query').text() == res['query']
        items = section.all('li', 'result')
        assert len(items) == 4 and not section.all('span', 'mark')  # a text query has no ground truth
        for li, r in zip(items, res['results']):
            i, rank = r['index'], r['rank']
            assert li.one('span', 'rank').text() == str(rank) and li.one('span', 'image').text() == f'image {i}'
            assert li.one('span', 'score').text() == f'{r["score"]:.4f}'
            assert [s.text() for s in li.all('span', 'name')] == ([world.names[i]] if split == 'dup' else [])
            assert [c.text() for c in li.one('ol', 'captions').all('li')] == caps[5 * i:5 * i + 5]
            if pictures:
                assert li.one('img', 'thumb').attrs['src'] == f'img_{i:06d}.jpg'
                expected_pictures.add(f'img_{i:06d}.jpg')
            else:
                assert li.one('div', 'noimg').text() == f'image {i}' and not li.all('img', 'thumb')
            figures, shown = li.all('figure'), li.all('li', 'label')
            if rank > 3:
                assert not figures and not shown
                continue
            # where each word looks: one picture per word, drawn from Searcher.attention on the
            # grid or the boxes of that image, over its thumbnail when there is one
            words, attn = api.attention(res['query'], i)
            assert [f.one('figcaption').text() for f in figures] == words == vocab_lib.tokenize(res['query'])
            srcs = [f.one('img').attrs['src'] for f in figures]
            assert srcs == [f'q{q}_r{rank}_w{w}.png' for w in range(1, len(words) + 1)]
            expected_pictures.update(srcs)
            base = report.Pictures(str(tmp_path / 'thumbs'), world.names, image_dir).thumbnail(i) if pictures else None
            cells = box[i] if boxes else featstore.grid_boxes(R)
            for src, a in zip(srcs, attn):
                with Image.open(out / src) as im:
                    assert im.format == 'PNG' and im.size == (base.size if pictures else (192, 192))
                    drawn = np.asarray(im.convert('RGB'))
                np.testing.assert_array_equal(drawn, np.asarray(report.heat_map(base, a.double().numpy(), cells)))
            # the 10 labels the model predicts for this pair, most probable first
            probs = label_probs(api, res['query'], i)
            top = probs.topk(10)
            assert [li.one('span', 'word').text() for li in shown] == [labels[k] for k in top.indices.tolist()]
            assert [li.one('span', 'prob').text() for li in shown] == [f'{p:.2f}' for p in top.values.tolist()]
    assert len(sections) == 2 and pictures_in(out) == sorted(expected_pictures)
    if boxes:  # the boxes change the pictures: here they are not the grid
        assert not np.allclose(box[results[0]['results'][0]['index']], featstore.grid_boxes(R))


@pytest.mark.parametrize('split', ['test', 'dup'])
def test_image_query_page_shows_the_image_and_its_top_captions_marked(world, image_dir, capsys, tmp_path, split):
    out, pictures = tmp_path / 'page', split == 'dup'  # the test split has no image names: no thumbnails
    results, _, err = run(world, capsys, '--k', '6', '--image', '3', '--image', '8', '--out', str(out),
                          '--image_dir', image_dir, split=split)
    assert ('warning: --image_dir: no thumbnails' in err) != pictures
    page = check_page(str(out / 'index.html'), [r['caption'] for res in results for r in res['results']])
    sections = page.root.all('section', 'image-query')
    assert len(sections) == 2 and not page.root.all('figure')
    for section, res in zip(sections, results):
        i = res['image']
        assert section.one('h3').text() == f'Image {i}' + (f' {world.names[i]}' if split == 'dup' else '')
        if pictures:
            assert section.one('img', 'thumb').attrs['src'] == f'img_{i:06d}.jpg'
        else:
            assert section.one('div', 'noimg').text() == f'image {i}'
        items = section.all('li', 'result')
        assert len(items) == 6
        for li, r in zip(items, res['results']):
            mark = 'correct' if r['correct'] else 'wrong'
            assert mark in li.classes() and li.one('span', 'mark').text() == mark
            assert li.one('span', 'caption').text() == r['caption'] == world.captions[split][r['index']]
            assert li.one('span', 'caption-index').text() == f'caption {r["index"]}'
            assert li.one('span', 'score').text() == f'{r["score"]:.4f}'
    assert pictures_in(out) == (['img_000003.jpg', 'img_000008.jpg'] if pictures else [])


@pytest.fixture(scope='module')
def evil(world):
    """The 'evil' split: the test split's features with hostile captions and image names, and their pictures."""
    folder = os.path.join(world.data, 'toy_precomp')
    np.save(os.path.join(folder, 'evil_ims.npy'), np.load(os.path.join(folder, 'test_ims.npy')))
    caps = [f'a red dog {HOSTILE[k % len(HOSTILE)]} n{k}' for k in range(N_CAP)]
    names = ['<img src=x onerror=alert(1)>.jpg', '"><script>alert(1)</script>.jpg', 'javascript:alert(1).jpg',
             "' onmouseover='alert(1).jpg", 'a&amp;b.jpg'] + [f'p{i}.jpg' for i in range(5, N_IMG)]
    for kind, lines in (('caps', caps), ('image_names', names)):
        with open(os.path.join(folder, f'evil_{kind}.txt'), 'w', encoding='utf-8') as f:
            f.write('\n'.join(lines) + '\n')
    image_dir = world.root / 'evil images'
    for name in names:
        write_image(str(image_dir / name))
    return SimpleNamespace(caps=caps, names=names, image_dir=str(image_dir),
                           names_file=os.path.join(folder, 'evil_image_names.txt'))


def test_page_shows_hostile_queries_captions_names_and_labels_as_text_only(world, evil, tmp_path):
    api = search.Searcher(world.ckpt, world.data, 'evil', device='cpu')
    api.labels = [HOSTILE[k % len(HOSTILE)] + f' L{k}' for k in range(len(api.labels))]  # the model's K: 20
    query = 'a red dog <img src=x onerror=alert(1)> "><script>alert(1)</script> javascript:alert(1)'
    results = api.text([query], k=N_IMG) + api.image(list(range(5)), k=N_CAP)  # every image and caption shown
    path = api.page(results, str(tmp_path / 'page'), evil.image_dir)
    shown = [api.labels[k] for r in results[0]['results'][:3]  # the 10 most probable of each top-3 image
             for k in api.predicted_labels(query, r['index']).topk(10).indices.tolist()]
    page = check_page(path, [query] + evil.caps + evil.names + shown)
    raw = open(path, encoding='utf-8').read()
    for bad in ('<script', '<img src=x', "' on"):  # as text, '<' and quotes are references
        assert bad not in raw
    assert len(page.root.all('img', 'thumb')) == N_IMG + 5 and len(page.root.all('li', 'label')) == 3 * 10
    assert pictures_in(tmp_path / 'page') == sorted([f'img_{i:06d}.jpg' for i in range(N_IMG)] + [
        f'q0_r{r}_w{w}.png' for r in (1, 2, 3) for w in range(1, len(vocab_lib.tokenize(query)) + 1)])


def test_out_reads_the_names_file_once(world, image_dir, capsys, tmp_path, monkeypatch):
    names_file, opened, real_open = os.path.join(world.data, 'toy_precomp', 'dup_image_names.txt'), [], open

    def spy(file, *args, **kw):
        opened.append(file)
        return real_open(file, *args, **kw)
    monkeypatch.setattr('builtins.open', spy)
    results, _, _ = run(world, capsys, '--k', '2', '--image', '1003.jpg', '--out', str(tmp_path / 'page'),
                        '--image_dir', image_dir, split='dup')
    assert results[0]['image'] == 3 and pictures_in(tmp_path / 'page') == ['img_000003.jpg']  # names used
    assert [os.fspath(f) for f in opened if isinstance(f, (str, os.PathLike))].count(names_file) == 1


def test_page_refusals_come_before_any_scoring(world, evil, image_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(search, 'top_images', lambda *a, **kw: pytest.fail('scored'))
    msg = refusal(world, capsys, '--query', 'a dog', '--image_dir', image_dir)
    assert '--image_dir' in msg and 'needs --out' in msg
    plain = tmp_path / 'plain.txt'
    plain.write_text('a file')
    msg = refusal(world, capsys, '--query', 'a dog', '--out', str(plain / 'page'), model_path=str(tmp_path / 'none'))
    assert msg.startswith(f'error: --out {plain / "page"}')  # before the checkpoint is read
    (tmp_path / 'taken' / 'index.html').mkdir(parents=True)
    assert 'index.html' in refusal(world, capsys, '--query', 'a dog', '--out', str(tmp_path / 'taken'))
    out = tmp_path / 'page'
    original = open(evil.names_file, encoding='utf-8').read()
    try:
        for name, why in (('../../etc/passwd', "'..' part"), ('link/passwd', 'resolves outside --image_dir')):
            with open(evil.names_file, 'w', encoding='utf-8') as f:
                f.write(original.replace('javascript:alert(1).jpg', name))
            os.symlink(tmp_path, os.path.join(evil.image_dir, 'link'))  # a folder outside --image_dir
            try:
                msg = refusal(world, capsys, '--query', 'a dog', '--out', str(out), '--image_dir', evil.image_dir,
                              split='evil')
            finally:
                os.remove(os.path.join(evil.image_dir, 'link'))
            assert msg.startswith(f'error: {evil.names_file}: line 3: ') and why in msg
    finally:
        with open(evil.names_file, 'w', encoding='utf-8') as f:
            f.write(original)
    with boxes_file(world, 'test', np.zeros((N_IMG, R + 1, 4), np.float32)):
        msg = refusal(world, capsys, '--query', 'a dog', '--out', str(out))
    assert 'test_boxes.npy' in msg and f'({N_IMG}, {R}, 4)' in msg
    assert os.listdir(out) == []


# ---------------------------------------------------------------- what users bring (issue 16)

def test_a_nan_checkpoint_or_overflowing_features_are_refused_not_ranked(world, capsys, tmp_path):
    """merge_topk's sort puts NaN first: one NaN weight made every score NaN and 'the best'."""
    ckpt = torch.load(world.ckpt, map_location='cpu', weights_only=True)
    ckpt['model']['img_enc.fc.weight'][0, 0] = float('nan')
    path = str(tmp_path / 'nan.pth.tar')
    torch.save(ckpt, path)
    api = search.Searcher(path, world.data, 'test', device='cpu')
    for call in (lambda: api.text('a red dog'), lambda: api.image(3)):
        with pytest.raises(ValueError, match=rf'^{re.escape(path)}: weight img_enc.fc.weight holds NaN or inf, so '):
            call()
    msg = refusal(world, capsys, '--query', 'a red dog', model_path=path)
    assert msg.startswith(f'error: {path}: weight img_enc.fc.weight') and 'refusing to rank them' in msg
    # finite features too large for the encoder (3e38: the NaN scan of the file passes them)
    folder = os.path.join(world.data, 'toy_precomp')
    ims = np.load(os.path.join(folder, 'test_ims.npy'))
    ims[4] = 3e38
    huge = os.path.join(folder, 'huge_ims.npy')
    np.save(huge, ims)
    shutil.copy(os.path.join(folder, 'test_caps.txt'), os.path.join(folder, 'huge_caps.txt'))
    try:
        api = search.Searcher(world.ckpt, world.data, 'huge', device='cpu')
        for call in (lambda: api.text(['a red dog', 'a cat']), lambda: api.image([1, 4])):  # image 4: query 2
            with pytest.raises(ValueError, match=rf'^{re.escape(huge)}: image 4 gives NaN or inf scores with '
                                                 rf'{re.escape(world.ckpt)}, whose weights are finite'):
                call()
    finally:
        os.remove(huge), os.remove(os.path.join(folder, 'huge_caps.txt'))


def test_out_refuses_to_replace_a_page_or_its_pictures_without_overwrite(world, capsys, tmp_path, monkeypatch):
    out = tmp_path / 'page'
    results, _, _ = run(world, capsys, '--k', '2', '--query', 'a red dog', '--out', str(out))
    written = {f: (out / f).read_bytes() for f in os.listdir(out)}
    top_images = search.top_images
    monkeypatch.setattr(search, 'top_images', lambda *a, **kw: pytest.fail('scored'))  # refused before scoring
    message = refusal(world, capsys, '--k', '2', '--query', 'a red dog', '--out', str(out))
    assert message == (f'error: {out / "index.html"} exists (a page written before): pass --overwrite to replace '
                       f'the page and its pictures, or choose another --out')
    os.remove(out / 'index.html')
    message = refusal(world, capsys, '--k', '2', '--query', 'a red dog', '--out', str(out))
    assert message.startswith(f'error: {out / "q0_r1_w1.png"} exists') and '--overwrite' in message
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == {f: b for f, b in written.items()
                                                                    if f != 'index.html'}
    monkeypatch.setattr(search, 'top_images', top_images)
    run(world, capsys, '--k', '2', '--query', 'a red dog', '--out', str(out), '--overwrite')
    assert (out / 'index.html').read_bytes() == written['index.html']
    api = search.Searcher(world.ckpt, world.data, 'test', device='cpu')
    with pytest.raises(ValueError, match='--overwrite'):  # the Python API too
        api.page(results, str(out))
    assert api.page(results, str(out), overwrite=True) == str(out / 'index.html')


def test_tables_escape_control_characters_and_json_keeps_them_exact(world, capsys):
    """A caption with ESC/BEL sequences (clear the screen, set the window title, ring the bell) and
    a query with one reach the terminal as visible escapes; --json prints the exact text."""
    folder = os.path.join(world.data, 'toy_precomp')
    caps = list(world.captions['test'])
    caps[2] = 'a red dog \x1b[2J\x1b]0;pwned\x07 and a \u202ecat'
    with open(os.path.join(folder, 'ctrl_caps.txt'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(caps) + '\n')
    shutil.copy(os.path.join(folder, 'test_ims.npy'), os.path.join(folder, 'ctrl_ims.npy'))
    query = 'a red dog\x1b[31m \x07'
    try:
        _, out, err = run(world, capsys, '--k', str(N_CAP), '--image', '0', split='ctrl')
        results, jout, _ = run(world, capsys, '--json', '--k', str(N_CAP), '--image', '0', split='ctrl')
        _, qout, qerr = run(world, capsys, '--k', '2', '--query', query, split='ctrl')
    finally:
        os.remove(os.path.join(folder, 'ctrl_caps.txt')), os.remove(os.path.join(folder, 'ctrl_ims.npy'))
    for text in (out, err, qout, qerr):
        assert not any(c in text for c in '\x1b\x07\u202e'), repr(text)
    line = next(line for line in out.splitlines() if 'pwned' in line)
    assert line.endswith(r'a red dog \x1b[2J\x1b]0;pwned\x07 and a \u202ecat')
    assert qout.splitlines()[0] == r'query: "a red dog\x1b[31m \x07"'
    assert [r['caption'] for r in results[0]['results'] if r['index'] == 2] == [caps[2]]  # --json: exact
    assert json.loads(jout.splitlines()[0]) == results[0]


def tf32_flags() -> tuple:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def restore_tf32():
    before = tf32_flags()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize('precision,flags', [('fp32', (False, False)), ('tf32', (True, True)), ('bf16', (False, False))])
def test_set_precision_sets_the_matmul_and_the_cudnn_tf32_flags(restore_tf32, precision, flags):
    """cuDNN's TF32 (the GRU on Ampere and later) is on by default in PyTorch: fp32 turns it off."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != 'tf32'
    util.set_precision(precision)
    assert tf32_flags() == flags


def test_searcher_scores_in_its_precision_and_leaves_the_callers_flags_as_they_were(world, restore_tf32):
    for before, precision, during in (((True, True), 'fp32', (False, False)), ((False, False), 'tf32', (True, True)),
                                      ((True, False), 'fp32', (False, False))):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
        api = search.Searcher(world.ckpt, world.data, 'test', device='cpu', precision=precision)
        assert tf32_flags() == before
        seen, scores, encode_captions = [], api.model.scores, api.model.encode_captions
        api.model.scores = lambda *a, **kw: seen.append(tf32_flags()) or scores(*a, **kw)  # noqa: B023
        api.model.encode_captions = lambda *a, **kw: seen.append(tf32_flags()) or encode_captions(*a, **kw)  # noqa: B023
        api.text('a red dog', k=2), api.image(1, k=2), api.attention('a red dog', 1)
        assert seen and set(seen) == {during}, (precision, set(seen))  # the GRU and the scores
        assert tf32_flags() == before


def test_page_marks_the_heat_maps_of_words_scored_as_unk(world, capsys, tmp_path):
    out = tmp_path / 'page'
    run(world, capsys, '--k', '1', '--query', 'a red zebroid', '--out', str(out))
    figures = check_page(str(out / 'index.html')).root.all('figure')
    assert [f.one('figcaption').text() for f in figures] == ['a', 'red', 'zebroid (unknown: scored as <unk>)']
    assert ['unknown' in f.classes() for f in figures] == [False, False, True]
    assert figures[2].one('span', 'unk').text() == '(unknown: scored as <unk>)'
