/* Native CPU kernels of pqflex's decode step (fp32), loaded through ctypes by pqflex/ops/native.py.
 *
 * Same math as the plain-torch implementations, in one pass each instead of a chain of tensor ops:
 *   pq_select_f32          the table q . centroids (or a given one), ADC scores from the codes, PQCache's GQA rule,
 *                          exact top-k (ties to the later token)
 *   sparse_attention_f32   attention of the G query heads of a KV head over a sink range, the listed rows (read by
 *                          index) and a recent range
 *   pq_encode_f32          nearest centroid of each sub-vector (ties to the lowest index)
 *   kmeans_step_f32        one Lloyd assignment of k-means: nearest centroid, per-cluster sums and counts
 * Strides are in elements; the last dimension of every tensor is contiguous. A code or row index out of range returns
 * 2 (native.py raises IndexError) before it is read. No allocation escapes a call and no state is kept, so calls
 * from several threads are safe.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define EXPORT __attribute__((visibility("default")))
#define TILE 8
#ifndef PQFLEX_SOURCE_DIGEST
#define PQFLEX_SOURCE_DIGEST "unknown"
#endif

/* The sha256 prefix of this file when it was built (native_build.py passes it): native.py refuses a stale build. */
EXPORT const char *pqflex_source_digest(void) { return PQFLEX_SOURCE_DIGEST; }

/* Dot product with eight independent partial sums, so the compiler vectorizes it without -ffast-math. */
static float dot(const float *a, const float *b, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* exp(v) for v <= 0 by a Cephes-style polynomial, about 1 ulp; below -87.3 (subnormal results) and for NaN, libm's
 * expf. The same arithmetic on four lanes (SSE2, every x86-64) or one. */
#define EXP_C1 0.693359375f
#define EXP_C2 -2.12194440e-4f
#define EXP_P0 1.9875691500e-4f
#define EXP_P1 1.3981999507e-3f
#define EXP_P2 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P4 1.6666665459e-1f
#define EXP_P5 5.0000001201e-1f
#define EXP_LOG2E 1.44269504088896341f
#define EXP_MIN -87.3f

static float exp_neg(float v) {
    if (!(v >= EXP_MIN)) return expf(v);  /* NaN, or the subnormal range: libm (no out-of-range float -> int) */
    float u = v * EXP_LOG2E + 0.5f, f = (float)(int32_t)u;
    f -= f > u ? 1.0f : 0.0f;  /* floor */
    float r = v - f * EXP_C1 - f * EXP_C2, z = r * r;
    float y = ((((EXP_P0 * r + EXP_P1) * r + EXP_P2) * r + EXP_P3) * r + EXP_P4) * r + EXP_P5;
    union { uint32_t i; float f; } two_n = {((uint32_t)(int32_t)f + 127u) << 23};
    return (y * z + r + 1.0f) * two_n.f;
}

#ifdef __SSE2__
#include <emmintrin.h>
static __m128 exp_neg4(__m128 v) {
    __m128 u = _mm_add_ps(_mm_mul_ps(v, _mm_set1_ps(EXP_LOG2E)), _mm_set1_ps(0.5f));
    __m128 f = _mm_cvtepi32_ps(_mm_cvttps_epi32(u));
    f = _mm_sub_ps(f, _mm_and_ps(_mm_cmpgt_ps(f, u), _mm_set1_ps(1.0f)));  /* floor */
    __m128 r = _mm_sub_ps(_mm_sub_ps(v, _mm_mul_ps(f, _mm_set1_ps(EXP_C1))), _mm_mul_ps(f, _mm_set1_ps(EXP_C2)));
    __m128 z = _mm_mul_ps(r, r), y = _mm_set1_ps(EXP_P0);
    y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(EXP_P1));
    y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(EXP_P2));
    y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(EXP_P3));
    y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(EXP_P4));
    y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(EXP_P5));
    y = _mm_add_ps(_mm_add_ps(_mm_mul_ps(y, z), r), _mm_set1_ps(1.0f));
    __m128i n = _mm_slli_epi32(_mm_add_epi32(_mm_cvttps_epi32(f), _mm_set1_epi32(127)), 23);
    y = _mm_mul_ps(y, _mm_castsi128_ps(n));
    return y;  /* lanes below EXP_MIN are redone by the caller */
}
#endif

