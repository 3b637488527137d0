/* blink.models._native: the w8a8 linear layer in one call (see blink/models/native.py for why and how).

   y[m, n] = float(sum_k xq[m, k] * w[n, k]) * (amax[m] * wscale[n]) (+ bias[n])

   x is fp32 [M, K]: each row is multiplied by `smooth` (if given), scaled to int8 by its own max |x| and rounded
   half to even, exactly as blink.models.quant.Int8Linear does it in torch ops; the sums are exact int32, so the
   result is bit for bit the torch path's, whatever M is and whichever instruction set computes it.

   Weights are packed in blocks of 16 output channels: [N/16][K/4][16][4] int8, so one 64-byte load holds 4
   consecutive k of 16 channels (what one AVX-512 VNNI vpdpbusd multiplies with 4 broadcast activations).
   Threads: OpenMP over the channel blocks; loaded after torch, this uses torch's own libgomp and thread pool. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define BLINK_X86 1
#endif

#define CH 16  /* output channels per packed block */
#define MB 4   /* activation rows sharing one pass over a weight block */
#define FEW_ROWS 16 /* up to this many rows, one block at a time (block_vnni); more: tiles of 4 blocks */

typedef struct {
    const uint8_t *xu;     /* [M, Kp] activations as int8 + 128 (unsigned), for VNNI */
    const int8_t *xs;      /* [M, Kp] signed activations, for AVX2 and the portable loop */
    const float *amax;     /* [M] */
    const int8_t *w;       /* packed [Np/16][Kp/4][16][4] */
    const int32_t *wsum;   /* [Np]: 128 * sum_k w[n, k], what the unsigned activations add */
    const float *wscale;   /* [N] */
    const float *bias;     /* [N] or NULL */
    float *y;              /* [M, N] */
    int64_t m, kp, n;
} job_t;

/* one block's epilogue: y = float(acc) * (amax * wscale) + bias, in that order (no FMA: -ffp-contract=off) */
static inline void store_block(const job_t *j, int64_t row, int64_t n0, const int32_t *acc) {
    float *y = j->y + row * j->n;
    int64_t count = j->n - n0 < CH ? j->n - n0 : CH;
    for (int64_t c = 0; c < count; c++) {
        float v = (float)acc[c] * (j->amax[row] * j->wscale[n0 + c]);
        if (j->bias) v = v + j->bias[n0 + c];
        y[n0 + c] = v;
    }
}

static void block_portable(const job_t *j, int64_t b) {
    const int8_t *w = j->w + b * j->kp * CH;
    for (int64_t r = 0; r < j->m; r++) {
        const int8_t *x = j->xs + r * j->kp;
        int32_t acc[CH] = {0};
        for (int64_t kb = 0; kb < j->kp / 4; kb++) {
            const int8_t *wk = w + kb * CH * 4;
            for (int c = 0; c < CH; c++) {
                int32_t s = 0;
                for (int i = 0; i < 4; i++) s += (int32_t)x[kb * 4 + i] * (int32_t)wk[c * 4 + i];
                acc[c] += s;
            }
        }
        store_block(j, r, b * CH, acc);
    }
}

#ifdef BLINK_X86
/* one block of 16 channels for `rows` (1-8) rows from row r: the block's weights are read as one stream, and
   each k-step feeds every row; enough independent accumulators to hide vpdpbusd's latency (a row's sum split in
   `chains` by k-step when rows are few: integer sums, so their order is free). `rows` is a constant where
   inlined. Further rows re-read the block from L1. */
#define PASS 6
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline))
static inline void rows_vnni(const job_t *j, int64_t b, int64_t r, const int rows) {
    const int chains = rows >= 4 ? 1 : rows >= 2 ? 2 : 4;
    const int8_t *w = j->w + b * j->kp * CH;
    const int64_t kb_n = j->kp / 4;
    const uint8_t *x = j->xu + r * j->kp;
    __m512i acc[4][PASS];
    for (int u = 0; u < chains; u++)
        for (int i = 0; i < rows; i++) acc[u][i] = _mm512_setzero_si512();
    int64_t kb = 0;
    for (; kb + chains <= kb_n; kb += chains)
        for (int u = 0; u < chains; u++) {
            const __m512i wv = _mm512_loadu_si512(w + (kb + u) * CH * 4);
            for (int i = 0; i < rows; i++)
                acc[u][i] = _mm512_dpbusd_epi32(acc[u][i], _mm512_set1_epi32(*(const int32_t *)(x + i * j->kp + (kb + u) * 4)), wv);
        }
    for (; kb < kb_n; kb++) {
        const __m512i wv = _mm512_loadu_si512(w + kb * CH * 4);
        for (int i = 0; i < rows; i++)
            acc[0][i] = _mm512_dpbusd_epi32(acc[0][i], _mm512_set1_epi32(*(const int32_t *)(x + i * j->kp + kb * 4)), wv);
    }
    const __m512i corr = _mm512_loadu_si512((const void *)(j->wsum + b * CH));
    int32_t out[CH];
    for (int i = 0; i < rows; i++) {
        __m512i sum = acc[0][i];
        for (int u = 1; u < chains; u++) sum = _mm512_add_epi32(sum, acc[u][i]);
        _mm512_storeu_si512((void *)out, _mm512_sub_epi32(sum, corr));
        store_block(j, r + i, b * CH, out);
    }
}

