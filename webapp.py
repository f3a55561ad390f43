"""The server's routes (FastAPI), its page (drawn by report.py's renderer) and the serving loop of
search.py --serve (uvicorn on server.py's socket, every model call on server.Worker).

The page works without scripts (report.SERVER_CSP forbids them): a GET form for text queries
(/?q=TEXT is a link to its results), a POST form for a photo, heat maps in closed <details> whose
lazily loaded pictures (/heatmap.png) are computed only when opened. Data text goes through
report.esc; the one URL made from data (a heat map's) holds the query percent-encoded.
"""
import base64
import functools
import io
import os
import sys
from types import SimpleNamespace
from urllib.parse import quote

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

import report
import server
from server import K_MAX, PAGE_K, ApiError, Worker, check_image, check_query, image_file
from vocab import query_tokens

CACHED = 256  # attentions and thumbnails kept for the heat maps and /thumbs (the last used)
UPLOAD_DOC = {'requestBody': {'required': True, 'content': {'multipart/form-data': {'schema': {
    'type': 'object', 'required': ['image'], 'properties': {'image': {'type': 'string', 'format': 'binary'}}}}}}}


def create_app(searcher, worker, image_dir: str = None, max_upload_mb: float = 10, photos=None,
               info: dict = None) -> FastAPI:
    """The app: JSON API, pictures, page. photos: a features.py extractor for uploads (photo.py),
    or None; info: more of what /api/health reports."""
    R = searcher.dataset.images.shape[1]
    boxes = report.read_boxes(searcher.dataset, R)
    names = searcher.page_names(image_dir)
    ctx = SimpleNamespace(searcher=searcher, worker=worker, image_dir=image_dir, photos=photos, names=names,
                          name_set=None if names is None else frozenset(names),  # /images/NAME: one look-up
                          max_bytes=int(max_upload_mb * 2 ** 20), max_upload_mb=max_upload_mb, info=info or {},
                          boxes=functools.partial(report.region_boxes, boxes, R),
                          attention=functools.lru_cache(CACHED)(searcher.attention))  # called on the worker only
    ctx.thumbnail = functools.lru_cache(CACHED)(functools.partial(thumbnail, ctx))  # each file decoded once
    app = FastAPI(title='CASC search', description=__doc__, version='1')
    _errors(app)
    _api(app, ctx)
    _pictures(app, ctx)
    _page(app, ctx)
    return app


