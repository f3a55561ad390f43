// CASC's cross attention of every (image, caption) pair after the region-word product, fused:
// one pass over each pair's R x n block of the product, everything else in L1 (fused.py builds
// and calls this; engine.cross_attention is the eager twin it is tested against). Plain C ABI,
// no torch headers: it compiles in a few seconds of CPU. float32; vectors of 8 lanes via GCC vector
// extensions (AVX2 registers with -march=native, plain scalar code elsewhere).
//
// Per pair (image i: regions r < R; caption j: words l < n = lens[j], a prefix of its L slots):
//   x = clipped ? LeakyReLU(s, 0.1) : s                       s = v_r . w_l
//   t2i (words query regions): y_rl = x_rl * lam_t2i / (||x_r.|| + eps), a_.l = softmax_r(y_.l)
//       rel_l = (sum_r a_rl s_rl) / max(||w_l|| sqrt(a_.l^T G_img a_.l), eps);  w_img_r = mean_l a_rl
//   i2t (regions query words): z_rl = x_rl * lam_i2t / (||x_.l|| + eps), b_r. = softmax_l(z_r.)
//       rel_r = (sum_l b_rl s_rl) / max(||v_r|| sqrt(b_r.^T G_cap b_r.), eps); w_txt_l = mean_r b_rl
//   then rel is pooled over the queries (Mean, Max, Sum, LogSumExp), and with the label head's
//   projections P = X W1^T of both sides: h_img = w_img^T P_img, h_txt = w_txt^T P_cap, or with its
//   first bias b1 the hidden layers tanh(h + b1) themselves (the pooled contexts never exist).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
constexpr int W = 8;  // lanes
constexpr float EPS = 1e-8f;
enum { NORM_NONE = 0, NORM_L2 = 1, NORM_L1 = 2 };
enum { AGG_MEAN = 0, AGG_MAX = 1, AGG_SUM = 2, AGG_LSE = 3 };

static inline vf splat(float x) { return vf{} + x; }
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }
static inline vf vmin(vf a, vf b) { return a < b ? a : b; }
static inline vf vload(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
static inline float hsum(vf v) { float t = 0; for (int k = 0; k < W; ++k) t += v[k]; return t; }
static inline vf vsqrt_pos(vf q) {  // sqrt where q > 0, else 0 (model.safe_sqrt)
    q = vmax(q, splat(0)); vf r; for (int k = 0; k < W; ++k) r[k] = __builtin_sqrtf(q[k]); return r;
}

// exp for x <= 0 (softmax after subtracting the max), Cephes' expf polynomial: ~1 ulp.
static inline vf vexp(vf x) {
    x = vmax(x, splat(-87.0f));
    vf fx = x * 1.44269504088896341f + 0.5f;
    vf fl = __builtin_convertvector(__builtin_convertvector(fx, vi), vf);
    fl = fl > fx ? fl - 1.0f : fl;  // floor
    x = x - fl * 0.693359375f + fl * 2.12194440e-4f;
    vf y = ((((1.9875691500e-4f * x + 1.3981999507e-3f) * x + 8.3334519073e-3f) * x + 4.1665795894e-2f) * x
             + 1.6666665459e-1f) * x + 5.0000001201e-1f;
    y = y * x * x + x + 1.0f;
    vi bits = (__builtin_convertvector(fl, vi) + 127) << 23;  // 2^floor
    vf scale; std::memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

// tanh, Cephes' tanhf: a polynomial below 0.625, else 1 - 2 / (exp(2|x|) + 1); ~1 ulp.
static inline vf vtanh(vf x) {
    vf ax = vmax(x, -x), z = x * x;
    vf small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z + 1.33314422036e-1f) * z
                - 3.33332819422e-1f) * z * x + x;
    vf e = vexp(vmax(-2.0f * ax, splat(-87.0f)));  // exp(-2|x|) <= 1
    vf big = (1.0f - e) / (1.0f + e);
    big = x < 0 ? -big : big;
    return ax < 0.625f ? small : big;
}