/* The largest of x[0..n) that is not NaN (-inf if none). */
static float max_of(const float *x, int64_t n) {
    float mx = -INFINITY;
    int64_t i = 0;
#ifdef __SSE2__
    __m128 acc = _mm_set1_ps(-INFINITY);
    for (; i + 4 <= n; i += 4) acc = _mm_max_ps(_mm_loadu_ps(x + i), acc);  /* NaN lanes keep acc */
    float lanes[4];
    _mm_storeu_ps(lanes, acc);
    for (int j = 0; j < 4; j++) mx = lanes[j] > mx ? lanes[j] : mx;
#endif
    for (; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    return mx;
}

/* agg[i] += e[i] * inv, a NaN product counting as 0 (as the reference's nan_to_num). */
static void add_probs(float *agg, const float *e, int64_t n, float inv) {
    int64_t i = 0;
#ifdef __SSE2__
    __m128 s = _mm_set1_ps(inv);
    for (; i + 4 <= n; i += 4) {
        __m128 p = _mm_mul_ps(_mm_loadu_ps(e + i), s);
        _mm_storeu_ps(agg + i, _mm_add_ps(_mm_loadu_ps(agg + i), _mm_and_ps(_mm_cmpord_ps(p, p), p)));
    }
#endif
    for (; i < n; i++) {
        float p = e[i] * inv;
        agg[i] += p == p ? p : 0.0f;
    }
}

/* x[i] = exp(x[i] - shift) for x[i] <= shift; returns their sum. */
static float exp_shifted(float *x, int64_t n, float shift) {
    int64_t i = 0;
#ifdef __SSE2__
    __m128 sh = _mm_set1_ps(shift), acc = _mm_setzero_ps();
    for (; i + 4 <= n; i += 4) {
        __m128 v = _mm_sub_ps(_mm_loadu_ps(x + i), sh), e = exp_neg4(v);
        _mm_storeu_ps(x + i, e);
        if (_mm_movemask_ps(_mm_cmplt_ps(v, _mm_set1_ps(EXP_MIN)))) {  /* rare: subnormal results from libm */
            float lanes[4];
            _mm_storeu_ps(lanes, v);
            for (int j = 0; j < 4; j++) x[i + j] = exp_neg(lanes[j]);
            e = _mm_loadu_ps(x + i);
        }
        acc = _mm_add_ps(acc, e);
    }
    float lanes[4];
    _mm_storeu_ps(lanes, acc);
    float s = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#else
    float s = 0.0f;
#endif
    for (; i < n; i++) {
        x[i] = exp_neg(x[i] - shift);
        s += x[i];
    }
    return s;
}

/* Move the k largest of a[0..n) (distinct keys) to a[0..k), in no particular order: quickselect. */
static void select_largest(uint64_t *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        uint64_t x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi];
        uint64_t pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        int64_t i = lo, j = hi;
        while (i <= j) {  /* descending: keys above the pivot go left */
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) {
                uint64_t t = a[i];
                a[i] = a[j];
                a[j] = t;
                i++;
                j--;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else return;
    }
}

static int descending(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x < y) - (x > y);
}

/* The k largest of the distinct keys a[0..n) to a[0..k), largest first. A histogram of the keys' top 11 bits (the
 * exponent and 3 mantissa bits of the probability) finds the bin holding the k-th largest; the keys above it are
 * taken whole, quickselect picks the rest among that bin's keys only, and the k winners are sorted. */
