"""server.py / webapp.py / photo.py: `search.py --serve` as a real process on 127.0.0.1 (a free
port), asked over real HTTP: the API equals search.py --json, 32 requests from 8 threads are all
right, every bad request is a 4xx naming its parameter (and the server goes on), /images/ escapes
are 404, the page links a query, uploads go through features.py's extractor with the gallery's
settings, Ctrl-C stops it with one line. And webapp's app in this process: a page's labels in one model
call, thumbnails decoded once, /images/ names looked up in a set, the image parameter named as the API
spells it. Random-weight checkpoints on toy data: nothing trains."""
import concurrent.futures
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid

import numpy as np
import pytest
from PIL import Image

import report
import search
import server
import webapp
from conftest import ROOT
from test_index import random_checkpoint, toy_world

N_IMG = 30
QUERIES = ['a red dog', 'a blue cat next to a green bench', 'boat', 'a man in red', 'kite and a frisbee',
           'there is a yellow car', 'a girl dressed in white', 'an orange ball near a tree']


class Server:
    """`python search.py --serve ...` on 127.0.0.1, port 0; .url once it printed it (60 s at most)."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'search.py'), '--serve', '--host',
                                      '127.0.0.1', '--port', '0', '--device', 'cpu', *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, 'OMP_NUM_THREADS': '1'})
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(ln) for ln in self.proc.stdout], daemon=True).start()
        try:
            first = lines.get(timeout=120)
        except queue.Empty:
            first = ''
        if 'http://' not in first:
            self.proc.kill()
            raise AssertionError(f'no URL: {first!r} {self.proc.communicate()[1]}')
        self.url = first.split('at ', 1)[1].split()[0]

    def get(self, path: str, data: bytes = None, headers=None) -> tuple:
        """-> (status, parsed JSON or bytes)."""
        request = urllib.request.Request(self.url.rstrip('/') + path, data, headers or {})
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                status, body, kind = r.status, r.read(), r.headers.get('content-type', '')
        except urllib.error.HTTPError as e:
            status, body, kind = e.code, e.read(), e.headers.get('content-type', '')
        return status, json.loads(body) if kind.startswith('application/json') else body

    def upload(self, data: bytes, path: str = '/api/search', name: str = 'photo.jpg') -> tuple:
        boundary = uuid.uuid4().hex
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                f'Content-Type: application/octet-stream\r\n\r\n').encode() + data + f'\r\n--{boundary}--\r\n'.encode()
        return self.get(path, body, {'Content-Type': f'multipart/form-data; boundary={boundary}'})

    def stop(self) -> tuple:
        """Ctrl-C -> (exit code, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


def write_pictures(folder, n: int, size=(64, 48)) -> list:
    """n distinct small pictures in folder -> their names."""
    os.makedirs(folder, exist_ok=True)
    names = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        names.append(f'img{i:03d}.jpg')
        Image.fromarray(pixels).save(os.path.join(folder, names[-1]), quality=90)
    return names


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """Toy data with image files for the test split, a random checkpoint, and the server on them."""
    root = tmp_path_factory.mktemp('server')
    data, vocab_path = toy_world(root)
    names = write_pictures(root / 'images', N_IMG)
    with open(os.path.join(data, 'toy_precomp', 'test_image_names.txt'), 'w') as f:
        f.write(''.join(f'{n}\n' for n in names))
    (root / 'secret.txt').write_text('not for the web')
    os.symlink(root / 'secret.txt', root / 'images' / 'link.jpg')
    ckpt = random_checkpoint(root / 'a.pth.tar', data, vocab_path)
    srv = Server('--model_path', ckpt, '--data_path', data, '--split', 'test', '--image_dir', root / 'images')
    yield root, data, ckpt, srv
    srv.stop()


def cli_json(ckpt, data, *args) -> list:
    """search.py --json's objects, from a real process."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'search.py'), '--model_path', ckpt, '--data_path',
                          data, '--device', 'cpu', '--json', *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def same(api: dict, cli: dict):
    """Equal objects, scores within 1e-6."""
    assert [r.pop('score') for r in api['results']] == pytest.approx([r.pop('score') for r in cli['results']], abs=1e-6)
    assert api == cli


def test_api_answers_as_the_command_line_from_many_threads_at_once(world):
    root, data, ckpt, srv = world
    args = [a for q in QUERIES for a in ('--query', q)]
    texts = cli_json(ckpt, data, *args, '--k', '10')
    images = cli_json(ckpt, data, '--image', '3', '--image', 'img007.jpg', '--k', '10')
    asks = [f'/api/search?q={urllib.parse.quote(q)}&k=10' for q in QUERIES] * 3
    asks += ['/api/search?image=3&k=10', '/api/search?image=img007.jpg&k=10'] * 4
    expected = texts * 3 + images * 4
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(srv.get, asks))  # 32 requests, 8 at a time
    assert len(answers) == 32
    for (status, api), cli in zip(answers, expected):
        assert status == 200
        same(api, json.loads(json.dumps(cli)))
    status, short = srv.get('/api/search?q=a+red+dog&k=3')
    assert [r['index'] for r in short['results']] == [r['index'] for r in texts[0]['results'][:3]]


def test_attention_and_health(world):
    root, data, ckpt, srv = world
    status, att = srv.get('/api/attention?q=a+red+dog&image=4')
    words, attn = search.Searcher(ckpt, data, 'test', device='cpu').attention('a red dog', 4)
    assert status == 200 and att['words'] == words == ['a', 'red', 'dog'] and att['image_name'] == 'img004.jpg'
    assert np.allclose(att['attention'], attn.numpy(), atol=1e-6) and np.array(att['boxes']).shape == (12, 4)
    status, health = srv.get('/api/health')
    assert status == 200 and health['images'] == N_IMG and health['captions'] == 5 * N_IMG
    assert health['device'] == 'cpu' and health['model'] == os.path.abspath(ckpt) and health['uploads'] is False


@pytest.mark.parametrize('path, status, names', [
    ('/api/search?q=&k=3', 400, 'q'), ('/api/search?q=' + 'dog+' * 600, 400, 'q'), ('/api/search?q=%21%3F', 400, 'q'),
    ('/api/search?q=dog&k=0', 400, 'k'), ('/api/search?q=dog&k=1001', 400, 'k'), ('/api/search?q=dog&k=x', 400, 'k'),
    ('/api/search?image=30', 400, 'image'), ('/api/search?image=nosuch.jpg', 400, 'image'),
    ('/api/search', 400, 'q, image'), ('/api/search?q=dog&image=1', 400, 'q, image'),
    ('/api/attention?q=dog', 400, 'image'), ('/heatmap.png?q=dog&image=1&word=2', 400, 'word'),
    ('/api/nothing', 404, '/api/nothing')])
def test_bad_requests_get_a_4xx_naming_the_parameter(world, path, status, names):
    srv = world[3]
    got, body = srv.get(path)
    assert got == status and set(body) == {'error'} and body['error'].startswith(names), body
    assert srv.get('/api/search?q=dog&k=1')[0] == 200  # still serving


@pytest.mark.parametrize('path', ['/images/../a.pth.tar', '/images/%2e%2e/secret.txt', '/images/..%2fsecret.txt',
                                  '/images/%2Fetc%2Fpasswd', '/images//etc/passwd', '/images/link.jpg',
                                  '/images/img000.jpg%00', '/images/%252e%252e%252fsecret.txt', '/thumbs/30.jpg'])
def test_path_escapes_are_404(world, path):
    status, body = world[3].get(path)
    assert status == 404 and 'not found' in body['error']


def test_images_thumbnails_and_heat_maps_are_served(world):
    root, _, _, srv = world
    status, body = srv.get('/images/img002.jpg')
    assert status == 200 and body == (root / 'images' / 'img002.jpg').read_bytes()
    status, body = srv.get('/thumbs/2.jpg')
    assert status == 200 and Image.open(io.BytesIO(body)).size == (64, 48)
    status, body = srv.get('/heatmap.png?q=a+red+dog&image=2&word=3')
    assert status == 200 and Image.open(io.BytesIO(body)).format == 'PNG'


def test_the_page_shows_a_linkable_query_with_data_escaped(world):
    root, data, ckpt, srv = world
    status, page = srv.get('/?q=' + urllib.parse.quote('a red dog <script>alert(1)</script>'))
    page = page.decode()
    assert status == 200 and '<script>' not in page and '&lt;script&gt;' in page
    assert "script-src 'none'" in page and 'http' not in page.split('<body>')[1]  # no CDN, no external URL
    top = cli_json(ckpt, data, '--query', 'a red dog <script>alert(1)</script>', '--k', '10')[0]['results'][0]
    assert page.index(f'/thumbs/{top["index"]}.jpg') < page.index('<span class="rank">2</span>')
    assert page.count('<details class="attention">') == 10 and 'Predicted labels' in page
    assert '(unknown: scored as &lt;unk&gt;)' in page  # 'script' and 'alert' are not toy words
    status, page = srv.get('/?q=')
    assert status == 400 and 'q: empty query' in page.decode()


def test_uploads_are_refused_saying_why_for_a_gallery_features_py_did_not_make(world):
    status, body = world[3].upload(b'\xff\xd8 anything')
    assert status == 400 and body['error'].startswith('image: uploads are off') and 'features.py' in body['error']


def test_non_loopback_addresses_are_told_apart():
    assert server.is_loopback('127.0.0.1') and server.is_loopback('::1') and server.is_loopback('localhost')
    assert not server.is_loopback('0.0.0.0') and not server.is_loopback('192.168.1.4')


def test_ctrl_c_stops_the_server_with_one_line(world):
    root, data, ckpt, _ = world
    srv = Server('--model_path', ckpt, '--data_path', data, '--split', 'test')
    assert srv.get('/api/health')[0] == 200
    code, err = srv.stop()
    assert (code, err) == (0, 'server stopped\n')


# ---------------------------------------------------------------------------------------------
# webapp's app in this process, its route functions called directly (there is no HTTP client library
# here): the model calls a page makes, the pictures decoded once, the names looked up in a set.

class Calls:
    """server.Worker's stand-in: each call run at once on the caller's thread, its function's name kept."""

    def __init__(self, searcher):
        self.searcher, self.calls = searcher, []

    def text(self, query: str, k: int) -> dict:
        return self.searcher.text([query], k)[0]

    def call(self, fn, *args):
        self.calls.append(fn.__name__)
        return fn(*args)


@pytest.fixture(scope='module')
def searcher(world):
    root, data, ckpt, _ = world
    return search.Searcher(ckpt, data, 'test', device='cpu')


@pytest.fixture
def app(world, searcher):
    """A fresh app (empty caches) on the world's split and pictures -> (app, its Calls)."""
    worker = Calls(searcher)
    return webapp.create_app(searcher, worker, str(world[0] / 'images')), worker


def route(app, path: str):
    """The function of app's GET route `path`."""
    return next(r.endpoint for r in app.routes if getattr(r, 'path', None) == path and 'GET' in r.methods)


def test_a_page_asks_the_model_thread_once_for_the_labels_of_all_its_images(app, searcher):
    app, worker = app
    page = route(app, '/')(q='a red dog', image=None).body.decode()
    assert worker.calls == ['predicted_labels']  # one call for the 10 images, not one each
    results = searcher.text(['a red dog'], 10)[0]['results']
    for r in results:  # the numbers of a call per image
        assert report.labels_html(searcher.predicted_labels('a red dog', r['index']), searcher.labels) in page
    assert page.count('Predicted labels') == len(results) == 10


def test_thumbnails_are_decoded_once_for_thumbs_and_heat_maps(app, world, monkeypatch):
    (app, _), path = app, os.path.realpath(world[0] / 'images' / 'img005.jpg')
    decoded, load = [], report.load_thumbnail
    monkeypatch.setattr(report, 'load_thumbnail', lambda path: decoded.append(path) or load(path))
    thumb, heatmap = route(app, '/thumbs/{i}.jpg'), route(app, '/heatmap.png')
    first, again = thumb(5).body, thumb(5).body
    maps = [heatmap(q='a red dog', image=image, word=w).body for image, w in (('5', 1), ('img005.jpg', 3), ('5', 1))]
    assert decoded == [path] and first == again == webapp.encode_picture(load(path), 'JPEG') and maps[0] == maps[2]
    thumb(6)
    assert len(decoded) == 2


class NoScan(list):
    def __contains__(self, name):
        raise AssertionError(f'{name!r} looked for in a scan of the split\'s names')


def test_images_are_looked_up_in_a_set_of_the_split_names(world, searcher, monkeypatch):
    root, names = world[0], searcher.page_names(str(world[0] / 'images'))
    monkeypatch.setattr(searcher, 'page_names', lambda image_dir: NoScan(names))
    image = route(webapp.create_app(searcher, Calls(searcher), str(root / 'images')), '/images/{name:path}')
    assert image('img002.jpg').path == os.path.realpath(root / 'images' / 'img002.jpg')
    for name in ('link.jpg', '../a.pth.tar', 'nosuch.jpg', 'img002.jpg/'):
        with pytest.raises(server.ApiError, match='not found'):
            image(name)
    inside = frozenset(names) | {'link.jpg'}  # a name of the split whose file is a link out of image_dir
    assert server.image_file(str(root / 'images'), inside, 'link.jpg') is None
    assert server.image_file(None, None, 'img002.jpg') is None


def test_the_server_names_the_image_parameter_as_it_is_spelled_there(searcher):
    for image, says in (('30', 'image 30: no such image, the test split has images 0..29'),
                        ('nosuch.jpg', "image 'nosuch.jpg': no image of that name in ")):
        with pytest.raises(server.ApiError) as e:
            server.check_image(searcher, image)
        assert e.value.status == 400 and str(e.value).startswith(says), e.value


@pytest.fixture(scope='module')
def photos(world):
    """A 'photos' split made by features.py (random ResNet weights, small inputs) from 6 pictures,
    a random checkpoint for its 2048-dim features, and the server on it (uploads up to 0.1 MB)."""
    import features
    root, data, _, _ = world
    folder = os.path.join(data, 'toy_precomp')
    names = write_pictures(root / 'photos', 6, (96, 64))
    with open(os.path.join(folder, 'photos_caps.txt'), 'w') as f:
        f.write(''.join(f'a red dog and a {c} cat {k}\n' for c in ('blue', 'green') for k in range(15)))
    features.main(['--data_path', data, '--data_name', 'toy_precomp', '--split', 'photos', '--image_root',
                   str(root / 'photos'), '--weights', 'none', '--image_size', '64', '--workers', '0'])
    ckpt = random_checkpoint(root / 'wide.pth.tar', data, str(root / 'vocab'), img_dim=2048)
    srv = Server('--model_path', ckpt, '--data_path', data, '--split', 'photos', '--image_dir', root / 'photos',
                 '--max_upload_mb', 0.1)
    yield root, names, srv
    srv.stop()


def test_an_uploaded_photo_ranks_captions_as_its_features_py_features_do(photos):
    root, names, srv = photos
    for i in (1, 4):
        status, up = srv.upload((root / 'photos' / names[i]).read_bytes())
        _, same_image = srv.get(f'/api/search?image={i}&k=10')
        assert status == 200 and [r['index'] for r in up['results']] == [r['index'] for r in same_image['results']]
        assert [r['score'] for r in up['results']] == pytest.approx([r['score'] for r in same_image['results']],
                                                                   abs=1e-5)
        assert [r['caption'] for r in up['results']] == [r['caption'] for r in same_image['results']]
    status, page = srv.upload((root / 'photos' / names[2]).read_bytes(), path='/')
    page = page.decode()
    assert status == 200 and 'Your photo' in page and 'src="data:image/jpeg;base64,' in page


def test_bad_uploads_are_refused_naming_the_image_field(photos):
    root, _, srv = photos
    bomb = io.BytesIO()
    Image.new('1', (13000, 13000)).save(bomb, 'PNG')  # 169 megapixels in a few kB
    for data, status, says in ((b'hello, not a picture', 400, 'not a picture'),
                               (bomb.getvalue(), 400, 'megapixels, over --max_pixels'),
                               (os.urandom(200_000), 413, 'over the limit of 0.1 MB'),
                               (b'', 400, 'empty')):
        got, body = srv.upload(data)
        assert got == status and body['error'].startswith('image: ') and says in body['error'], body
    got, body = srv.get('/api/search', b'{"image": 1}', {'Content-Type': 'application/json'})
    assert got == 400 and body['error'].startswith('image: ')
    assert srv.get('/api/health')[1]['uploads'] is True  # still serving, uploads on
