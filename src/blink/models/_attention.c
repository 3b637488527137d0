/* Decode attention over the paged KV cache, part of blink.models._native (see blink/models/native.py).

   For each decode row (one query token) and query head:
     s_t = (q . k_t) * scale over the row's n keys, read in place from the cache through the sequence's slots
     p_t = exp(s_t - max s), o = (sum_t p_t v_t) / (sum_t p_t)
   Each (row, head) is computed alone, in a fixed order: its result does not depend on the other rows of the
   call, their number or lengths, nor on the threads. Dot products go through 16 explicit partial sums (what one
   AVX-512 register, or two AVX2 ones, hold), reduced in a fixed order, and the build forbids FMA contraction,
   so every instruction set the compiler picks (target_clones) computes the same bits.

   Where the CPU has them, a KV head's query heads go together (each key and value read once for all of them):
   attend_kv_avx512 (head_dim 64) or attend_kv_avx2 (head_dim a multiple of 8), with a polynomial exp. They
   differ from attend_one in the last bits but are as batch-invariant; a machine uses one path throughout. The
   AVX2 one measured 2.2-2.7x attend_one's speed on an AMD EPYC (9 heads over 3, head_dim 64, 128-2048 keys).

   The cache holds fp32 or fp16 keys and values (`half`); an fp16 one is widened to fp32 as it is read (exactly),
   so every path computes what it computes on an fp32 cache holding the same values. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "_kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define LANES 16

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

static inline float dot(const float *a, const float *b, int64_t d) {
    float part[LANES] = {0};
    for (int64_t i = 0; i + LANES <= d; i += LANES)
        for (int l = 0; l < LANES; l++) part[l] = part[l] + a[i + l] * b[i + l];
    for (int64_t i = d - d % LANES; i < d; i++) part[i % LANES] = part[i % LANES] + a[i] * b[i];
    for (int w = LANES / 2; w > 0; w /= 2)  /* a fixed tree */
        for (int l = 0; l < w; l++) part[l] = part[l] + part[l + w];
    return part[0];
}

/* the `d` floats at element `at` of a cache tensor: in place when it is fp32, widened into `buf` when fp16 */
static inline const float *kv_row(const attn_t *a, const void *base, int64_t at, int64_t d, float *buf) {
    if (!a->half) return (const float *)base + at;
    const uint16_t *h = (const uint16_t *)base + at;
    for (int64_t i = 0; i < d; i++) buf[i] = half_to_float(h[i]);
    return buf;
}

/* one (decode row, query head); `s` is scratch for the row's scores */
CLONES
static void attend_one(const attn_t *a, int64_t r, int64_t h, float *s) {
    const int64_t n = a->lens[r], d = a->dim, kvh = h / (a->heads / a->kv_heads);
    const int64_t stride = a->kv_heads * d;
    const float *q = a->q + a->rows[r] * a->q_row + h * a->q_head;
    const int64_t *slot = a->slots + a->offs[r];
    float row[256];  /* a widened fp16 key or value */
    float mx = -INFINITY;
    for (int64_t t = 0; t < n; t++) {
        s[t] = dot(q, kv_row(a, a->k, slot[t] * stride + kvh * d, d, row), d) * a->scale;
        mx = s[t] > mx ? s[t] : mx;
    }
    float sum = 0.0f;
    for (int64_t t = 0; t < n; t++) {
        s[t] = expf(s[t] - mx);
        sum = sum + s[t];
    }
    float *o = a->out + a->rows[r] * a->o_row + h * a->o_head;
    float acc[256];  /* head_dim <= 256 (checked by the caller) */
    for (int64_t i = 0; i < d; i++) acc[i] = 0.0f;
    for (int64_t t = 0; t < n; t++) {
        const float *v = kv_row(a, a->v, slot[t] * stride + kvh * d, d, row);
        const float p = s[t];
        for (int64_t i = 0; i < d; i++) acc[i] = acc[i] + p * v[i];
    }
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < d; i++) o[i] = acc[i] * inv;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define ATTN_X86 1

/* exp(x) for x <= 0 (scores minus their max): 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p a degree-6
   polynomial (Horner, no FMA). Relative error ~2e-7. */