static void top_keys(uint64_t *a, int64_t n, int64_t k) {
    enum { BINS = 2048 };
    int64_t hist[BINS] = {0};
    if (k <= 0) return;
    for (int64_t i = 0; i < n; i++) hist[a[i] >> 52]++;
    int64_t bin = BINS - 1, above = 0;
    while (above + hist[bin] < k) above += hist[bin--];
    int64_t hi = 0, lo = above;  /* keys above the bin to a[0..above), the bin's keys from a[above] on */
    for (int64_t i = 0; i < n; i++) {
        int64_t kb = (int64_t)(a[i] >> 52);
        if (kb > bin) {
            uint64_t t = a[i];
            a[i] = a[hi];
            a[hi++] = t;
        }
    }
    for (int64_t i = above; i < n; i++)
        if ((int64_t)(a[i] >> 52) == bin) {
            uint64_t t = a[i];
            a[i] = a[lo];
            a[lo++] = t;
        }
    select_largest(a + above, lo - above, k - above);
    qsort(a, (size_t)k, sizeof(uint64_t), descending);
}

/* Scratch of one call, sized for N tokens, T listed rows and a G x M x ksub table. */
typedef struct {
    float *scores, *agg, *table, *logits;
    uint64_t *keys;
    int64_t *rows;
} Scratch;

static void scratch_free(Scratch *w) {
    free(w->scores);
    free(w->agg);
    free(w->table);
    free(w->logits);
    free(w->keys);
    free(w->rows);
}

static int scratch_alloc(Scratch *w, int64_t G, int64_t N, int64_t T, int64_t table) {
    size_t n = (size_t)(N > 0 ? N : 1), t = (size_t)(T > 0 ? T : 1);
    w->scores = malloc(sizeof(float) * (size_t)G * n);
    w->agg = malloc(sizeof(float) * n);
    w->keys = malloc(sizeof(uint64_t) * n);
    w->table = malloc(sizeof(float) * (size_t)(table > 0 ? table : 1));
    w->logits = malloc(sizeof(float) * (size_t)G * t);
    w->rows = malloc(sizeof(int64_t) * t);
    if (w->scores && w->agg && w->keys && w->table && w->logits && w->rows) return 0;
    scratch_free(w);
    return -1;
}

/* The k best of the `count` candidate tokens first..first+count-1 of one KV head, best first (ties to the later
 * token), into sel[0..k): scaled ADC scores of each of the G query heads from table [G, M, ksub], a softmax over the
 * candidates per head, summed over the heads (PQCache's GQA rule). */
static void select_head(const float *table, const uint8_t *codes, int64_t csn, int64_t first, int64_t count,
                        int64_t k, int64_t G, int64_t M, int64_t ksub, float scale, Scratch *w, int64_t *sel) {
    float *scores = w->scores, *agg = w->agg;
    uint64_t *keys = w->keys;
    /* TILE tokens at a time: a token's sum runs over m = 0..M-1 in order, and the TILE sums are independent, so
     * the additions pipeline. */
    for (int64_t t0 = 0; t0 < count; t0 += TILE) {
        int64_t nt = count - t0 < TILE ? count - t0 : TILE;
        const uint8_t *c = codes + (first + t0) * csn;
        for (int64_t g = 0; g < G; g++) {
            const float *tg = table + g * M * ksub;
            float acc[TILE] = {0};
            if (nt == TILE)
                for (int64_t m = 0; m < M; m++)
                    for (int i = 0; i < TILE; i++) acc[i] += tg[m * ksub + c[i * csn + m]];
            else
                for (int64_t m = 0; m < M; m++)
                    for (int64_t i = 0; i < nt; i++) acc[i] += tg[m * ksub + c[i * csn + m]];
            for (int64_t i = 0; i < nt; i++) scores[g * count + t0 + i] = acc[i] * scale;
        }
    }
    for (int64_t t = 0; t < count; t++) agg[t] = 0.0f;
    for (int64_t g = 0; g < G; g++) {
        float *e = scores + g * count;
        float sum = exp_shifted(e, count, max_of(e, count));
        add_probs(agg, e, count, 1.0f / sum);
    }
    /* Key = float bits of the (non-negative) probability, then the position: ordering the keys orders the tokens
     * by probability, ties to the later token. */
    for (int64_t t = 0; t < count; t++) {
        union { float f; uint32_t u; } v = {agg[t]};
        keys[t] = ((uint64_t)v.u << 32) | (uint64_t)(first + t);
    }
    top_keys(keys, count, k);
    for (int64_t j = 0; j < k; j++) sel[j] = (int64_t)(keys[j] & 0xffffffffu);
}

