"""report.py against hostile data: captions, label words and image names become inert Markdown
(checked by rendering with Python-Markdown when it is installed), and image links stay inside
--image_dir. Real files in tmp_path; the end-to-end test uses an untrained tiny model."""
import html
import os
import re
import urllib.parse
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest
import torch

import data
import evaluation
import vocab as vocab_lib
from model import CASC, Config
from report import image_names, md_escape, write_examples

try:
    import markdown
except ImportError:  # optional: the escaping checks below still run without it
    markdown = None

HOSTILE = ['<img src=x onerror=alert(1)>', '[x](javascript:alert(1))', '![a](b)', '**bold**', '# heading',
           'a | b', '`code` and ``more``', '1. item', '- item', '+ item', '12. item', '> quote',
           '<script>alert("x")</script>', "it's \"quoted\" & &amp; done", '~~strike~~ _em_ \\*',
           'trailing backslash \\', '[ref]: http://evil.example', '***', '<http://evil.example>']
UNESCAPED = r'(?:^|[^\\])(?:\\\\)*'  # an even run of backslashes (none included) before what follows


def visible(rendered: str) -> str:
    """Text a reader sees in rendered HTML: tags stripped, references decoded."""
    return html.unescape(re.sub(r'<[^>]*>', '', rendered))


class Tags(HTMLParser):
    """Every start tag of an HTML document, with its attributes."""

    def __init__(self, text):
        super().__init__()
        self.tags = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


# ---------------------------------------------------------------- md_escape

@pytest.mark.parametrize('text', HOSTILE)
def test_md_escape_leaves_no_markup_and_renders_as_the_original_text(text):
    out = md_escape(text)
    assert '<' not in out and '>' not in out and '\n' not in out
    bare = re.sub(r'&(#x?[0-9a-f]+|[a-z]+);', '', out)  # character references ('&#124;') are inert
    for ch in ('[', ']', '](', '`', '*', '_', '#', '(', ')', '|', '~'):  # '!' is inert before '\['
        assert not re.search(UNESCAPED + re.escape(ch), bare), (ch, out)
    assert not re.match(r'\s*([-+]|\d+\.)', out)  # no list marker left at the start
    if markdown is not None:
        rendered = markdown.markdown(out)
        for tag in ('<img', '<a ', '<script', '<strong>', '<em>', '<h1>', '<ol>', '<ul>', '<code>',
                    '<blockquote>', '<hr'):
            assert tag not in rendered, (tag, rendered)
        assert visible(rendered).strip() == text.strip()


def test_md_escape_turns_newlines_into_spaces_and_keeps_plain_text():
    assert md_escape('a dog\nruns\r\non grass\r') == 'a dog runs on grass '
    assert md_escape('a man in red rides a horse.') == 'a man in red rides a horse.'
    assert md_escape('A red kite!') == 'A red kite!'
    assert md_escape('2 dogs - 3. cats') == '2 dogs - 3. cats'  # list markers only at the start


# ---------------------------------------------------------------- image_names

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


def test_image_names_reads_one_name_per_line(tmp_path):
    (tmp_path / 'images').mkdir()
    os.symlink(tmp_path / 'images' / 'sub', tmp_path / 'images' / 'alias')  # a link that stays inside
    content = 'a.jpg\r\nsub/b (1).jpg\n alias/c d.jpg \nsub/../e.jpg\n'  # more names than images is fine
    dataset, image_dir, _ = names_setup(tmp_path, content)
    assert image_names(dataset, image_dir) == ['a.jpg', 'sub/b (1).jpg', ' alias/c d.jpg ', 'sub/../e.jpg']
    dataset, image_dir, _ = names_setup(tmp_path, 'a.jpg\nb.jpg\nc.jpg')  # no final newline
    assert image_names(dataset, image_dir) == ['a.jpg', 'b.jpg', 'c.jpg']


def test_image_names_is_none_without_image_dir_or_names_file(tmp_path):
    dataset, image_dir, path = names_setup(tmp_path, 'a.jpg\nb.jpg\nc.jpg\n')
    assert image_names(dataset, None) is None
    os.remove(path)
    assert image_names(dataset, image_dir) is None


def refusal(tmp_path, content, n_images=3) -> str:
    dataset, image_dir, path = names_setup(tmp_path, content, n_images)
    with pytest.raises(ValueError) as err:
        image_names(dataset, image_dir)
    message = str(err.value)
    assert path in message and '\n' not in message
    return message


def test_image_names_refuses_fewer_names_than_images(tmp_path):
    message = refusal(tmp_path, 'a.jpg\nb.jpg\nc.jpg\n', n_images=23)
    assert 'test_image_names.txt has 3 names but the test split has 23 images' in message