/* few rows (decode, speculative verification, small batches): one block, all rows, up to PASS at a time */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void block_vnni(const job_t *j, int64_t b) {
    for (int64_t r = 0; r < j->m; r += PASS) {
        switch (j->m - r < PASS ? j->m - r : PASS) {
            case 6: rows_vnni(j, b, r, 6); break;
            case 5: rows_vnni(j, b, r, 5); break;
            case 4: rows_vnni(j, b, r, 4); break;
            case 3: rows_vnni(j, b, r, 3); break;
            case 2: rows_vnni(j, b, r, 2); break;
            default: rows_vnni(j, b, r, 1); break;
        }
    }
}

/* several rows: a tile of GB blocks (64 channels) by `rows` rows, up to 16 independent accumulators, so each
   broadcast activation feeds GB multiplies and each weight load `rows`; `rows` is a constant where inlined */
#define GB 4
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline))
static inline void tile_vnni(const job_t *j, int64_t b0, int64_t r, const int rows) {
    const int64_t kb_n = j->kp / 4, stride = j->kp * CH;
    const uint8_t *x = j->xu + r * j->kp;
    const int8_t *w = j->w + b0 * stride;
    __m512i acc[GB][MB];
    for (int c = 0; c < GB; c++)
        for (int i = 0; i < rows; i++) acc[c][i] = _mm512_setzero_si512();
    for (int64_t kb = 0; kb < kb_n; kb++) {
        __m512i wv[GB];
        for (int c = 0; c < GB; c++) wv[c] = _mm512_loadu_si512(w + c * stride + kb * CH * 4);
        for (int i = 0; i < rows; i++) {
            const __m512i xb = _mm512_set1_epi32(*(const int32_t *)(x + i * j->kp + kb * 4));
            for (int c = 0; c < GB; c++) acc[c][i] = _mm512_dpbusd_epi32(acc[c][i], xb, wv[c]);
        }
    }
    int32_t out[CH];
    for (int c = 0; c < GB; c++) {
        const __m512i corr = _mm512_loadu_si512((const void *)(j->wsum + (b0 + c) * CH));
        for (int i = 0; i < rows; i++) {
            _mm512_storeu_si512((void *)out, _mm512_sub_epi32(acc[c][i], corr));
            store_block(j, r + i, (b0 + c) * CH, out);
        }
    }
}

__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void group_vnni(const job_t *j, int64_t g) {
    const int64_t blocks = (j->n + CH - 1) / CH, b0 = g * GB;
    if (blocks - b0 < GB) {  /* the last blocks of a layer whose block count is not a multiple of GB */
        for (int64_t b = b0; b < blocks; b++) block_vnni(j, b);
        return;
    }
    for (int64_t r = 0; r < j->m; r += MB) {
        switch (j->m - r < MB ? j->m - r : MB) {
            case 4: tile_vnni(j, b0, r, 4); break;
            case 3: tile_vnni(j, b0, r, 3); break;
            case 2: tile_vnni(j, b0, r, 2); break;
            default: tile_vnni(j, b0, r, 1); break;
        }
    }
}

/* AVX2: no unsigned-by-signed instruction that cannot saturate, so |x| times w with x's sign (each pair of
   products is at most 2 * 127 * 127, inside int16), then pairs of int16 summed to int32 */
__attribute__((target("avx2")))
static inline __m256i dot4_avx2(__m256i acc, __m256i xb, __m256i wv, __m256i ones) {
    const __m256i ax = _mm256_sign_epi8(xb, xb);
    const __m256i sw = _mm256_sign_epi8(wv, xb);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sw), ones));
}