/* out[g] = softmax(scale * q_g . K[rows]) V[rows] for the G query heads q (rows qs apart) of one KV head; a head
 * with no rows gets zeros. A NaN or infinite input gives NaN, as in SDPA: a numerical fault never looks valid. */
static void attend_head(const float *q, int64_t qs, const float *key, int64_t ksn, const float *value, int64_t vsn,
                        const int64_t *rows, int64_t n, int64_t G, int64_t D, float scale, float *logits,
                        float *out) {
    for (int64_t t = 0; t < n; t++)  /* ask for every listed row up front: their cache misses overlap */
        for (int64_t d = 0; d < D; d += 16) {
            __builtin_prefetch(key + rows[t] * ksn + d);
            __builtin_prefetch(value + rows[t] * vsn + d);
        }
    for (int64_t t = 0; t < n; t++) {  /* each key row is read once for the G query heads */
        const float *kr = key + rows[t] * ksn;
        for (int64_t g = 0; g < G; g++) logits[g * n + t] = dot(q + g * qs, kr, D) * scale;
    }
    for (int64_t g = 0; g < G; g++) {
        float *l = logits + g * n;
        float inv = n > 0 ? 1.0f / exp_shifted(l, n, max_of(l, n)) : 0.0f;
        for (int64_t t = 0; t < n; t++) l[t] *= inv;
        for (int64_t d = 0; d < D; d++) out[g * D + d] = 0.0f;
    }
    for (int64_t t = 0; t < n; t++) {  /* each value row is read once too */
        const float *vr = value + rows[t] * vsn;
        for (int64_t g = 0; g < G; g++) {
            float p = logits[g * n + t], *o = out + g * D;
            for (int64_t d = 0; d < D; d++) o[d] += p * vr[d];
        }
    }
}

/* The k of count candidates (from first) of one KV head into dst [k_max] (-1 past k), from its table [G, M, ksub].
 * Returns 2, writing nothing, if a candidate's code is >= ksub (it would index past the table), else 0. */
static int select_one(const float *table, const uint8_t *codes, int64_t csn, int64_t first, int64_t count, int64_t k,
                      int64_t G, int64_t M, int64_t ksub, int64_t k_max, float scale, Scratch *w, int32_t *dst) {
    if (ksub < 256)
        for (int64_t t = first; t < first + count; t++)
            for (int64_t m = 0; m < M; m++)
                if (codes[t * csn + m] >= ksub) return 2;
    select_head(table, codes, csn, first, count, k, G, M, ksub, scale, w, w->rows);
    for (int64_t j = 0; j < k_max; j++) dst[j] = j < k ? (int32_t)w->rows[j] : -1;
    return 0;
}