@pytest.mark.parametrize('content, line, why', [
    ('a.jpg\n\nc.jpg\n', 2, 'empty'),
    ('a.jpg\nb.jpg\nc.jpg\n\n', 4, 'empty'),  # only one final empty line is the file's last newline
    ('a.jpg\n/etc/passwd\nc.jpg\n', 2, 'absolute'),
    ('a.jpg\nb.jpg\n../../etc/passwd\n', 3, 'outside'),
    ('a.jpg\nsub/../../x.jpg\nc.jpg\n', 2, 'outside'),
    ('../images-evil/a.jpg\nb.jpg\nc.jpg\n', 1, 'outside'),  # a sibling that shares the prefix
    ('a.jpg\nb\0.jpg\nc.jpg\n', 2, 'NUL'),
])
def test_image_names_refuses_empty_absolute_and_escaping_names(tmp_path, content, line, why):
    message = refusal(tmp_path, content)
    assert f'line {line}' in message and why in message


def test_image_names_refuses_a_symlink_that_leads_outside(tmp_path):
    (tmp_path / 'images').mkdir()
    (tmp_path / 'secret').mkdir()
    os.symlink(tmp_path / 'secret', tmp_path / 'images' / 'link')
    message = refusal(tmp_path, 'a.jpg\nlink/passwd\nc.jpg\n')
    assert 'line 2' in message and 'outside' in message


def test_image_names_refuses_a_line_that_is_not_utf8(tmp_path):
    message = refusal(tmp_path, b'a.jpg\nb.jpg\n\xff\xfe.jpg\n')
    assert 'line 3' in message and 'UTF-8' in message


# ---------------------------------------------------------------- the report end to end

def test_report_escapes_hostile_captions_labels_and_names(tmp_path):
    folder = data.make_toy(str(tmp_path / 'd'), sizes={'test': 6})
    caps = [f'{HOSTILE[k % len(HOSTILE)]} n{k}' for k in range(30)]  # 6 images x 5, all distinct
    with open(os.path.join(folder, 'test_caps.txt'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(caps) + '\n')
    names = [f'{i} (copy).jpg' for i in range(4)] + ['x](javascript:alert(1)).jpg', 'sub/<img src=x>.jpg']
    with open(os.path.join(folder, 'test_image_names.txt'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(names) + '\n')
    image_dir = str(tmp_path / 'my images (2)')
    vocab = vocab_lib.build_vocab(str(tmp_path / 'd'), 'toy_precomp', threshold=1, splits=('test',))
    ds = data.PrecompDataset(str(tmp_path / 'd'), 'toy_precomp', 'test', vocab)
    assert ds.raw_captions == caps
    torch.manual_seed(0)
    model = CASC(Config(vocab_size=len(vocab), img_dim=64, embed_size=16, word_dim=8, num_labels=5,
                        label_hidden=8))
    sims = evaluation.evaluate_arrays(model, ds.images, ds.captions, progress=False)[0]
    label_words = ['<b>dog</b>', '[cat](javascript:x)', '**horse**', 'a|b', 'kite\n# h1']
    path = write_examples(model, ds, sims, label_words, 30, str(tmp_path / 'out'), image_dir)  # every query
    text = open(path, encoding='utf-8').read()

    assert '<' not in text and 'javascript:alert(1))' not in text
    for raw in set(caps + label_words):
        assert md_escape(raw) in text
        if md_escape(raw) != raw:  # '- item' is only escaped at the start, so look outside '\- item'
            assert raw not in text.replace(md_escape(raw), ' ')
    # 6 query images with their picture, 30 query sentences x their top 5 images with theirs:
    # every '](' in the report is one of these links, each to its resolved name inside image_dir.
    links = re.findall(r'!\[image (\d+)\]\(([^()\s]+)\)', text)
    assert len(links) == 6 + 30 * 5 == text.count('](')
    root = os.path.realpath(image_dir)
    for i, target in links:
        assert urllib.parse.unquote(target) == os.path.join(root, names[int(i)])

    if markdown is not None:
        rendered = markdown.markdown(text)
        tags = Tags(rendered).tags
        assert {t for t, _ in tags} <= {'h1', 'h2', 'h3', 'p', 'ol', 'li', 'img'}
        assert sum(t == 'h1' for t, _ in tags) == 1
        srcs = [urllib.parse.unquote(a['src']) for t, a in tags if t == 'img']
        assert len(srcs) == len(links) and all(os.path.dirname(s) in (root, os.path.join(root, 'sub')) for s in srcs)
        seen = visible(rendered)
        for raw in caps:
            assert raw in seen