__attribute__((target("avx2")))
static void block_avx2(const job_t *j, int64_t b) {
    const int8_t *w = j->w + b * j->kp * CH;
    const int64_t kb_n = j->kp / 4;
    const __m256i ones = _mm256_set1_epi16(1);
    int32_t out[CH];
    for (int64_t r = 0; r < j->m; r += MB) {
        const int64_t rows = j->m - r < MB ? j->m - r : MB;
        __m256i lo[MB], hi[MB];
        for (int i = 0; i < MB; i++) lo[i] = hi[i] = _mm256_setzero_si256();
        const int8_t *x = j->xs + r * j->kp;
        for (int64_t kb = 0; kb < kb_n; kb++) {
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + kb * CH * 4));
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + kb * CH * 4 + 32));
            for (int i = 0; i < rows; i++) {
                const __m256i xb = _mm256_set1_epi32(*(const int32_t *)(x + i * j->kp + kb * 4));
                lo[i] = dot4_avx2(lo[i], xb, w0, ones);
                hi[i] = dot4_avx2(hi[i], xb, w1, ones);
            }
        }
        for (int i = 0; i < rows; i++) {
            _mm256_storeu_si256((__m256i *)out, lo[i]);
            _mm256_storeu_si256((__m256i *)(out + 8), hi[i]);
            store_block(j, r + i, b * CH, out);
        }
    }
}
#endif

typedef void (*unit_fn)(const job_t *, int64_t);

/* the function that computes one unit of work (a block, or a tile of blocks) and how many units there are */
static unit_fn pick(int level, int64_t m, int64_t blocks, int64_t *units) {
    *units = blocks;
#ifdef BLINK_X86
    if (level >= 2) {
        if (m <= FEW_ROWS) return block_vnni;
        *units = (blocks + GB - 1) / GB;
        return group_vnni;
    }
    if (level >= 1) return block_avx2;
#endif
    (void)level;
    (void)m;
    return block_portable;
}

static int best_level(void) {
#ifdef BLINK_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni"))
        return 2;
    if (__builtin_cpu_supports("avx2")) return 1;
#endif
    return 0;
}

/* the torch path's quantization, element for element: x * smooth, then max |x| clamped to 1e-6, then
   round(x * (reciprocal(amax) * 127)) half to even (Python's 127.0 / tensor is a reciprocal, then a multiply).
   `tmp` holds the smoothed row ([k] floats per thread). */
static inline float row_scale(float mx) { return mx >= 1e-6f ? mx : 1e-6f; }

static inline void finish_row(int8_t *qs, uint8_t *qu, int64_t k, int64_t kp) {
    for (int64_t i = 0; i < k; i++) qu[i] = (uint8_t)(qs[i] ^ 0x80);
    for (int64_t i = k; i < kp; i++) {  /* padding: zero activations (128 unsigned) meet zero weights */
        qs[i] = 0;
        qu[i] = 0x80;
    }
}

static void quantize_portable(const float *row, const float *smooth, int64_t k, int64_t kp, float *amax, int8_t *qs,
                              uint8_t *qu, float *tmp) {
    float mx = 0.0f;
    for (int64_t i = 0; i < k; i++) {
        float v = smooth ? row[i] * smooth[i] : row[i];
        tmp[i] = v;
        float a = fabsf(v);
        mx = a > mx ? a : mx;
    }
    mx = row_scale(mx);
    *amax = mx;
    const float inv = (1.0f / mx) * 127.0f;
    for (int64_t i = 0; i < k; i++) {
        float q = nearbyintf(tmp[i] * inv);
        qs[i] = (int8_t)(q > 127.0f ? 127 : (q < -128.0f ? -128 : (int)q));
    }
    finish_row(qs, qu, k, kp);
}

#ifdef BLINK_X86
__attribute__((target("avx512f,avx512bw,avx512vl")))
static void quantize_avx512(const float *row, const float *smooth, int64_t k, int64_t kp, float *amax, int8_t *qs,
                            uint8_t *qu, float *tmp) {
    __m512 mx = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
        const __mmask16 mask = k - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (k - i)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(mask, row + i);
        if (smooth) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, smooth + i));
        _mm512_mask_storeu_ps(tmp + i, mask, v);
        mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
    }
    const float m = row_scale(_mm512_reduce_max_ps(mx));
    *amax = m;
    const __m512 inv = _mm512_set1_ps((1.0f / m) * 127.0f);
    for (int64_t i = 0; i < k; i += 16) {
        const __mmask16 mask = k - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (k - i)) - 1);
        const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, tmp + i), inv);
        const __m512i q = _mm512_cvtps_epi32(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        _mm_mask_storeu_epi8(qs + i, mask, _mm512_cvtsepi32_epi8(q));
    }
    finish_row(qs, qu, k, kp);
}
#endif