// sigmoid from exp(-|x|) <= 1: no overflow, full relative accuracy on both tails.
static inline vf vsigmoid(vf x) {
    vf e = vexp(vmin(x, -x)), inv = 1.0f / (1.0f + e);
    return x >= 0 ? inv : e * inv;
}

// Pool the relevances rel[q < valid] (lanes up to a multiple of W readable) over the queries.
static float pool(const float* rel, int valid, int agg, float lambda_lse) {
    float m = -INFINITY, t = 0;
    if (agg == AGG_MEAN || agg == AGG_SUM) {
        for (int q = 0; q < valid; ++q) t += rel[q];
        return agg == AGG_MEAN ? t / valid : t;
    }
    for (int q = 0; q < valid; ++q) m = std::max(m, rel[q]);
    if (agg == AGG_MAX) return m;
    vf sum = splat(0);  // LogSumExp: log(sum exp(lse (rel - m))) / lse + m, the exps 8 at a time
    for (int q = 0; q < valid; q += W) {
        vf e = vexp(lambda_lse * (vload(rel + q) - m));
        sum += (vi{0, 1, 2, 3, 4, 5, 6, 7} + q < valid) ? e : splat(0);
    }
    return m + std::log(hsum(sum)) / lambda_lse;
}

struct Args {
    const float* s; int64_t ld; int n_img, R, n_cap, L; const int32_t* lens;
    const float *img_norm, *img_gram, *cap_norm, *cap_gram;
    int norm, clipped; float lam_t2i, lam_i2t; int agg_t2i, agg_i2t; float lambda_lse;
    const float *img_proj, *cap_proj, *b1; int H;  // the label head's first layer (or null): (n_img, R, H), (n_cap, L, H), (H)
    float *s_t2i, *s_i2t, *h_img, *h_txt;  // (n_img, n_cap) each; (n_img, n_cap, H) each, or null
};

static inline vf clip(vf x, int clipped) { return clipped ? (x > 0 ? x : 0.1f * x) : x; }
static inline vf norm_term(vf x, int norm) { return norm == NORM_L1 ? (x > 0 ? x : -x) : x * x; }
static inline float scale_of(float acc, int norm, float lam) {  // lam / (||x|| + eps)
    if (norm == NORM_NONE) return lam;
    return lam / ((norm == NORM_L2 ? (acc > 0 ? std::sqrt(acc) : 0.0f) : acc) + EPS);
}

struct Buffers {  // one thread's scratch: A (R x LP) word lanes, AT (n x RP) region lanes, etc.
    std::vector<float> A, AT, rel, cnorm, cscale, rscale, inorm, w;  // w: a pair's pooled attention
    std::vector<vf> P, Q, D;  // attention (R x NB or n x RB vectors), quad forms, dots (C++17 new: aligned)
    int R = -1, L = -1;
    Buffers(int R_, int L_) { fit(R_, L_); }
    void fit(int R_, int L_) {
        if (R_ <= R && L_ <= L) return;
        R = std::max(R, R_), L = std::max(L, L_);
        int LP = (L + W - 1) / W * W, RP = (R + W - 1) / W * W;
        A.resize(RP * LP); P.resize(std::max(RP * LP, LP * RP) / W); Q.resize(LP + RP); D.resize(LP + RP);
        AT.resize(LP * RP); rel.resize(LP + RP);
        cnorm.resize(LP); cscale.resize(LP); rscale.resize(RP); inorm.resize(RP, 1.0f); w.resize(LP + RP);
    }
};