def _errors(app: FastAPI):
    """Every error as {"error": "one line naming the parameter"}."""
    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse({'error': str(e)}, e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        where = ', '.join(str(p) for p in first['loc'] if p not in ('query', 'body', 'path'))
        return JSONResponse({'error': f'{where}: {first["msg"]}'}, 400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse({'error': f'{request.url.path}: {e.detail}'}, e.status_code)

    @app.exception_handler(Exception)
    async def failed(request, e: Exception):
        return JSONResponse({'error': f'server error: {" ".join(str(e).split())}'}, 500)


def _api(app: FastAPI, ctx):
    K = Query(10, ge=1, le=K_MAX, description='results wanted')

    @app.get('/api/search', summary='a text query (q) or a query image of the split (image)')
    def api_search(q: str = None, image: str = None, k: int = K) -> dict:
        return search_json(ctx, q, image, k)

    @app.post('/api/search', summary='an uploaded photo (multipart field image)', openapi_extra=UPLOAD_DOC)
    async def api_upload(request: Request, k: int = K) -> dict:
        data = await read_upload(request, ctx)
        return await run_in_threadpool(photo_json, ctx, data, k)

    @app.get('/api/attention', summary='where each word of q looks in the image')
    def api_attention(q: str, image: str) -> dict:
        i, q = check_image(ctx.searcher, image), check_query(q)
        words, attn = ctx.worker.call(ctx.attention, q, i)
        return {'query': q, 'image': i, **ctx.searcher.name_entry(i), 'words': words, 'attention': attn.tolist(),
                'boxes': ctx.boxes(i).tolist()}

    @app.get('/api/health', summary='model, split, gallery size, device')
    def api_health() -> dict:
        s, ds = ctx.searcher, ctx.searcher.dataset
        return {**ctx.info, 'split': ds.split, 'images': ds.n_images, 'captions': len(ds.raw_captions),
                'device': str(s.device), 'precision': s.score_args['precision'],
                'uploads': ctx.photos is not None and ctx.photos.why_not is None}


def search_json(ctx, q, image, k: int) -> dict:
    """The result of one text query or query image, as search.py --json prints it."""
    if (q is None) == (image is None):
        raise ApiError(400, 'q, image: give exactly one of them')
    if q is not None:
        return ctx.worker.text(check_query(q), k)
    return ctx.worker.call(ctx.searcher.image, [check_image(ctx.searcher, image)], k)[0]


async def read_upload(request: Request, ctx) -> bytes:
    """The bytes of the multipart field `image`, refused (naming it) when too large, missing or empty.
    The size is checked from Content-Length before anything is read."""
    if ctx.photos is None or ctx.photos.why_not:
        raise ApiError(400, f'image: uploads are off: {ctx.photos.why_not if ctx.photos else "no extractor"}')
    limit = f'over the limit of {ctx.max_upload_mb:g} MB (--max_upload_mb)'
    length = request.headers.get('content-length', '')
    if not length.isdigit():
        raise ApiError(411, 'image: the upload needs a Content-Length header')
    if int(length) > ctx.max_bytes + 65536:  # room for the multipart framing
        raise ApiError(413, f'image: the upload is {int(length) / 2 ** 20:.1f} MB, {limit}')
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception:
        raise ApiError(400, 'image: expected a multipart/form-data upload with a file field named image') from None
    upload = form.get('image')
    if upload is None or isinstance(upload, str):
        raise ApiError(400, 'image: no file in the upload (a multipart file field named image)')
    data = await upload.read(ctx.max_bytes + 1)
    if len(data) > ctx.max_bytes:
        raise ApiError(413, f'image: the file is over {ctx.max_bytes} bytes, {limit}')
    if not data:
        raise ApiError(400, 'image: the uploaded file is empty')
    return data


def photo_json(ctx, data: bytes, k: int) -> dict:
    """An uploaded photo -> the split's top k captions for it; ApiError naming image when it is
    not a picture, or too many pixels."""
    try:
        features = ctx.worker.call(ctx.photos.features, data)  # (1, R, img_dim)
    except ValueError as e:
        raise ApiError(400, f'image: {e}') from None
    return ctx.worker.call(ctx.searcher.photo, features, k)


# ---------------------------------------------------------------------------------------------
# Pictures: the split's images (named ones only), thumbnails, heat maps.

def _pictures(app: FastAPI, ctx):
    @app.get('/images/{name:path}', include_in_schema=False)
    def image(name: str):
        path = image_file(ctx.image_dir, ctx.name_set, name)
        if path is None:
            raise ApiError(404, f'/images/{name}: not found')
        return FileResponse(path)

    @app.get('/thumbs/{i}.jpg', include_in_schema=False)
    def thumb(i: int):
        picture = ctx.thumbnail(i)  # shared by the threads: a copy is encoded (PIL's save sets attributes on it)
        if picture is None:
            raise ApiError(404, f'/thumbs/{i}.jpg: not found')
        return Response(encode_picture(picture.copy(), 'JPEG'), media_type='image/jpeg')

    @app.get('/heatmap.png', include_in_schema=False)
    def heatmap(q: str, image: str, word: int = Query(ge=1)):
        i, q = check_image(ctx.searcher, image), check_query(q)
        words, attn = ctx.worker.call(ctx.attention, q, i)
        if word > len(words):
            raise ApiError(400, f'word: {word}, the query has {len(words)} words')
        picture = report.heat_map(ctx.thumbnail(i), attn[word - 1].double().numpy(), ctx.boxes(i))
        return Response(encode_picture(picture, 'PNG'), media_type='image/png')


def thumbnail(ctx, i: int):
    """Image i's thumbnail (report.load_thumbnail), or None without --image_dir, names or a readable file.
    The routes call it through ctx.thumbnail: the last CACHED kept (the split's files taken as fixed)."""
    if ctx.names is None or not 0 <= i < len(ctx.names):
        return None
    path = image_file(ctx.image_dir, ctx.name_set, ctx.names[i])
    return None if path is None else report.load_thumbnail(path)


def encode_picture(picture, kind: str) -> bytes:
    out = io.BytesIO()
    picture.save(out, kind, **({'quality': 90} if kind == 'JPEG' else {}))
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# The page: search box, upload, results (report.py's sections), heat maps on demand.

class Thumbs:
    """report.py's `pics` for the page: thumbnails served by /thumbs/N.jpg, or the index on a grey box."""

    def __init__(self, ctx):
        self.ctx = ctx

    def image(self, i: int) -> str:
        i = int(i)
        if self.ctx.names is None:
            return f'<div class="noimg">image {i}</div>'
        return report.thumb_html(f'/thumbs/{i}.jpg', i)


def forms_html(q: str = '') -> str:
    """The search box (GET /?q=...) and the upload control (POST /)."""
    return (f'<form class="search" action="/" method="get"><input type="search" name="q" value="{report.esc(q)}" '
            f'placeholder="a dog catches a frisbee" required autofocus> <button type="submit">Search</button></form>\n'
            '<form class="upload" action="/" method="post" enctype="multipart/form-data">'
            '<input type="file" name="image" accept="image/*" required> '
            '<button type="submit">Captions for a photo</button></form>')


def attention_html(ctx, q: str, i: int) -> str:
    """Closed <details> with one lazily loaded heat map per query word: drawn when opened."""
    known = ctx.searcher.vocab.word2idx
    src = f'/heatmap.png?q={quote(q, safe="")}&image={int(i)}&word='  # percent-encoded: no quote or < survives
    figures = ''.join(report.figure_html(f'{src}{w}', w, word, word not in known, lazy=True)
                      for w, word in enumerate(query_tokens(q, 'q'), 1))
    return (f'<details class="attention"><summary>Where each word looks</summary>'
            f'<div class="heatmaps">{figures}</div></details>')


def text_section(ctx, res: dict) -> str:
    """A text query's results: thumbnails, scores, captions, predicted labels, heat maps on demand."""
    s, rows = ctx.searcher, res['results']
    probs = (None if s.model.head is None else  # (n, K): one model call, the query encoded once
             ctx.worker.call(s.predicted_labels, res['query'], [r['index'] for r in rows]))
    extras = {}
    for n, r in enumerate(rows):
        labels = '' if probs is None else report.labels_html(probs[n], s.labels)
        extras[r['rank']] = labels + attention_html(ctx, res['query'], r['index'])
    return report.text_query_html(Thumbs(ctx), res, s.dataset.image_captions, 'Query', extras)


def photo_section(res: dict, data: bytes) -> str:
    """An uploaded photo's captions, the photo shown inline (a data: URL: nothing is kept)."""
    small = encode_picture(report.load_thumbnail(io.BytesIO(data)), 'JPEG')
    picture = report.thumb_html('data:image/jpeg;base64,' + base64.b64encode(small).decode(), 0, 'your photo')
    return report.image_query_html(None, res, title='Your photo', picture=picture)


def render(ctx, q: str, sections, status: int = 200) -> HTMLResponse:
    return HTMLResponse(report.document(ctx.searcher.title, [forms_html(q), *sections], report.SERVER_CSP), status)


def _page(app: FastAPI, ctx):
    @app.get('/', response_class=HTMLResponse, include_in_schema=False)
    def page(q: str = None, image: str = None):
        try:
            if q is not None:
                return render(ctx, q, [text_section(ctx, search_json(ctx, q, None, PAGE_K))])
            if image is not None:
                res = search_json(ctx, None, image, PAGE_K)
                return render(ctx, '', [report.image_query_html(Thumbs(ctx), res)])
            return render(ctx, '', [])
        except ApiError as e:
            return render(ctx, q or '', [f'<p class="error">{report.esc(e)}</p>'], e.status)

    @app.post('/', response_class=HTMLResponse, include_in_schema=False)
    async def upload_page(request: Request):
        try:
            data = await read_upload(request, ctx)
            res = await run_in_threadpool(photo_json, ctx, data, PAGE_K)
            return render(ctx, '', [await run_in_threadpool(photo_section, res, data)])
        except ApiError as e:
            return render(ctx, '', [f'<p class="error">{report.esc(e)}</p>'], e.status)


# ---------------------------------------------------------------------------------------------
# Serving: search.py --serve.

def serve(searcher, host: str = '127.0.0.1', port: int = 8000, image_dir: str = None, max_upload_mb: float = 10,
          photos=None, info: dict = None, log=None):
    """Open the gallery (building its index once), listen, print the URL, serve until Ctrl-C or
    SIGTERM, then print one line."""
    import uvicorn

    searcher.gallery_images(), searcher.gallery_captions()  # built (or mapped) before the URL is printed
    app = create_app(searcher, Worker(searcher), image_dir, max_upload_mb, photos, info)
    sock = server.listen(host, port)
    if not server.is_loopback(host):
        print(f'warning: --host {host}: the server has no authentication: anyone who can reach this address can '
              f'query the model and read the images under --image_dir', file=log or sys.stderr, flush=True)
    where = sock.getsockname()
    url_host = f'[{where[0]}]' if ':' in where[0] else where[0]
    http = uvicorn.Server(uvicorn.Config(app, log_level='warning', access_log=False, lifespan='off'))
    ds = searcher.dataset
    print(f'serving the {ds.split} split ({ds.n_images} images, {len(ds.raw_captions)} captions) at '
          f'http://{url_host}:{where[1]}/ (Ctrl-C stops it)', flush=True)
    try:
        http.run(sockets=[sock])  # Ctrl-C: uvicorn finishes the requests under way, then raises it again
    except KeyboardInterrupt:
        pass
    print('server stopped', file=log or sys.stderr, flush=True)


def main(searcher, args):
    """search.py --serve: uploads through features.py's extractor when the gallery's record allows."""
    import photo
    photos = photo.Photos(searcher.dataset.ims_path, searcher.dataset.split, searcher.device)
    info = {'model': os.path.abspath(args.model_path), 'index': searcher.gallery and searcher.gallery.index_dir,
            'uploads_off': photos.why_not}
    serve(searcher, args.host, args.port, args.image_dir, args.max_upload_mb, photos, info)