static int64_t clip(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* table [G, M, ksub] of q_g . centroid for the G query heads q (rows qsg apart, D = M * dsub) of one KV head and its
 * centroids [M, ksub, dsub]: four centroids at a time, each dot product summed in four SSE lanes and the four sums
 * transposed into one vector (one pass over the centroids for all G heads; plain C without SSE2). */
static void ip_table_head(const float *q, int64_t qsg, const float *cent, int64_t G, int64_t M, int64_t ksub,
                          int64_t dsub, float *table) {
    for (int64_t m = 0; m < M; m++) {
        const float *cm = cent + m * ksub * dsub;
        int64_t c = 0;
#ifdef __SSE2__
        int64_t d4 = dsub & ~(int64_t)3;
        for (; c + 4 <= ksub; c += 4) {
            const float *c0 = cm + c * dsub, *c1 = c0 + dsub, *c2 = c1 + dsub, *c3 = c2 + dsub;
            for (int64_t g = 0; g < G; g++) {
                const float *qm = q + g * qsg + m * dsub;
                __m128 a0 = _mm_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t d = 0; d < d4; d += 4) {
                    __m128 x = _mm_loadu_ps(qm + d);
                    a0 = _mm_add_ps(a0, _mm_mul_ps(x, _mm_loadu_ps(c0 + d)));
                    a1 = _mm_add_ps(a1, _mm_mul_ps(x, _mm_loadu_ps(c1 + d)));
                    a2 = _mm_add_ps(a2, _mm_mul_ps(x, _mm_loadu_ps(c2 + d)));
                    a3 = _mm_add_ps(a3, _mm_mul_ps(x, _mm_loadu_ps(c3 + d)));
                }
                _MM_TRANSPOSE4_PS(a0, a1, a2, a3);
                __m128 sum = _mm_add_ps(_mm_add_ps(a0, a1), _mm_add_ps(a2, a3));
                float out[4];
                _mm_storeu_ps(out, sum);
                for (int64_t d = d4; d < dsub; d++) {
                    out[0] += qm[d] * c0[d];
                    out[1] += qm[d] * c1[d];
                    out[2] += qm[d] * c2[d];
                    out[3] += qm[d] * c3[d];
                }
                _mm_storeu_ps(table + (g * M + m) * ksub + c, _mm_loadu_ps(out));
            }
        }
#endif
        for (; c < ksub; c++)
            for (int64_t g = 0; g < G; g++)
                table[(g * M + m) * ksub + c] = dot(q + g * qsg + m * dsub, cm + c * dsub, dsub);
    }
}

/* codes [B, Hkv, N, M] with strides (csb, csh, csn); the candidates of sequence b are [start + sink, n - recent)
 * from spans [B, 3] (start, sink, recent) and n, the tokens cached; topk [B]; out [B, Hkv, k_max] int32. The table
 * of each KV head is ip_table [B, Hkv, G, M, ksub] (contiguous) when given, else computed here from query [B, Hkv,
 * G, M * dsub] (strides qsb, qsh, qsg) and centroids [B, Hkv, M, ksub, dsub] (contiguous). Returns 0; -1 out of
 * memory; 2 if a candidate's code is >= ksub. */
EXPORT int pq_select_f32(const float *ip_table, const float *query, int64_t qsb, int64_t qsh, int64_t qsg,
                         const float *centroids, int64_t dsub, const uint8_t *codes, int64_t csb, int64_t csh,
                         int64_t csn, const int64_t *spans, int64_t n, const int64_t *topk, int64_t B, int64_t Hkv,
                         int64_t G, int64_t M, int64_t ksub, int64_t N, int64_t k_max, float scale, int32_t *out) {
    Scratch w;
    int rc = 0;
    if (scratch_alloc(&w, G, N, k_max, ip_table ? 0 : G * M * ksub)) return -1;
    for (int64_t b = 0; b < B && !rc; b++) {
        int64_t first = clip(spans[3 * b] + spans[3 * b + 1], 0, N), last = clip(n - spans[3 * b + 2], 0, N);
        int64_t count = last > first ? last - first : 0, k = clip(clip(topk[b], 0, k_max), 0, count);
        for (int64_t h = 0; h < Hkv && !rc; h++) {
            const float *table = ip_table ? ip_table + (b * Hkv + h) * G * M * ksub : w.table;
            if (!ip_table && count > 0)
                ip_table_head(query + b * qsb + h * qsh, qsg, centroids + (b * Hkv + h) * M * ksub * dsub, G, M,
                              ksub, dsub, w.table);
            rc = select_one(table, codes + b * csb + h * csh, csn, first, count, k, G, M, ksub, k_max, scale, &w,
                            out + (b * Hkv + h) * k_max);
        }
    }
    scratch_free(&w);
    return rc;
}