__attribute__((target("avx512f"))) static inline __m512 exp_avx512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693145751953125f)));
    r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(1.428606765330187e-06f)));
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f / 120));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f / 24));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f / 6));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(0.5f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* one (decode row, KV head) for its G query heads at once (each key and value loaded once for all of them),
   head_dim 64: AVX-512, 4 registers a vector. Per head and key the same operations in the same order whatever
   the rest of the call is. */
#define G_MAX 8
/* 16 floats of a cache tensor at element `at` (fp16 widened) */
__attribute__((target("avx512f"))) static inline __m512 load16(const attn_t *a, const void *base, int64_t at) {
    if (a->half) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + at)));
    return _mm512_loadu_ps((const float *)base + at);
}

__attribute__((target("avx512f"))) static void attend_kv_avx512(const attn_t *a, int64_t r, int64_t kvh, float *s) {
    const int64_t n = a->lens[r], g_n = a->heads / a->kv_heads, stride = a->kv_heads * 64;
    const int64_t *slot = a->slots + a->offs[r];
    __m512 q[G_MAX][4];
    for (int64_t g = 0; g < g_n; g++)
        for (int c = 0; c < 4; c++) q[g][c] = _mm512_loadu_ps(a->q + a->rows[r] * a->q_row + (kvh * g_n + g) * a->q_head + 16 * c);
    float mx[G_MAX];
    for (int64_t g = 0; g < g_n; g++) mx[g] = -INFINITY;
    for (int64_t t = 0; t < n; t++) {  /* scores s[g * n + t] */
        const int64_t k = slot[t] * stride + kvh * 64;
        const __m512 k0 = load16(a, a->k, k), k1 = load16(a, a->k, k + 16), k2 = load16(a, a->k, k + 32),
                     k3 = load16(a, a->k, k + 48);
        for (int64_t g = 0; g < g_n; g++) {
            const __m512 d = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(q[g][0], k0), _mm512_mul_ps(q[g][1], k1)),
                                           _mm512_add_ps(_mm512_mul_ps(q[g][2], k2), _mm512_mul_ps(q[g][3], k3)));
            const float v = _mm512_reduce_add_ps(d) * a->scale;
            s[g * n + t] = v;
            mx[g] = v > mx[g] ? v : mx[g];
        }
    }
    float inv[G_MAX];
    for (int64_t g = 0; g < g_n; g++) {  /* p = exp(s - max), 16 at a time, summed lane-wise then reduced */
        float *sg = s + g * n;
        const __m512 m = _mm512_set1_ps(mx[g]);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t t = 0; t < n; t += 16) {
            const __mmask16 mask = n - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - t)) - 1);
            const __m512 e = _mm512_maskz_mov_ps(mask, exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, sg + t), m)));
            _mm512_mask_storeu_ps(sg + t, mask, e);
            sum = _mm512_add_ps(sum, e);
        }
        inv[g] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    __m512 o[G_MAX][4];
    for (int64_t g = 0; g < g_n; g++)
        for (int c = 0; c < 4; c++) o[g][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t++) {
        const int64_t v = slot[t] * stride + kvh * 64;
        const __m512 v0 = load16(a, a->v, v), v1 = load16(a, a->v, v + 16), v2 = load16(a, a->v, v + 32),
                     v3 = load16(a, a->v, v + 48);
        for (int64_t g = 0; g < g_n; g++) {
            const __m512 p = _mm512_set1_ps(s[g * n + t]);
            o[g][0] = _mm512_add_ps(o[g][0], _mm512_mul_ps(p, v0));
            o[g][1] = _mm512_add_ps(o[g][1], _mm512_mul_ps(p, v1));
            o[g][2] = _mm512_add_ps(o[g][2], _mm512_mul_ps(p, v2));
            o[g][3] = _mm512_add_ps(o[g][3], _mm512_mul_ps(p, v3));
        }
    }
    for (int64_t g = 0; g < g_n; g++) {
        float *out = a->out + a->rows[r] * a->o_row + (kvh * g_n + g) * a->o_head;
        const __m512 w = _mm512_set1_ps(inv[g]);
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(o[g][c], w));
    }
}
/* exp(x) for x <= 0, as exp_avx512 with 8 lanes: the same polynomial and steps; 2^n built in the exponent bits */
__attribute__((target("avx2"))) static inline __m256 exp_avx2(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693145751953125f)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(1.428606765330187e-06f)));
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f / 120));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f / 24));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f / 6));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(0.5f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2"))) static inline float sum8(__m256 v) {  /* a fixed tree: 8 -> 4 -> 2 -> 1 */
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
}

