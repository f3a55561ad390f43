"""report.py: the HTML page of search.py --out and evaluation.py --examples. Image names stay inside
--image_dir; the grid and the heat maps draw each region's weight where it is; thumbnails are
upright RGB of at most 256 px under index-only names; hostile captions, label words and image names
come out as text only (the page parsed with html.parser: no injected element or attribute, every
picture a plain file name in the page's folder). Real files in tmp_path; the end-to-end test uses
an untrained tiny model. ``Page`` and ``check_page`` serve test_search.py and test_evaluation.py."""
import os
import re
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluation
import image_names as image_names_lib
import report
import toy
import vocab as vocab_lib
from evaluation import write_examples
from model import CASC, Config
from featstore import grid_boxes, grid_shape
from report import heat_map, image_names

HOSTILE = ['<img src=x onerror=alert(1)>', '"><script>alert(1)</script>', 'javascript:alert(1)',
           '../../etc/passwd', "it's \"quoted\" & &amp; done", '</li></ol><b>bold</b>', '[x](javascript:y)',
           "' onmouseover='alert(1)", '<!-- comment -->', '&lt;escaped&gt; already']
VOID = {'img', 'meta', 'br', 'hr', 'link', 'input'}
TAGS = {'html', 'head', 'meta', 'title', 'style', 'body', 'h1', 'h2', 'h3', 'p', 'section', 'div', 'span', 'ol',
        'li', 'q', 'img', 'figure', 'figcaption'}
PICTURE = re.compile(r'(img_\d{6}\.jpg|[a-z]\d+_r\d+_w\d+\.png)')  # names made of indices only


# ---------------------------------------------------------------- parsing the page

class Node:
    def __init__(self, tag, attrs, parent):
        self.tag, self.attrs, self.parent, self.children = tag, dict(attrs), parent, []

    def text(self) -> str:
        return ''.join(c if isinstance(c, str) else c.text() for c in self.children)

    def classes(self) -> set:
        return set((self.attrs.get('class') or '').split())

    def all(self, tag=None, cls=None) -> list:
        """Descendants with that tag and class, in document order."""
        found = []
        for c in self.children:
            if isinstance(c, Node):
                if (tag is None or c.tag == tag) and (cls is None or cls in c.classes()):
                    found.append(c)
                found += c.all(tag, cls)
        return found

    def one(self, tag=None, cls=None):
        (node,) = self.all(tag, cls)
        return node


class Page(HTMLParser):
    """An HTML document as a tree of Nodes (.root, .nodes); every end tag must close the element
    open at that point (a well-formed page), and the document must end closed."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node('#root', {}, None)
        self.nodes, self.comments = [], []
        self.feed(text)
        self.close()
        assert self.cur is self.root, f'<{self.cur.tag}> never closed'

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs, self.cur)
        self.cur.children.append(node)
        self.nodes.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.cur = self.cur.parent

    def handle_endtag(self, tag):
        assert tag not in VOID and self.cur.tag == tag, f'</{tag}> closes <{self.cur.tag}>'
        self.cur = self.cur.parent

    def handle_data(self, text):
        self.cur.children.append(text)

    def handle_comment(self, text):
        self.comments.append(text)

    def unknown_decl(self, text):
        raise AssertionError(text)


def check_page(path: str, texts=()) -> Page:
    """The page at path parsed, with every guarantee of report.py checked: only the renderer's
    elements and attributes (no script, no event handler, no link, no URL); every img src a plain
    file name made of indices that exists in the page's folder and opens as a picture; alt texts
    and classes of the renderer's own words; and each of `texts` shown as text."""
    html_text = open(path, encoding='utf-8').read()
    page = Page(html_text)
    folder = os.path.dirname(path)
    assert not page.comments
    assert [n.tag for n in page.nodes[:4]] == ['html', 'head', 'meta', 'meta']
    for node in page.nodes:
        assert node.tag in TAGS, node.tag
        allowed = {'img': {'class', 'src', 'alt'}, 'html': {'lang'}, 'meta': {'charset', 'http-equiv', 'content'}}
        assert set(node.attrs) <= allowed.get(node.tag, {'class'}), (node.tag, node.attrs)
        assert re.fullmatch(r'[a-z -]*', node.attrs.get('class', '')), node.attrs
        if node.tag == 'img':
            src = node.attrs['src']
            assert PICTURE.fullmatch(src) and os.path.isfile(os.path.join(folder, src)), src
            assert re.fullmatch(r'(image|word) \d+', node.attrs['alt'])
            with Image.open(os.path.join(folder, src)) as im:
                assert im.format == ('PNG' if src.endswith('.png') else 'JPEG')
                im.verify()
    meta = [n.attrs for n in page.nodes if n.tag == 'meta']
    assert meta == [{'charset': 'utf-8'}, {'http-equiv': 'Content-Security-Policy', 'content': report.CSP}]
    assert page.root.one('style').text() == report.CSS
    shown = page.root.one('body').text()
    for t in texts:
        assert ' '.join(t.split()) in ' '.join(shown.split()), t
    return page