/* query [B, H, D] with strides (qsb, qsh); key, value [B, Hkv, C, D] with strides (ksb, ksh, ksn) and (vsb, vsh,
 * vsn); out [B, H, D] contiguous. Each KV head attends a list of rows in three parts: `sink` slots at start + j, real
 * when j < its sink budget and start + j < n; the W listed slots of idx [B, Hkv, W] (int32 when idx32, else int64,
 * contiguous), real when valid (NULL: all) holds and the entry is >= 0; `recent` slots at n - recent + j, real when
 * >= n - its recent budget, >= start + its sink budget and >= 0. spans [B, 3] int64 (start, sink budget, recent
 * budget) is NULL when sink = recent = 0. Returns 0; -1 out of memory; 2 if a real row is outside [0, C). */
EXPORT int sparse_attention_f32(const float *query, int64_t qsb, int64_t qsh, const float *key, int64_t ksb,
                                int64_t ksh, int64_t ksn, const float *value, int64_t vsb, int64_t vsh, int64_t vsn,
                                int64_t C, const void *idx, int idx32, const uint8_t *valid, const int64_t *spans,
                                int64_t n, int64_t sink, int64_t recent, int64_t B, int64_t Hkv, int64_t G, int64_t W,
                                int64_t D, float scale, float *out) {
    Scratch w;
    int rc = 0;
    if (scratch_alloc(&w, G, 0, sink + W + recent, 0)) return -1;
    for (int64_t b = 0; b < B && !rc; b++) {
        int64_t s0 = spans ? spans[3 * b] : 0, s1 = spans ? s0 + spans[3 * b + 1] : 0;
        int64_t r0 = spans ? n - spans[3 * b + 2] : n;
        if (r0 < s1) r0 = s1;
        if (r0 < 0) r0 = 0;
        for (int64_t h = 0; h < Hkv && !rc; h++) {
            int64_t len = 0, off = (b * Hkv + h) * W;
            for (int64_t p = s0; p < s0 + sink; p++)
                if (p < s1 && p < n) w.rows[len++] = p;
            for (int64_t t = 0; t < W; t++) {
                int64_t p = idx32 ? ((const int32_t *)idx)[off + t] : ((const int64_t *)idx)[off + t];
                if (p < 0 || (valid && !valid[off + t])) continue;
                w.rows[len++] = p;
            }
            for (int64_t p = n - recent; p < n; p++)
                if (p >= r0) w.rows[len++] = p;
            for (int64_t i = 0; i < len; i++)  /* every row, listed or from the spans (n may exceed C) */
                if (w.rows[i] >= C) rc = 2;
            if (rc) break;
            attend_head(query + b * qsb + h * G * qsh, qsh, key + b * ksb + h * ksh, ksn, value + b * vsb + h * vsh,
                        vsn, w.rows, len, G, D, scale, w.logits, out + (b * Hkv + h) * G * D);
        }
    }
    scratch_free(&w);
    return rc;
}

/* Code of one vector v [M * dsub] against centroids [M, ksub, dsub]: the nearest centroid of each sub-vector
 * (ties to the lowest index). Returns 1, writing nothing, if v holds a non-finite value. */
