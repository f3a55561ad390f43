"""The live search server: a JSON API and a page over a split's gallery index (index.py).

    python search.py --serve --model_path M --data_path D --split test [--image_dir IMAGES] [--port 8000]

search.py parses the flags and builds the Searcher; webapp.py holds the FastAPI routes, the page and
the uvicorn loop (validated parameters, OpenAPI docs at /docs, HTTP done by a well-kept server, not by
hand); this file holds what serves them: the one model thread, the checks of request parameters, the
files under --image_dir and the listening socket.

    GET  /api/search?q=TEXT&k=10        exactly what `search.py --json --query TEXT --k 10` prints
    GET  /api/search?image=N|NAME&k=10  as `--image`
    POST /api/search (multipart `image`) the gallery's captions ranked for an uploaded photo
    GET  /api/attention?q=TEXT&image=N  the words and their attention over the image's regions
    GET  /api/health                    model, split, gallery size, device
    GET  /  (/?q=TEXT, /?image=N)       the page; POST / uploads a photo from it
    GET  /images/NAME, /thumbs/N.jpg, /heatmap.png?q=&image=&word=   pictures for the page

One worker thread makes every model call, in arrival order; text queries waiting together are scored
in one pass over the gallery. Bad requests get a 4xx with {"error": "..."} naming the parameter.
"""
import concurrent.futures
import ipaddress
import os
import queue
import socket
import threading

from vocab import query_tokens

K_MAX = 1000  # most results a request may ask for
MAX_BATCH = 64  # text queries scored together at most
PAGE_K = 10  # results on the page


class ApiError(Exception):
    """A bad request: HTTP status and the one-line message (naming the parameter)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Worker:
    """Runs every model call on one thread, in arrival order (the model, its caches and the
    precision flags are never shared by two threads). Text queries waiting together are scored in
    one Searcher.text call: one pass over the gallery for all of them."""

    def __init__(self, searcher):
        self.searcher, self.jobs = searcher, queue.Queue()
        threading.Thread(target=self._loop, daemon=True, name='casc-model').start()

    def text(self, query: str, k: int) -> dict:
        """One checked text query -> its result, as Searcher.text([query], k)[0]."""
        return self._submit(('text', query, k))

    def call(self, fn, *args):
        """fn(*args) on the worker thread -> its result (or its exception, raised here)."""
        return self._submit(('call', fn, args))

    def _submit(self, job):
        done = concurrent.futures.Future()
        self.jobs.put((job, done))
        return done.result()

    def _loop(self):
        while True:
            batch = [self.jobs.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            texts = [(job, done) for job, done in batch if job[0] == 'text']
            if texts:
                self._texts(texts)
            for (kind, fn, args), done in batch:
                if kind == 'call':
                    _settle(done, fn, *args)

    def _texts(self, texts: list):
        """Score the queries together at the largest k; each gets its own k first results (the
        top k of a top k' >= k, ties to the lower index either way)."""
        k = max(job[2] for job, _ in texts)
        try:
            results = self.searcher.text([job[1] for job, _ in texts], k)
        except Exception as e:  # every query was checked before: this is the server's fault
            for _, done in texts:
                done.set_exception(e)
            return
        for (job, done), res in zip(texts, results):
            done.set_result({**res, 'results': res['results'][:job[2]]})


def _settle(done, fn, *args):
    try:
        done.set_result(fn(*args))
    except Exception as e:
        done.set_exception(e)


# ---------------------------------------------------------------------------------------------
# Checks of request parameters, and the files under --image_dir.

def check_query(q: str) -> str:
    """A text query parameter -> itself; ApiError naming q when it is empty, over-long or wordless."""
    if not q.strip():
        raise ApiError(400, 'q: empty query')
    try:
        query_tokens(q, 'q')
    except ValueError as e:  # it names q ('q: no words to search for')
        raise ApiError(400, str(e)) from None
    return q


def check_image(searcher, image: str) -> int:
    """An image parameter (index or name) -> its index; ApiError naming image otherwise."""
    if not image.strip():
        raise ApiError(400, 'image: empty')
    try:
        return searcher.image_index(image, 'image')
    except ValueError as e:  # it names image ('image 99: no such image, ...')
        raise ApiError(400, str(e)) from None


def image_file(image_dir: str, names: frozenset, name: str):
    """/images/NAME -> the file's real path, or None (-> 404) unless NAME is one of the split's
    image names (a set, or None without image_dir: one look-up, not a scan of the split's) and its
    real path (symlinks followed) lies inside image_dir."""
    if names is None or name not in names:
        return None
    root = os.path.realpath(image_dir)
    path = os.path.realpath(os.path.join(root, name))
    return path if path.startswith(root + os.sep) and os.path.isfile(path) else None


def is_loopback(host: str) -> bool:
    if host == 'localhost':
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); ValueError naming --host/--port."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f'--host {host}: cannot resolve it ({e.strerror})') from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ValueError(f'--port {port}: cannot listen on {host}:{port} ({e.strerror})') from None
    sock.listen(128)
    return sock