/* one (decode row, KV head) for its G query heads at once with AVX2 (head_dim a multiple of 8, at most 256):
   each key and value row is read once for all G heads. Per head and key the same operations in the same order
   whatever the rest of the call is; the output sums live in `acc` (G x head_dim floats, L1-resident). */
/* 8 floats of a cache tensor at element `at` (fp16 widened) */
__attribute__((target("avx2,f16c"))) static inline __m256 load8(const attn_t *a, const void *base, int64_t at) {
    if (a->half) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + at)));
    return _mm256_loadu_ps((const float *)base + at);
}

__attribute__((target("avx2,f16c"))) static void attend_kv_avx2(const attn_t *a, int64_t r, int64_t kvh, float *s) {
    const int64_t n = a->lens[r], g_n = a->heads / a->kv_heads, d = a->dim, stride = a->kv_heads * d;
    const int64_t *slot = a->slots + a->offs[r];
    const float *q = a->q + a->rows[r] * a->q_row + kvh * g_n * a->q_head;
    float mx[G_MAX];
    for (int64_t g = 0; g < g_n; g++) mx[g] = -INFINITY;
    for (int64_t t = 0; t < n; t++) {  /* scores s[g * n + t] */
        const int64_t k = slot[t] * stride + kvh * d;
        for (int64_t g = 0; g < g_n; g++) {
            const float *qg = q + g * a->q_head;
            __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(qg), load8(a, a->k, k));
            for (int64_t i = 8; i < d; i += 8)
                acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(qg + i), load8(a, a->k, k + i)));
            const float v = sum8(acc) * a->scale;
            s[g * n + t] = v;
            mx[g] = v > mx[g] ? v : mx[g];
        }
    }
    float inv[G_MAX];
    for (int64_t g = 0; g < g_n; g++) {  /* p = exp(s - max), 8 at a time, summed lane-wise then reduced */
        float *sg = s + g * n;
        const __m256 m = _mm256_set1_ps(mx[g]);
        __m256 sum = _mm256_setzero_ps();
        int64_t t = 0;
        for (; t + 8 <= n; t += 8) {
            const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(sg + t), m));
            _mm256_storeu_ps(sg + t, e);
            sum = _mm256_add_ps(sum, e);
        }
        if (t < n) {  /* the tail through a padded copy: the same lanes as a full vector, padding summed as zeros */
            float tail[8] = {0};
            for (int64_t i = t; i < n; i++) tail[i - t] = sg[i];
            _mm256_storeu_ps(tail, exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(tail), m)));
            for (int64_t i = 0; i < 8; i++) {
                if (t + i < n) sg[t + i] = tail[i];
                else tail[i] = 0.0f;
            }
            sum = _mm256_add_ps(sum, _mm256_loadu_ps(tail));
        }
        inv[g] = 1.0f / sum8(sum);
    }
    float acc[G_MAX * 256];
    for (int64_t i = 0; i < g_n * d; i++) acc[i] = 0.0f;
    for (int64_t t = 0; t < n; t++) {
        const int64_t v = slot[t] * stride + kvh * d;
        for (int64_t g = 0; g < g_n; g++) {
            const __m256 p = _mm256_set1_ps(s[g * n + t]);
            float *o = acc + g * d;
            for (int64_t i = 0; i < d; i += 8)
                _mm256_storeu_ps(o + i, _mm256_add_ps(_mm256_loadu_ps(o + i), _mm256_mul_ps(p, load8(a, a->v, v + i))));
        }
    }
    for (int64_t g = 0; g < g_n; g++) {
        float *out = a->out + a->rows[r] * a->o_row + (kvh * g_n + g) * a->o_head;
        const __m256 w = _mm256_set1_ps(inv[g]);
        for (int64_t i = 0; i < d; i += 8) _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(acc + g * d + i), w));
    }
}
#endif

/* the paths that take a KV head's G query heads at once (at most G_MAX): 2 AVX-512 (head_dim 64), 1 AVX2
   (head_dim a multiple of 8), 0 none (one query head at a time, attend_one) */