static int encode_one(const float *v, const float *centroids, int64_t M, int64_t ksub, int64_t dsub, uint8_t *code) {
    for (int64_t d = 0; d < M * dsub; d++)
        if (!isfinite(v[d])) return 1;
    for (int64_t m = 0; m < M; m++) {
        const float *x = v + m * dsub, *c = centroids + m * ksub * dsub;
        float best = INFINITY;
        int64_t arg = 0, j = 0;
#ifdef __SSE2__
        /* Four centroids at a time: each squared distance summed in four SSE lanes, the four sums transposed into
         * one vector; the scan below then takes them in order (ties to the lowest index). */
        int64_t d4 = dsub & ~(int64_t)3;
        for (; j + 4 <= ksub; j += 4) {
            const float *c0 = c + j * dsub, *c1 = c0 + dsub, *c2 = c1 + dsub, *c3 = c2 + dsub;
            __m128 a0 = _mm_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t d = 0; d < d4; d += 4) {
                __m128 xd = _mm_loadu_ps(x + d), e0 = _mm_sub_ps(xd, _mm_loadu_ps(c0 + d)),
                       e1 = _mm_sub_ps(xd, _mm_loadu_ps(c1 + d)), e2 = _mm_sub_ps(xd, _mm_loadu_ps(c2 + d)),
                       e3 = _mm_sub_ps(xd, _mm_loadu_ps(c3 + d));
                a0 = _mm_add_ps(a0, _mm_mul_ps(e0, e0));
                a1 = _mm_add_ps(a1, _mm_mul_ps(e1, e1));
                a2 = _mm_add_ps(a2, _mm_mul_ps(e2, e2));
                a3 = _mm_add_ps(a3, _mm_mul_ps(e3, e3));
            }
            _MM_TRANSPOSE4_PS(a0, a1, a2, a3);
            float d2[4];
            _mm_storeu_ps(d2, _mm_add_ps(_mm_add_ps(a0, a1), _mm_add_ps(a2, a3)));
            for (int64_t d = d4; d < dsub; d++)
                for (int i = 0; i < 4; i++) {
                    float e = x[d] - c[(j + i) * dsub + d];
                    d2[i] += e * e;
                }
            for (int i = 0; i < 4; i++)
                if (d2[i] < best) {
                    best = d2[i];
                    arg = j + i;
                }
        }
#endif
        for (; j < ksub; j++) {
            float d2 = 0.0f;
            for (int64_t d = 0; d < dsub; d++) {
                float e = x[d] - c[j * dsub + d];
                d2 += e * e;
            }
            if (d2 < best) {
                best = d2;
                arg = j;
            }
        }
        code[m] = (uint8_t)arg;
    }
    return 0;
}

/* x [L, N, M * dsub] with strides (xsl, xsn); centroids [L, M, ksub, dsub] contiguous; out [L, N, M] uint8.
 * Returns 1, leaving out incomplete, if x holds a non-finite value (the caller then runs the reference, whose
 * ||c||^2 - 2 x.c arithmetic decides those codes), else 0. */
EXPORT int pq_encode_f32(const float *x, int64_t xsl, int64_t xsn, const float *centroids, int64_t L, int64_t N,
                         int64_t M, int64_t ksub, int64_t dsub, uint8_t *out) {
    for (int64_t l = 0; l < L; l++)
        for (int64_t i = 0; i < N; i++)
            if (encode_one(x + l * xsl + i * xsn, centroids + l * M * ksub * dsub, M, ksub, dsub,
                           out + (l * N + i) * M))
                return 1;
    return 0;
}