def pictures_in(folder) -> list:
    return sorted(f for f in os.listdir(folder) if f.endswith(('.jpg', '.png')))


def write_image(path, size=(64, 48), mode='RGB', colour=(200, 30, 30), exif_orientation=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.new(mode, size, colour if mode != 'P' else 3)
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(path, exif=exif)
    else:
        im.save(path)


# ---------------------------------------------------------------- image_names (image_names.read_image_names)

def names_setup(tmp_path, content, n_images=3):
    """A split of n_images images whose names file holds ``content`` (str: UTF-8; bytes: as is)."""
    folder = tmp_path / 'precomp'
    folder.mkdir(exist_ok=True)
    path = folder / 'test_image_names.txt'
    path.write_bytes(content if isinstance(content, bytes) else content.encode('utf-8'))
    image_dir = tmp_path / 'images'
    (image_dir / 'sub').mkdir(parents=True, exist_ok=True)
    dataset = SimpleNamespace(caps_path=str(folder / 'test_caps.txt'), split='test', n_images=n_images)
    return dataset, str(image_dir), str(path)


def test_image_names_reads_one_name_per_line_exactly(tmp_path):
    (tmp_path / 'images').mkdir()
    os.symlink(tmp_path / 'images' / 'sub', tmp_path / 'images' / 'alias')  # a link that stays inside
    dataset, image_dir, _ = names_setup(tmp_path, 'a.jpg\r\nsub/b (1).jpg\nalias/c d.jpg\n')
    assert image_names(dataset, image_dir) == ['a.jpg', 'sub/b (1).jpg', 'alias/c d.jpg']
    dataset, image_dir, _ = names_setup(tmp_path, '\ufeffa.jpg\nb.jpg\nc.jpg')  # a BOM, no final newline
    assert image_names(dataset, image_dir) == ['a.jpg', 'b.jpg', 'c.jpg']


def test_image_names_is_none_without_image_dir_or_names_file(tmp_path):
    dataset, image_dir, path = names_setup(tmp_path, 'a.jpg\nb.jpg\nc.jpg\n')
    assert image_names(dataset, None) is None
    os.remove(path)
    assert image_names(dataset, image_dir) is None


def refusal(tmp_path, content, n_images=3, symlink=False) -> str:
    """report.image_names's ValueError: one line naming the file. image_names.read_image_names without
    image_dir refuses the same file in the same words, but for what only symlinks in it can cause."""
    dataset, image_dir, path = names_setup(tmp_path, content, n_images)
    with pytest.raises(ValueError) as err:
        image_names(dataset, image_dir)
    message = str(err.value)
    assert message.startswith(path) and '\n' not in message
    if not symlink:
        with pytest.raises(ValueError) as err:
            image_names_lib.read_image_names(path, n_images)
        assert str(err.value) == message
    return message


@pytest.mark.parametrize('content, n_images', [('a.jpg\nb.jpg\nc.jpg\n', 23), ('a.jpg\nb.jpg\nc.jpg\nd.jpg\n', 3)])
def test_image_names_refuses_another_count_than_the_splits_images(tmp_path, content, n_images):
    n = content.count('\n')
    assert refusal(tmp_path, content, n_images).endswith(
        f'test_image_names.txt has {n} names but its split has {n_images} images')


@pytest.mark.parametrize('content', ['', '\ufeff'])  # ('\n' is one empty line)
def test_image_names_refuses_a_file_without_names(tmp_path, content):
    assert refusal(tmp_path, content).endswith('test_image_names.txt: no image names in it')


@pytest.mark.parametrize('content, line, why', [
    ('a.jpg\n\nc.jpg\n', 2, 'empty (one image name per line)'),
    ('\n', 1, 'empty'),
    ('a.jpg\nb.jpg\nc.jpg\n\n', 4, 'empty'),  # only one final empty line is the file's last newline
    ('a.jpg\nb.jpg \nc.jpg\n', 2, "'b.jpg ' has leading or trailing whitespace"),
    ('a.jpg\n\tb.jpg\nc.jpg\n', 2, "'\\tb.jpg' has leading or trailing whitespace"),
    ('a.jpg\nb\0.jpg\nc.jpg\n', 2, "'b\\x00.jpg' has a non-printable character"),
    ('a.jpg\nb\x1b[31m.jpg\nc.jpg\n', 2, 'non-printable'),  # a terminal escape
    ('a.jpg\n/etc/passwd\nc.jpg\n', 2, "'/etc/passwd' is an absolute path, not one inside --image_dir"),
    ('a.jpg\nb.jpg\nC:\\x.jpg\n', 3, 'absolute path'),
    ('a.jpg\nb.jpg\n../../etc/passwd\n', 3, "'../../etc/passwd' has a '..' part: image names stay inside --image_dir"),
    ('a.jpg\nsub/../../x.jpg\nc.jpg\n', 2, "'..' part"),
    ('a.jpg\nsub/../b.jpg\nc.jpg\n', 2, "'..' part"),  # even one that stays inside
    ('../images-evil/a.jpg\nb.jpg\nc.jpg\n', 1, "'..' part"),  # a sibling that shares the prefix
    ('a.jpg\nsub\\..\\..\\x.jpg\nc.jpg\n', 2, "'..' part"),  # Windows separators
    ('a.jpg\nb.jpg\na.jpg\n', 3, "'a.jpg' names the same image as line 1"),
    ('a.jpg\nb.jpg\n./sub//../a.jpg\n', 3, "'..' part"),
    ('a.jpg\nsub/b.jpg\n./sub//b.jpg\n', 3, "'./sub//b.jpg' names the same image as line 2"),
])
def test_image_names_refuses_each_bad_line_naming_it(tmp_path, content, line, why):
    message = refusal(tmp_path, content)
    assert f'test_image_names.txt: line {line}: ' in message and why in message


def test_image_names_refuses_a_symlink_that_leads_outside_or_repeats_a_file(tmp_path):
    (tmp_path / 'images').mkdir()
    (tmp_path / 'secret').mkdir()
    os.symlink(tmp_path / 'secret', tmp_path / 'images' / 'link')
    message = refusal(tmp_path, 'a.jpg\nlink/passwd\nc.jpg\n', symlink=True)
    assert "line 2: 'link/passwd' resolves outside --image_dir" in message and '(a symlink)' in message
    os.symlink(tmp_path / 'images' / 'sub', tmp_path / 'images' / 'alias')
    message = refusal(tmp_path, 'sub/a.jpg\nb.jpg\nalias/a.jpg\n', symlink=True)
    assert message.endswith("line 3: 'alias/a.jpg' names the same image as line 1")


def test_image_names_refuses_a_line_that_is_not_utf8(tmp_path):
    message = refusal(tmp_path, b'a.jpg\nb.jpg\n\xff\xfe.jpg\n')
    assert message.endswith('test_image_names.txt: line 3 is not UTF-8')


def test_image_names_refuses_an_image_dir_that_is_no_folder(tmp_path):
    dataset, _, _ = names_setup(tmp_path, 'a.jpg\nb.jpg\nc.jpg\n')
    with pytest.raises(ValueError, match='^--image_dir .*nowhere: no such folder$'):
        image_names(dataset, str(tmp_path / 'nowhere'))


# ---------------------------------------------------------------- boxes, grid, heat maps, thumbnails

def test_read_boxes_is_none_without_the_file_and_refuses_another_shape(tmp_path):
    dataset, _, _ = names_setup(tmp_path, 'a.jpg\nb.jpg\nc.jpg\n')
    assert report.read_boxes(dataset, 12) is None
    path = tmp_path / 'precomp' / 'test_boxes.npy'
    boxes = np.random.default_rng(0).random((3, 12, 4)).astype(np.float32)
    np.save(path, boxes)
    np.testing.assert_array_equal(report.read_boxes(dataset, 12), boxes)
    for bad in (boxes[:2], boxes[:, :11], boxes[..., :3], boxes.astype(np.int64)):
        np.save(path, bad)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            report.read_boxes(dataset, 12)
    path.write_bytes(b'not a numpy file')
    with pytest.raises(ValueError, match='not a readable'):
        report.read_boxes(dataset, 12)


@pytest.mark.parametrize('R, shape', [(36, (6, 6)), (12, (3, 4)), (7, (1, 7)), (1, (1, 1)), (100, (10, 10))])
def test_grid_shape_is_the_most_square_and_the_cells_tile_the_picture_row_major(R, shape):
    assert grid_shape(R) == shape
    rows, cols = shape
    boxes = grid_boxes(R)
    assert boxes.shape == (R, 4)
    np.testing.assert_allclose((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1 / R)
    if R > 1:
        np.testing.assert_allclose(boxes[1, :2], [1 / cols, 0])  # region 1: the next column


def test_heat_map_is_hottest_on_the_attended_region_only():
    R = 12  # 3 x 4 cells of 48 x 64 px on the 192 px grey canvas
    attn = np.zeros(R)
    attn[5] = 1.0  # row 1, column 1
    pic = np.asarray(heat_map(None, attn, grid_boxes(R)), dtype=int)
    assert pic.shape == (report.CANVAS, report.CANVAS, 3)
    hot = np.zeros(pic.shape[:2], bool)
    hot[64:128, 48:96] = True
    assert (pic[hot] == pic[64, 48]).all() and (pic[~hot] == pic[0, 0]).all()
    assert pic[64, 48].sum() > pic[0, 0].sum() + 300  # the cell is bright, the rest dim
    # Boxes: overlapping weights add up; the picture's size is the base's.
    base = Image.new('RGB', (100, 50), (0, 0, 255))
    boxes = np.array([[0, 0, 0.5, 1], [0.25, 0, 1, 1]])  # overlap on x in [25, 50)
    pic = np.asarray(heat_map(base, np.array([0.5, 0.5]), boxes), dtype=int)
    assert pic.shape == (50, 100, 3)
    assert pic[10, 30].sum() > pic[10, 10].sum() and (pic[10, 10] == pic[10, 80]).all()


@pytest.mark.parametrize('mode, size, orientation, expected', [
    ('RGB', (640, 480), None, (256, 192)),   # large: at most 256 px, aspect kept
    ('RGB', (64, 32), 6, (32, 64)),          # EXIF orientation 6 (rotate 90): made upright
    ('L', (40, 30), None, (40, 30)),         # grey, palette, transparency: RGB
    ('P', (40, 30), None, (40, 30)),
    ('RGBA', (40, 30), None, (40, 30)),
])
def test_thumbnails_are_upright_rgb_at_most_256px_under_index_names(tmp_path, mode, size, orientation, expected):
    ext = 'png' if mode in ('P', 'RGBA') else 'jpg'
    write_image(str(tmp_path / 'images' / f'a photo.{ext}'), size, mode, exif_orientation=orientation,
                colour=(10, 200, 10, 128) if mode == 'RGBA' else 100 if mode == 'L' else (10, 200, 10))
    pics = report.Pictures(str(tmp_path / 'out'), ['x.jpg', f'a photo.{ext}'], str(tmp_path / 'images'))
    thumb = pics.thumbnail(1)
    assert thumb.mode == 'RGB' and thumb.size == expected
    assert pics.image(1) == '<img class="thumb" src="img_000001.jpg" alt="image 1">'
    assert pictures_in(tmp_path / 'out') == ['img_000001.jpg']
    with Image.open(tmp_path / 'out' / 'img_000001.jpg') as im:
        assert im.size == expected and im.mode == 'RGB'


def test_an_unreadable_image_is_shown_by_its_index_with_a_warning(tmp_path, capsys):
    (tmp_path / 'images').mkdir()
    (tmp_path / 'images' / 'bad.jpg').write_bytes(b'not a picture')
    pics = report.Pictures(str(tmp_path / 'out'), ['missing.jpg', 'bad.jpg'], str(tmp_path / 'images'))
    assert pics.image(0) == '<div class="noimg">image 0</div>' and pics.image(1) == '<div class="noimg">image 1</div>'
    err = capsys.readouterr().err
    assert 'missing.jpg' in err and 'bad.jpg' in err and err.count('warning: ') == 2
    assert pictures_in(tmp_path / 'out') == []
    pics = report.Pictures(str(tmp_path / 'out2'))  # no names: indices
    assert pics.image(3) == '<div class="noimg">image 3</div>'


# ---------------------------------------------------------------- the examples page end to end

def test_examples_page_shows_hostile_captions_labels_and_names_as_text_only(tmp_path):
    folder = toy.make_toy(str(tmp_path / 'd'), sizes={'test': 6})
    caps = [f'{HOSTILE[k % len(HOSTILE)]} n{k}' for k in range(30)]  # 6 images x 5, all distinct
    with open(os.path.join(folder, 'test_caps.txt'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(caps) + '\n')
    names = ['0 (copy).jpg', '<img src=x onerror=alert(1)>.jpg', '"><script>alert(1)</script>.jpg',
             'javascript:alert(1).jpg', 'x](javascript:alert(1)).jpg', "sub/it's & \"it\".jpg"]
    with open(os.path.join(folder, 'test_image_names.txt'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(names) + '\n')
    image_dir = str(tmp_path / 'my images (2)')
    for name in names:
        write_image(os.path.join(image_dir, name))
    vocab = vocab_lib.build_vocab(str(tmp_path / 'd'), 'toy_precomp', threshold=1, splits=('test',))
    ds = data.PrecompDataset(str(tmp_path / 'd'), 'toy_precomp', 'test', vocab)
    assert ds.raw_captions == caps
    torch.manual_seed(0)
    model = CASC(Config(vocab_size=len(vocab), img_dim=64, embed_size=16, word_dim=8, num_labels=5,
                        label_hidden=8))
    sims = evaluation.evaluate_arrays(model, ds.images, ds.captions, progress=False)[0]
    label_words = ['<b>dog</b>', '"><script>alert(1)</script>', 'javascript:alert(1)', "a'b\"c&d", 'kite\n# h1']
    out = str(tmp_path / 'out')
    path = write_examples(model, ds, sims, label_words, 30, out, image_dir)  # every sentence a query
    assert path == os.path.join(out, 'examples.html')
    page = check_page(path, caps + label_words + names)
    raw = open(path, encoding='utf-8').read()
    for bad in ('<script', '<b>', '<img src=x', "it's"):  # as text, '<' and quotes are references
        assert bad not in raw
    images, sentences = page.root.all('section', 'image-query'), page.root.all('section', 'text-query')
    assert len(images) == 6 and len(sentences) == 30
    for i, section in enumerate(images):
        assert section.one('h3').text() == f'Image {i} {names[i]}'
        assert section.one('img').attrs['src'] == f'img_{i:06d}.jpg'
        assert [li.one('span', 'caption').text() for li in section.all('li', 'result')] == \
            [caps[j] for j in sims[i].argsort(descending=True, stable=True)[:3].tolist()]
        labels = [li.one('span', 'word').text() for li in section.all('li', 'label')]
        assert sorted(labels) == sorted(label_words)  # K = 5 < 10: all, once
    for j, section in enumerate(sentences):
        assert section.one('q', 'query').text() == caps[j]
        words = [f.one('figcaption').text() for f in section.all('figure')]
        assert words == ds.tokens[j]  # one heat map per word, for the top image only
        assert [f.one('img').attrs['src'] for f in section.all('figure')] == \
            [f's{j}_r1_w{w}.png' for w in range(1, len(words) + 1)]
    assert pictures_in(out) == sorted([f'img_{i:06d}.jpg' for i in range(6)] +
                                      [f's{j}_r1_w{w}.png' for j in range(30) for w in range(1, len(ds.tokens[j]) + 1)])


# ---------------------------------------------------------------- words scored as <unk>; existing pages; --help

def test_examples_page_marks_the_heat_maps_of_words_scored_as_unk(tmp_path):
    """A vocabulary of the words seen 8 times or more: the rarer ones of each sentence are read as
    <unk>, and their heat maps say so; the others are shown as the words they are."""
    toy.make_toy(str(tmp_path / 'd'), sizes={'test': 6})
    vocab = vocab_lib.build_vocab(str(tmp_path / 'd'), 'toy_precomp', threshold=8, splits=('test',))
    ds = data.PrecompDataset(str(tmp_path / 'd'), 'toy_precomp', 'test', vocab)
    torch.manual_seed(0)
    model = CASC(Config(vocab_size=len(vocab), img_dim=64, embed_size=16, word_dim=8, num_labels=5, label_hidden=8))
    sims = evaluation.evaluate_arrays(model, ds.images, ds.captions, progress=False)[0]
    path = write_examples(model, ds, sims, None, 30, str(tmp_path / 'out'), vocab=vocab)
    sentences = check_page(path).root.all('section', 'text-query')
    marked = [0, 0]
    for j, section in enumerate(sentences):
        figures = section.all('figure')
        assert len(figures) == len(ds.tokens[j])
        for word, f in zip(ds.tokens[j], figures):
            unknown = word not in vocab.word2idx
            assert ds.captions[j][1 + figures.index(f)] == (vocab('<unk>') if unknown else vocab(word))
            assert ('unknown' in f.classes()) == unknown
            assert f.one('figcaption').text() == (f'{word} (unknown: scored as <unk>)' if unknown else word)
            marked[unknown] += 1
    assert min(marked) > 0, marked  # both kinds shown


def test_check_out_refuses_an_existing_page_or_its_pictures_not_other_files(tmp_path):
    for name in ('q3_r1_w2.png', 's0_r1_w1.png', 'img_000012.jpg', 'index.html'):
        out = tmp_path / name.replace('.', '_')
        report.check_out(str(out), 'index.html')  # creates the folder, writes nothing
        (out / 'holiday.jpg').write_bytes(b'a photo')  # a user's file: no page's name
        (out / 'examples.html').write_bytes(b'the other page')
        report.check_out(str(out), 'index.html')
        (out / name).write_bytes(b'written before')
        with pytest.raises(ValueError) as e:
            report.check_out(str(out), 'index.html')
        assert str(e.value) == (f'{out / name} exists (a page written before): pass --overwrite to replace the '
                                f'page and its pictures, or choose another --out')
        report.check_out(str(out), 'index.html', overwrite=True)
        assert sorted(os.listdir(out)) == sorted(['examples.html', 'holiday.jpg', name])


def test_report_py_help_says_what_it_is_and_which_commands_write_pages():
    import subprocess
    import sys
    from conftest import ROOT
    run = lambda *a: subprocess.run([sys.executable, 'report.py', *a], cwd=ROOT, capture_output=True,  # noqa: E731
                                    text=True, timeout=120)
    helped = run('--help')
    assert helped.returncode == 0 and helped.stdout.startswith('usage: report.py')
    assert 'search.py --model_path CKPT --query' in helped.stdout and '--out page' in helped.stdout
    assert 'evaluation.py --model_path CKPT' in helped.stdout and '--examples 5 --out examples' in helped.stdout
    bare = run()
    assert bare.returncode == 1 and bare.stdout == '' and bare.stderr.count('\n') == 1
    assert 'search.py --out DIR' in bare.stderr and 'evaluation.py --examples N --out DIR' in bare.stderr