// 8 x 8 transpose: dst[k][m] = src[m][k] (row strides ss, ds floats).
static inline void transpose8(const float* src, int ss, float* dst, int ds) {
    vf r[8], t[8], u[8];
    for (int k = 0; k < 8; ++k) r[k] = vload(src + k * ss);
    for (int k = 0; k < 8; k += 2) {
        t[k] = __builtin_shufflevector(r[k], r[k + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[k + 1] = __builtin_shufflevector(r[k], r[k + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int k = 0; k < 8; k += 4)
        for (int h = 0; h < 2; ++h) {
            u[k + 2 * h] = __builtin_shufflevector(t[k + h], t[k + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            u[k + 2 * h + 1] = __builtin_shufflevector(t[k + h], t[k + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    for (int k = 0; k < 4; ++k) {
        vstore(dst + k * ds, __builtin_shufflevector(u[k], u[k + 4], 0, 1, 2, 3, 8, 9, 10, 11));
        vstore(dst + (k + 4) * ds, __builtin_shufflevector(u[k], u[k + 4], 4, 5, 6, 7, 12, 13, 14, 15));
    }
}

static inline vf vscale(vf acc, int norm, float lam) {  // lam / (||x|| + eps)
    if (norm == NORM_NONE) return splat(lam);
    return lam / ((norm == NORM_L2 ? vsqrt_pos(acc) : acc) + EPS);
}

// The pair's block of the product into A (RP x LP, word lanes, zero past R and n) and its
// transpose AT (LP x RP, region lanes); the raw-norm scales of both directions; the word norms.
static void load_pair(const Args& a, int i, int j, int n, Buffers& b) {
    const int R = a.R, LP = (n + W - 1) / W * W, RP = (R + W - 1) / W * W;
    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7};
    const bool whole = int64_t(j) * a.L + LP <= a.ld;  // vector loads stay inside the row
    float tmp[W] = {0};
    for (int r = 0; r < R; ++r) {
        const float* row = a.s + (int64_t(i) * R + r) * a.ld + int64_t(j) * a.L;
        for (int l0 = 0; l0 < LP; l0 += W) {
            if (!whole) for (int k = 0; k < W; ++k) tmp[k] = l0 + k < n ? row[l0 + k] : 0.0f;
            vf v = whole ? vload(row + l0) : vload(tmp);
            vstore(&b.A[r * LP + l0], (lane + l0 < n) ? v : splat(0));
        }
    }
    std::fill(&b.A[R * LP], &b.A[RP * LP], 0.0f);
    for (int r0 = 0; r0 < RP; r0 += W)
        for (int l0 = 0; l0 < LP; l0 += W) transpose8(&b.A[r0 * LP + l0], LP, &b.AT[l0 * RP + r0], RP);
    for (int r0 = 0; r0 < RP; r0 += W) {  // t2i normalizes along the words
        vf acc = splat(0);
        for (int l = 0; l < n; ++l) acc += norm_term(clip(vload(&b.AT[l * RP + r0]), a.clipped), a.norm);
        vstore(&b.rscale[r0], vscale(acc, a.norm, a.lam_t2i));
    }
    for (int l0 = 0; l0 < LP; l0 += W) {  // i2t normalizes along the regions
        vf acc = splat(0);
        for (int r = 0; r < R; ++r) acc += norm_term(clip(vload(&b.A[r * LP + l0]), a.clipped), a.norm);
        vstore(&b.cscale[l0], vscale(acc, a.norm, a.lam_i2t));
    }
    for (int l = 0; l < LP; ++l) b.cnorm[l] = l < n ? a.cap_norm[int64_t(j) * a.L + l] : 1.0f;
}

// quad[k] = sum_{p,q < n} P[p][k] G_pq P[q][k] for NB lane blocks k at once (P[q * S + k]; G
// symmetric, row stride ld: its upper triangle, each entry broadcast once for all blocks). Few
// blocks get two partial sums each, so that consecutive FMAs do not wait on each other.
template <int NB> static inline void quad_blocks(const float* G, int ld, const vf* P, int S, int n, vf* quad) {
    constexpr bool two = NB < 4;
    vf acc[NB], t0[NB], t1[NB];
    for (int k = 0; k < NB; ++k) acc[k] = splat(0);
    for (int p = 0; p < n; ++p) {
        const float* g = G + p * ld;
        for (int k = 0; k < NB; ++k) { t0[k] = (0.5f * g[p]) * P[p * S + k]; t1[k] = splat(0); }
        int q = p + 1;
        if (two)
            for (; q + 1 < n; q += 2) {
                const float g0 = g[q], g1 = g[q + 1];
                for (int k = 0; k < NB; ++k) { t0[k] += g0 * P[q * S + k]; t1[k] += g1 * P[(q + 1) * S + k]; }
            }
        for (; q < n; ++q) {
            const float g0 = g[q];
            for (int k = 0; k < NB; ++k) t0[k] += g0 * P[q * S + k];
        }
        for (int k = 0; k < NB; ++k) acc[k] += P[p * S + k] * (t0[k] + t1[k]);
    }
    for (int k = 0; k < NB; ++k) quad[k] = 2.0f * acc[k];
}

static void quad_form(const float* G, int ld, const vf* P, int S, int n, vf* quad) {  // all S blocks
    for (int k = 0; k < S;) {
        switch (std::min(S - k, 5)) {
            case 1: quad_blocks<1>(G, ld, P + k, S, n, quad + k); k += 1; break;
            case 2: quad_blocks<2>(G, ld, P + k, S, n, quad + k); k += 2; break;
            case 3: quad_blocks<3>(G, ld, P + k, S, n, quad + k); k += 3; break;
            case 4: quad_blocks<4>(G, ld, P + k, S, n, quad + k); k += 4; break;
            default: quad_blocks<5>(G, ld, P + k, S, n, quad + k); k += 5;
        }
    }
}

// Softmax of lanes X[q * S] over q < n (already scaled), into P[q * S]; -> the sums' inverses.
static inline vf softmax_lanes(vf* P, int S, int n) {
    vf mx = splat(-INFINITY), sum = splat(0);
    for (int q = 0; q < n; ++q) mx = vmax(mx, P[q * S]);
    for (int q = 0; q < n; ++q) { P[q * S] = vexp(P[q * S] - mx); sum += P[q * S]; }
    return 1.0f / sum;
}

// out[h] = sum_q w[q] proj[q][h] for h < H (proj rows of H floats): a pair's pooled attention through
// the label head's first layer, W1 u; with b1, the hidden layer tanh(W1 u + b1) itself. 8 vectors of
// the output at a time, so that 8 independent FMA chains hide each one's latency.
template <int NV> static inline void project_block(const float* proj, const float* w, int count, int H,
                                                   const float* b1, float* out) {
    vf acc[NV];
    for (int k = 0; k < NV; ++k) acc[k] = splat(0);
    for (int q = 0; q < count; ++q) {
        const vf wq = splat(w[q]);
        for (int k = 0; k < NV; ++k) acc[k] += wq * vload(proj + int64_t(q) * H + k * W);
    }
    for (int k = 0; k < NV; ++k) vstore(out + k * W, b1 ? vtanh(acc[k] + vload(b1 + k * W)) : acc[k]);
}

static void project(const float* proj, const float* w, int count, int H, const float* b1, float* out) {
    int h = 0;
    for (; h + 8 * W <= H; h += 8 * W) project_block<8>(proj + h, w, count, H, b1 ? b1 + h : b1, out + h);
    for (; h + W <= H; h += W) project_block<1>(proj + h, w, count, H, b1 ? b1 + h : b1, out + h);
    for (; h < H; ++h) {  // the scalar tail of an H that is not a multiple of 8
        float t = 0;
        for (int q = 0; q < count; ++q) t += w[q] * proj[int64_t(q) * H + h];
        out[h] = b1 ? std::tanh(t + b1[h]) : t;
    }
}

// t2i, lanes = 8 words (NB blocks): softmax over the R regions, rel_l, pooled over the n words.
static void t2i_pair(const Args& a, int i, int j, int n, Buffers& b) {
    const int R = a.R, NB = (n + W - 1) / W, LP = NB * W;
    const float* G = a.img_gram + int64_t(i) * R * R;  // (R, R)
    vf *P = b.P.data(), *Q = b.Q.data(), *D = b.D.data();  // P[r * NB + k]
    for (int k = 0; k < NB; ++k) {
        for (int r = 0; r < R; ++r) P[r * NB + k] = clip(vload(&b.A[r * LP + k * W]), a.clipped) * b.rscale[r];
        vf inv = softmax_lanes(P + k, NB, R);
        inv = (vi{0, 1, 2, 3, 4, 5, 6, 7} + k * W < n) ? inv : splat(0);  // padded words: no attention at all
        D[k] = splat(0);
        for (int r = 0; r < R; ++r) { P[r * NB + k] *= inv; D[k] += P[r * NB + k] * vload(&b.A[r * LP + k * W]); }
    }
    quad_form(G, R, P, NB, R, Q);
    for (int k = 0; k < NB; ++k)
        vstore(&b.rel[k * W], D[k] / vmax(vload(&b.cnorm[k * W]) * vsqrt_pos(Q[k]), splat(EPS)));
    int64_t pair = int64_t(i) * a.n_cap + j;
    a.s_t2i[pair] = pool(b.rel.data(), n, a.agg_t2i, a.lambda_lse);
    if (!a.h_img) return;
    for (int r = 0; r < R; ++r) {  // u_img's attention: the mean over the real words
        vf w = P[r * NB];
        for (int k = 1; k < NB; ++k) w += P[r * NB + k];
        b.w[r] = hsum(w) / n;
    }
    project(a.img_proj + int64_t(i) * R * a.H, b.w.data(), R, a.H, a.b1, a.h_img + pair * a.H);
}

// i2t, lanes = 8 regions (RB blocks): softmax over the n real words, rel_r, pooled over the R regions.
static void i2t_pair(const Args& a, int i, int j, int n, Buffers& b) {
    const int R = a.R, RB = (R + W - 1) / W, RP = RB * W;
    const float* G = a.cap_gram + int64_t(j) * a.L * a.L;  // (L, L), real words first
    vf *P = b.P.data(), *Q = b.Q.data(), *D = b.D.data();  // P[l * RB + k]
    for (int k = 0; k < RB; ++k) {
        for (int l = 0; l < n; ++l) P[l * RB + k] = clip(vload(&b.AT[l * RP + k * W]), a.clipped) * b.cscale[l];
        vf inv = softmax_lanes(P + k, RB, n);
        D[k] = splat(0);
        for (int l = 0; l < n; ++l) { P[l * RB + k] *= inv; D[k] += P[l * RB + k] * vload(&b.AT[l * RP + k * W]); }
    }
    quad_form(G, a.L, P, RB, n, Q);
    for (int k = 0; k < RB; ++k)
        vstore(&b.rel[k * W], D[k] / vmax(vload(&b.inorm[k * W]) * vsqrt_pos(Q[k]), splat(EPS)));
    int64_t pair = int64_t(i) * a.n_cap + j;
    a.s_i2t[pair] = pool(b.rel.data(), R, a.agg_i2t, a.lambda_lse);
    if (!a.h_txt) return;
    const vf last = (vi{0, 1, 2, 3, 4, 5, 6, 7} + (RB - 1) * W < R) ? splat(1) : splat(0);  // padded regions
    for (int l = 0; l < n; ++l) {  // u_txt's attention: the mean over the regions
        vf w = P[l * RB + RB - 1] * last;
        for (int k = 0; k < RB - 1; ++k) w += P[l * RB + k];
        b.w[l] = hsum(w) / R;
    }
    project(a.cap_proj + int64_t(j) * a.L * a.H, b.w.data(), n, a.H, a.b1, a.h_txt + pair * a.H);
}

// fn(begin, end) over [0, n) in blocks of `grain`, taken in turn by n_threads threads (the calling
// one included): a thread slowed by another process takes fewer blocks instead of being waited for.
// Built with OpenMP (fused.py tries -fopenmp first), the threads are torch's own: the same libgomp
// (soname libgomp.so.1), so that the kernel does not compete with torch's idle threads, which spin
// for a while after each of its parallel products (on 2 cores that cost the kernel ~25%).
template <class Fn> static void parallel(int64_t n, int n_threads, int64_t grain, Fn fn) {
    const int64_t blocks = (n + grain - 1) / grain;
    const int T = int(std::max<int64_t>(1, std::min<int64_t>(n_threads, blocks)));
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(T)
    for (int64_t k = 0; k < blocks; ++k) fn(k * grain, std::min(n, (k + 1) * grain));
#else
    std::atomic<int64_t> next{0};
    auto work = [&]() {
        for (int64_t p0; (p0 = next.fetch_add(grain)) < n;) fn(p0, std::min(n, p0 + grain));
    };
    std::vector<std::thread> rest;
    for (int t = 1; t < T; ++t) rest.emplace_back(work);
    work();
    for (auto& th : rest) th.join();
#endif
}

static void run_range(const Args& a, int64_t p0, int64_t p1) {
    thread_local Buffers b(0, 0);  // grown to the largest chunk seen, reused by every block of this thread
    b.fit(a.R, a.L);
    for (int64_t p = p0; p < p1; ++p) {
        int i = int(p / a.n_cap), j = int(p % a.n_cap), n = a.lens[j];
        if (p == p0 || j == 0) std::copy(a.img_norm + int64_t(i) * a.R, a.img_norm + int64_t(i + 1) * a.R, b.inorm.begin());
        load_pair(a, i, j, n, b);
        t2i_pair(a, i, j, n, b);
        i2t_pair(a, i, j, n, b);
    }
}

extern "C" int casc_cross_attention(
    const float* s, int64_t ld, int n_img, int R, int n_cap, int L, const int32_t* lens,
    const float* img_norm, const float* img_gram, const float* cap_norm, const float* cap_gram,
    int norm, int clipped, float lam_t2i, float lam_i2t, int agg_t2i, int agg_i2t, float lambda_lse,
    const float* img_proj, const float* cap_proj, const float* b1, int H,
    float* s_t2i, float* s_i2t, float* h_img, float* h_txt, int n_threads) {
    Args a{s, ld, n_img, R, n_cap, L, lens, img_norm, img_gram, cap_norm, cap_gram, norm, clipped,
           lam_t2i, lam_i2t, agg_t2i, agg_i2t, lambda_lse, img_proj, cap_proj, b1, H, s_t2i, s_i2t, h_img, h_txt};
    parallel(int64_t(n_img) * n_cap, n_threads, 64, [&a](int64_t p0, int64_t p1) { run_range(a, p0, p1); });
    return 0;
}

// out (P, H) = tanh(h + b1), the label head's hidden layer from W1 x (P, H), H a multiple of W.
extern "C" void casc_bias_tanh(const float* h, const float* b1, int64_t P, int H, float* out, int n_threads) {
    parallel(P, n_threads, 256, [=](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p)
            for (int k = 0; k < H; k += W) vstore(out + p * H + k, vtanh(vload(h + p * H + k) + vload(b1 + k)));
    });
}

// out[i, j] = cos(sigmoid(x[i, j, :]), sigmoid(y[i, j, :])) over K contiguous labels; pair (i, j)
// of x at i * xs0 + j * xs1 floats (y likewise): either pair order of memory.
extern "C" void casc_label_cosine(const float* x, int64_t xs0, int64_t xs1, const float* y, int64_t ys0,
                                  int64_t ys1, int n0, int n1, int K, float* out, int n_threads) {
    parallel(int64_t(n0) * n1, n_threads, 256, [=](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
            const float *a = x + (p / n1) * xs0 + (p % n1) * xs1, *b = y + (p / n1) * ys0 + (p % n1) * ys1;
            vf pq = splat(0), pp = splat(0), qq = splat(0);
            int k = 0;
            for (; k + W <= K; k += W) {
                vf u = vsigmoid(vload(a + k)), v = vsigmoid(vload(b + k));
                pq += u * v; pp += u * u; qq += v * v;
            }
            float spq = hsum(pq), spp = hsum(pp), sqq = hsum(qq);
            for (; k < K; ++k) {
                float u = 1.0f / (1.0f + std::exp(-a[k])), v = 1.0f / (1.0f + std::exp(-b[k]));
                spq += u * v; spp += u * u; sqq += v * v;
            }
            out[p] = spq / std::max(std::sqrt(spp) * std::sqrt(sqq), EPS);
        }
    });
}