/* The nearest of ksub centroids to one point x [dsub]: its index (ties to the lowest) and ||c||^2 - 2 x.c for it,
 * from the transposed centroids ct [dsub, ksub] and their squared norms c_sq [ksub], with acc [ksub] as scratch.
 * Centroids go in blocks of 32 whose partial sums stay in vector registers over the dsub loop; the minimum is then
 * taken over 8 lanes (a vector min) and its first index found by one scan. An AVX2+FMA clone is picked at load time
 * where the processor has it. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=haswell", "default")))
#endif
static int64_t nearest_centroid(const float *x, const float *ct, const float *c_sq, int64_t ksub, int64_t dsub,
                                float *acc, float *best_out) {
    int64_t j0 = 0;
    for (; j0 + 32 <= ksub; j0 += 32) {
        float a[32] = {0.0f};
        for (int64_t d = 0; d < dsub; d++) {
            const float xd = x[d], *row = ct + d * ksub + j0;
            for (int jj = 0; jj < 32; jj++) a[jj] += xd * row[jj];
        }
        for (int jj = 0; jj < 32; jj++) acc[j0 + jj] = c_sq[j0 + jj] - 2.0f * a[jj];
    }
    for (int64_t j = j0; j < ksub; j++) {
        float a = 0.0f;
        for (int64_t d = 0; d < dsub; d++) a += x[d] * ct[d * ksub + j];
        acc[j] = c_sq[j] - 2.0f * a;
    }
    float lane[8] = {INFINITY, INFINITY, INFINITY, INFINITY, INFINITY, INFINITY, INFINITY, INFINITY};
    int64_t j = 0;
    for (; j + 8 <= ksub; j += 8)
        for (int l = 0; l < 8; l++) lane[l] = acc[j + l] < lane[l] ? acc[j + l] : lane[l];
    float best = INFINITY;
    for (int l = 0; l < 8; l++) best = lane[l] < best ? lane[l] : best;
    for (; j < ksub; j++) best = acc[j] < best ? acc[j] : best;
    int64_t arg = 0;
    while (arg < ksub && !(acc[arg] == best)) arg++;
    *best_out = best;
    return arg < ksub ? arg : 0;  /* every term NaN: centroid 0 */
}

/* One Lloyd assignment for problems [lo, hi) of x [L, N, dsub] (points rows xs apart, problems xl apart) with
 * weights w [L, N] and centroids c [L, ksub, dsub]: sums [L, ksub, dsub] and counts [L, ksub] of the weighted points
 * of each cluster (overwritten) and dist [L, N], each point's squared distance ||x||^2 + ||c||^2 - 2 x.c to its
 * nearest centroid (ties to the lowest index), as portable.kmeans's step. Points of weight 0 are skipped (their
 * dist is 0: the caller masks them). Returns 1 if out of memory. */
EXPORT int kmeans_step_f32(const float *x, int64_t xl, int64_t xs, const float *w, const float *c, int64_t lo,
                           int64_t hi, int64_t N, int64_t ksub, int64_t dsub, float *sums, float *counts,
                           float *dist) {
    float *ct = malloc(sizeof(float) * (size_t)(dsub * ksub + 2 * ksub));
    if (ct == NULL) return 1;
    float *c_sq = ct + dsub * ksub, *acc = c_sq + ksub;
    for (int64_t l = lo; l < hi; l++) {
        const float *cl = c + l * ksub * dsub;
        float *sl = sums + l * ksub * dsub, *nl = counts + l * ksub;
        for (int64_t j = 0; j < ksub; j++) {
            float s = 0.0f;
            for (int64_t d = 0; d < dsub; d++) {
                ct[d * ksub + j] = cl[j * dsub + d];
                s += cl[j * dsub + d] * cl[j * dsub + d];
            }
            c_sq[j] = s;
            nl[j] = 0.0f;
        }
        for (int64_t i = 0; i < ksub * dsub; i++) sl[i] = 0.0f;
        for (int64_t n = 0; n < N; n++) {
            const float wn = w[l * N + n], *xn = x + l * xl + n * xs;
            if (wn == 0.0f) {
                dist[l * N + n] = 0.0f;
                continue;
            }
            float best, x_sq = 0.0f;
            const int64_t arg = nearest_centroid(xn, ct, c_sq, ksub, dsub, acc, &best);
            for (int64_t d = 0; d < dsub; d++) {
                sl[arg * dsub + d] += wn * xn[d];
                x_sq += xn[d] * xn[d];
            }
            nl[arg] += wn;
            dist[l * N + n] = best + x_sq;
        }
    }
    free(ct);
    return 0;
}