typedef void (*quantize_t)(const float *, const float *, int64_t, int64_t, float *, int8_t *, uint8_t *, float *);

static quantize_t quantize_fn(int level) {
#ifdef BLINK_X86
    if (level >= 2) return quantize_avx512;
#endif
    (void)level;
    return quantize_portable;
}

static void quantize_rows(const float *x, const float *smooth, int64_t m, int64_t k, int64_t kp, float *amax,
                          int8_t *xs, uint8_t *xu, float *tmp, int level, int threads) {
    const quantize_t quantize = quantize_fn(level);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && m >= 16)
    for (int64_t r = 0; r < m; r++) {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        quantize(x + r * k, smooth, k, kp, amax + r, xs + r * kp, xu + r * kp, tmp + t * k);
    }
}

static PyObject *linear(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long px, psmooth, pw, pwsum, pscale, pbias, py;
    long long m, k, n, kp, threads;
    int level;
    if (!PyArg_ParseTuple(args, "KLLKKKKKKLLLi", &px, &m, &k, &psmooth, &pw, &pwsum, &pscale, &pbias, &py, &n, &kp,
                          &threads, &level))
        return NULL;
    if (m < 0 || k <= 0 || n <= 0 || kp < k || kp % 4 != 0) {
        PyErr_SetString(PyExc_ValueError, "bad shapes");
        return NULL;
    }
    if (level < 0 || level > best_level()) {
        PyErr_Format(PyExc_ValueError, "instruction level %d is not available on this CPU", level);
        return NULL;
    }
    const int nt = (int)(threads > 0 ? threads : 1);
    /* one buffer: amax [m], a smoothed row [k] per thread, then signed and unsigned activations [m, kp] each */
    size_t bytes = (size_t)m * sizeof(float) + (size_t)nt * (size_t)k * sizeof(float) + 2 * (size_t)m * (size_t)kp;
    char *buf = (char *)malloc(bytes + 64);
    if (!buf) return PyErr_NoMemory();
    float *amax = (float *)buf;
    float *tmp = amax + m;
    int8_t *xs = (int8_t *)(tmp + (size_t)nt * k);
    uint8_t *xu = (uint8_t *)(xs + m * kp);
    job_t j = {xu, xs, amax, (const int8_t *)(uintptr_t)pw, (const int32_t *)(uintptr_t)pwsum,
               (const float *)(uintptr_t)pscale, (const float *)(uintptr_t)pbias, (float *)(uintptr_t)py, m, kp, n};
    int64_t units;
    const unit_fn fn = pick(level, m, (n + CH - 1) / CH, &units);
    Py_BEGIN_ALLOW_THREADS
    quantize_rows((const float *)(uintptr_t)px, (const float *)(uintptr_t)psmooth, m, k, kp, amax, xs, xu, tmp,
                  level, nt);
    if (m > 0) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && units > 1)
        for (int64_t u = 0; u < units; u++) fn(&j, u);
    }
    Py_END_ALLOW_THREADS
    free(buf);
    Py_RETURN_NONE;
}

static PyObject *get_best_level(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyLong_FromLong(best_level());
}

PyObject *blink_attend_decode(PyObject *self, PyObject *args); /* _attention.c */
PyObject *blink_q4_linear(PyObject *self, PyObject *args);     /* _q4.c */
PyObject *blink_q4_best_level(PyObject *self, PyObject *args);
PyObject *blink_decode_layers(PyObject *self, PyObject *args); /* _decode.c */

static PyMethodDef methods[] = {
    {"linear", linear, METH_VARARGS, "w8a8 linear on raw pointers (see blink.kernels)"},
    {"attend_decode", blink_attend_decode, METH_VARARGS, "decode attention over the paged cache (see _attention.c)"},
    {"best_level", get_best_level, METH_NOARGS, "this CPU's best level: 0 portable, 1 AVX2, 2 AVX-512 VNNI"},
    {"q4_linear", blink_q4_linear, METH_VARARGS, "4-bit linear on raw pointers (see _q4.c)"},
    {"q4_best_level", blink_q4_best_level, METH_NOARGS, "this CPU's best q4 level: 0 portable, 1 AVX2"},
    {"decode_layers", blink_decode_layers, METH_VARARGS, "a fused q4 model's decode step, all layers (see _decode.c)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