static int grouped_path(const attn_t *a) {
#ifdef ATTN_X86
    __builtin_cpu_init();
    if (a->heads / a->kv_heads > G_MAX) return 0;
    if (a->dim == 64 && __builtin_cpu_supports("avx512f")) return 2;
    const int f16c = !a->half || __builtin_cpu_supports("f16c");
    return a->dim % 8 == 0 && a->dim <= 256 && __builtin_cpu_supports("avx2") && f16c ? 1 : 0;
#else
    (void)a;
    return 0;
#endif
}

/* floats of scratch `attend_run` needs: the scores of each thread's current unit */
size_t attend_scratch_floats(const attn_t *a, int64_t r, int threads) {
    int64_t longest = 1;
    for (int64_t i = 0; i < r; i++) longest = a->lens[i] > longest ? a->lens[i] : longest;
    const int64_t per_unit = grouped_path(a) ? a->heads / a->kv_heads : 1;
    return (size_t)(threads > 0 ? threads : 1) * (size_t)per_unit * (size_t)longest;
}

/* the `r` decode rows of `a`, on up to `threads` threads; no Python (callable without the GIL) */
void attend_run(const attn_t *a, int64_t r, int threads, float *scratch) {
    int64_t longest = 1, keys = 0;
    for (int64_t i = 0; i < r; i++) {
        longest = a->lens[i] > longest ? a->lens[i] : longest;
        keys += a->lens[i];
    }
    const int nt = threads > 0 ? threads : 1;
    const int grouped = grouped_path(a);
    const int64_t per_unit = grouped ? a->heads / a->kv_heads : 1;  /* scores kept per unit: one row per head */
    const int64_t units = grouped ? r * a->kv_heads : r * a->heads;
    const int64_t kv_heads = a->kv_heads, heads = a->heads;
    /* threads only when there is enough to share: a parallel region costs a few microseconds */
#pragma omp parallel num_threads(nt) if (nt > 1 && keys * heads * a->dim >= 32768)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        float *mine = scratch + (size_t)t * per_unit * longest;
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units; u++) {
#ifdef ATTN_X86
            if (grouped == 2) {
                attend_kv_avx512(a, u / kv_heads, u % kv_heads, mine);
                continue;
            }
            if (grouped == 1) {
                attend_kv_avx2(a, u / kv_heads, u % kv_heads, mine);
                continue;
            }
#endif
            attend_one(a, u / heads, u % heads, mine);
        }
    }
}

/* attend_decode(q, q_row, q_head, k, v, out, o_row, o_head, rows, lens, offs, slots, R, heads, kv_heads, dim,
   scale, threads, half): pointers as integers, strides in elements; half: the cache is fp16 */
PyObject *blink_attend_decode(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long pq, pk, pv, pout, prows, plens, poffs, pslots;
    long long q_row, q_head, o_row, o_head, r, heads, kv_heads, dim, threads;
    double scale;
    int half;
    if (!PyArg_ParseTuple(args, "KLLKKKLLKKKKLLLLdLp", &pq, &q_row, &q_head, &pk, &pv, &pout, &o_row, &o_head, &prows,
                          &plens, &poffs, &pslots, &r, &heads, &kv_heads, &dim, &scale, &threads, &half))
        return NULL;
    if (r < 0 || heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0 || dim <= 0 || dim > 256) {
        PyErr_SetString(PyExc_ValueError, "attend_decode: bad shapes (head_dim at most 256)");
        return NULL;
    }
    attn_t a = {(const float *)(uintptr_t)pq, q_row, q_head, (const void *)(uintptr_t)pk,
                (const void *)(uintptr_t)pv, (float *)(uintptr_t)pout, o_row, o_head,
                (const int64_t *)(uintptr_t)prows, (const int64_t *)(uintptr_t)plens,
                (const int64_t *)(uintptr_t)poffs, (const int64_t *)(uintptr_t)pslots, heads, kv_heads, dim,
                (float)scale, half};
    float *scratch = (float *)malloc(attend_scratch_floats(&a, r, (int)(threads > 0 ? threads : 1)) * sizeof(float));
    if (!scratch) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    attend_run(&a, r, (int)(threads > 0 ? threads : 1), scratch);
    Py_END_ALLOW_THREADS
    free(scratch);
    Py_RETURN_NONE;
}
