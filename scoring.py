"""All-pairs scoring in bounded memory: the chunk planner, the one loop that walks caption batches
and image chunks (score_chunks), and what it serves: evaluation's full score matrix (compute_sims),
search's streamed top k each way (top_images, top_captions; the server goes through search.Searcher),
the stable top k they keep (merge_topk), and the refusal of NaN or inf scores (check_scores).
"""
import torch
from torch import Tensor

import fused
import index
import parallel
import util
from encode import images_slice
from engine import Side
from model import CASC, Config

BYTES_PER_CELL = 4 * 12  # float32 (pair, region, word) tensors alive at once in cross_attention
CACHE_CELLS = 1 << 20  # (pair, region, word) cells per chunk: 4 MB tensors stay in cache, ~1.5x faster
# With the fused kernel only the product is full size (16 MB): more images per chunk re-pack the
# caption batch for the product less often (~15% faster than 1 << 20 at 200 x 640 on the 2-core VM).
FUSED_CELLS = 1 << 22
# Work items of one all-pairs pass, at least: N processes share them to within 1/MIN_ITEMS of the pairs
# each whatever the memory budget (a 1,000 x 5,000 pass has 40 caption batches: its chunks are unchanged).
MIN_ITEMS = 32


def plan_chunks(n_img: int, n_cap: int, R: int, L: int, cfg: Config, device, memory_gb: float,
                min_chunks: int = 1, image_bytes: int = 0) -> list:
    """Image ranges [(i0, i1), ...] covering 0..n_img, for scoring n_img images of R regions against
    one batch of n_cap captions padded to L words: a chunk's transient tensors (BYTES_PER_CELL per
    (pair, region, word) cell, plus the label head's per-pair vectors) take at most memory_gb; on
    the CPU a chunk also holds at most cache_cells(cfg) cells; at least min_chunks chunks (when there
    are as many images), at least one image per chunk. The one planner of all-pairs scoring:
    evaluation, validation in training (plan_work), and search.py. image_bytes: one image's own
    tensors when they are read chunk by chunk (a gallery index, index.row_bytes), else 0 (resident)."""
    per_image = n_cap * (R * L * BYTES_PER_CELL + 16 * (cfg.num_labels + cfg.label_hidden)) + image_bytes
    step = int(memory_gb * 2 ** 30 // per_image)
    if torch.device(device).type == 'cpu':
        step = min(step, cache_cells(cfg) // (n_cap * R * L))
    step = max(1, min(step, -(-n_img // min_chunks)))
    return [(i0, min(i0 + step, n_img)) for i0 in range(0, n_img, step)]


def cache_cells(cfg: Config) -> int:
    """(pair, region, word) cells of one CPU chunk: FUSED_CELLS where the fused kernel scores, else CACHE_CELLS."""
    return FUSED_CELLS if fused.library() is not None and cfg.raw_feature_norm in fused.NORMS else CACHE_CELLS


def plan_work(n_img: int, R: int, caps: list, cfg: Config, device, memory_gb: float, image_bytes: int = 0) -> list:
    """One all-pairs pass of n_img images of R regions against caption batches [(caption indices,
    Side)] -> its work items [(caption batch, i0, i1)]: plan_chunks's chunks of each batch, at
    least MIN_ITEMS items in all. The same whatever the number of processes, which share the items
    out (parallel.deal): each score is computed in the same chunk, so the matrix is bit-identical."""
    per_batch = -(-MIN_ITEMS // len(caps))  # chunks per caption batch, at least
    return [(b, i0, i1) for b, (idx, cap) in enumerate(caps)
            for i0, i1 in plan_chunks(n_img, len(idx), R, cap.mask.shape[1], cfg, device, memory_gb, per_batch,
                                          image_bytes)]


def score_chunks(model: CASC, img: Side, caps, memory_gb: float, alpha=None, precision: str = 'fp32', *,
                 shared: bool = False, bar: dict = None):
    """The one chunked scoring loop. Encoded images (n_img, R, d) (resident, or a gallery index's
    mapped Side) and caption batches [(caption indices (n_c,), Side)] (a list, or an index's
    CaptionBatches, mapped batch by batch) -> yields (caption indices, i0, i1, sims (i1 - i0, n_c)),
    batch by batch, each batch's chunks in image order (its last one ends at n_img). shared: one
    evaluation pass (plan_work's items, at least MIN_ITEMS) of which this process scores its share
    (parallel.deal); else every chunk of plan_chunks. bar: util.progress's settings, counting pairs."""
    n_img, R, _ = img.emb.shape
    image_bytes = index.row_bytes(img)  # a mapped gallery's chunk counts its own tensors
    if shared:
        work = plan_work(n_img, R, caps, model.cfg, img.emb.device, memory_gb, image_bytes)
        pairs = [(i1 - i0) * len(caps[b][0]) for b, i0, i1 in work]  # (items,)
        mine = parallel.deal(pairs)
        total, chunks_of = sum(pairs[k] for k in mine), {}
        for b, i0, i1 in (work[k] for k in mine):
            chunks_of.setdefault(b, []).append((i0, i1))
    else:
        total, chunks_of = n_img * sum(len(idx) for idx, _ in caps), None
    bar = util.progress(total=total, unit='pair', unit_scale=True, **(bar or {'enabled': False}))
    for b, (idx, cap) in enumerate(caps):
        chunks = (chunks_of.get(b, []) if shared else
                  plan_chunks(n_img, len(idx), R, cap.mask.shape[1], model.cfg, img.emb.device, memory_gb, 1, image_bytes))
        for i0, i1 in chunks:
            sims = model.scores(images_slice(img, i0, i1), cap, alpha=alpha, precision=precision).sims
            bar.update(sims.numel())
            yield idx, i0, i1, sims  # (i1 - i0, n_c)
    bar.close()


@torch.inference_mode()
def compute_sims(model: CASC, img: Side, caps: list, memory_gb: float = 2.0, alpha=None,
                 precision: str = 'fp32', progress: bool = True, log=None) -> Tensor:
    """Score matrix (n_img, n_cap) float32 on the CPU, chunked so that the transient tensors of
    one chunk take at most `memory_gb` whatever the split size (on the CPU, chunks are also kept
    small enough for their (pair, region, word) tensors to stay in cache). Under torchrun each
    process scores about 1/N of the pairs (plan_work) and rank 0 gets the whole matrix (the
    others a part)."""
    n_img, n_cap = img.emb.shape[0], sum(len(idx) for idx, _ in caps)
    sims = torch.zeros(n_img, n_cap) if parallel.world() > 1 else torch.empty(n_img, n_cap)
    for idx, i0, i1, chunk in score_chunks(model, img, caps, memory_gb, alpha, precision, shared=True,
                                           bar=dict(desc='similarity', log=log, enabled=progress)):
        sims[i0:i1, idx] = chunk.float().cpu()
    return parallel.sum_to_main(sims, img.emb.device)


def non_finite(sims: Tensor) -> str:
    """'' when every score is finite, else how many are not."""
    n_bad = int((~torch.isfinite(sims)).sum())
    return f'{n_bad} of {sims.numel()} scores are NaN or inf' if n_bad else ''


def check_scores(sims: Tensor, model: CASC, model_path: str, ims_path: str, rows=None):
    """sims (n_img, n_cap) of the images `rows` (n_img,) of the features file ims_path (default
    0..n_img-1) -> ValueError, one line, when a score is NaN or inf (ranked, a NaN would count as a
    hit: every comparison with it is false), naming the checkpoint when one of its weights is not
    finite, else the features file and its first image with such a score."""
    bad = non_finite(sims)
    if not bad:
        return
    weights = [name for name, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
    if weights:
        more = f' (and {len(weights) - 1} more)' if len(weights) > 1 else ''
        raise ValueError(f'{model_path}: weight {weights[0]}{more} holds NaN or inf, so {bad}: refusing to rank them')
    i = int(torch.isfinite(sims).all(1).logical_not().nonzero()[0])
    raise ValueError(f'{ims_path}: image {i if rows is None else int(rows[i])} gives NaN or inf scores with '
                     f'{model_path}, whose weights are finite (features too large?); {bad}: refusing to rank them')


# ---------------------------------------------------------------------------------------------
# Top k over a gallery, streamed chunk by chunk.

def merge_topk(best, scores: Tensor, index: Tensor, k: int) -> tuple:
    """The running top k, (values (n_q, k'), indices (n_q, k')) or None, merged with a chunk's
    scores (n_q, n) of the gallery items `index` (n,) -> the top min(k, k' + n) of both: highest
    first, equal scores to the lower index. A stable sort of the candidates in index order, not
    torch.topk, which may keep a higher index among equal scores at its cut. Scores must be finite
    (top_images and top_captions check them): a sort puts NaN first."""
    index = index.expand_as(scores)
    if best is not None:
        scores, index = torch.cat([best[0], scores], 1), torch.cat([best[1], index], 1)  # (n_q, k' + n)
    by_index = index.argsort(dim=1)
    scores, index = scores.gather(1, by_index), index.gather(1, by_index)
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]  # ties keep index order
    return scores.gather(1, order), index.gather(1, order)


def top_k(scores: Tensor, k: int) -> list:
    """Indices of the k highest of scores (n,), equal scores to the lower index (merge_topk)."""
    return merge_topk(None, scores[None], torch.arange(len(scores)), k)[1][0].tolist()


@torch.inference_mode()
def top_images(model: CASC, img: Side, queries: list, k: int, alpha=None, precision: str = 'fp32',
               memory_gb: float = 2.0, progress: bool = False, model_path: str = 'the model',
               ims_path: str = 'the features') -> tuple:
    """Encoded images (n_img, R, d) and text queries [(query indices, Side)] (encode_captions) ->
    scores, image indices (n_q, min(k, n_img)) on the CPU. A NaN or inf score is refused, naming
    model_path or ims_path (check_scores), not ranked."""
    n_img = img.emb.shape[0]
    n_q = sum(len(idx) for idx, _ in queries)
    values, indices = torch.empty(n_q, min(k, n_img)), torch.empty(n_q, min(k, n_img), dtype=torch.long)
    best = None
    for idx, i0, i1, sims in score_chunks(model, img, queries, memory_gb, alpha, precision,
                                          bar=dict(desc='searching', enabled=progress, leave=False)):
        check_scores(sims, model, model_path, ims_path, range(i0, i1))  # (i1 - i0, n_c)
        best = merge_topk(None if i0 == 0 else best, sims.float().T, torch.arange(i0, i1, device=sims.device), k)
        if i1 == n_img:  # the batch's last chunk
            values[idx], indices[idx] = best[0].cpu(), best[1].cpu()  # (n_c, k)
    return values, indices


@torch.inference_mode()
def top_captions(model: CASC, img: Side, caps: list, k: int, alpha=None, precision: str = 'fp32',
                 memory_gb: float = 2.0, progress: bool = False, model_path: str = 'the model',
                 ims_path: str = 'the features', rows=None) -> tuple:
    """Encoded query images (n_q, R, d), images `rows` (n_q,) of ims_path, and the gallery's
    captions [(caption indices, Side)] (encode_captions) -> scores, caption indices (n_q, min(k,
    n_cap)) on the CPU. A NaN or inf score is refused as in top_images."""
    n_q = img.emb.shape[0]
    best, parts = None, []
    for idx, i0, i1, sims in score_chunks(model, img, caps, memory_gb, alpha, precision,
                                          bar=dict(desc='searching', enabled=progress, leave=False)):
        parts.append(sims)
        if i1 < n_q:
            continue
        sims, parts = torch.cat(parts), []  # (n_q, n_c): the batch against every query
        check_scores(sims, model, model_path, ims_path, rows)
        best = merge_topk(best, sims.float(), idx.to(sims.device), k)  # (n_q, k)
    return best[0].cpu(), best[1].cpu()
