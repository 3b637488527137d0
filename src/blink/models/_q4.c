/* blink.models._native: the 4-bit linear layer (q4), one call (see blink/models/q4.py's Q4Linear).

   Weights: per output channel n, per group g of 32 inputs, w[n, k] = d[n, g] * q[n, k] + m[n, g] with q in 0..15
   and d, m fp16 (llama.cpp's Q4_1 block, which a Q4_1 GGUF's weights round-trip to exactly).
   Activations: per row, per group of 32, x[k] ~ dx[g] * xq[k] with xq int8 (llama.cpp's Q8_1 block: dx = max|x| /
   127, and sx[g] = dx[g] * sum_k xq[k], for the m terms).

       y[r, n] = sum_g ( float(sum_{k in g} xq[r, k] * q[n, k]) * (dx[r, g] * d[n, g]) + m[n, g] * sx[r, g] )

   The inner sums are exact int32; the float operations run in the same order for every (r, n) at every
   instruction level and batch size (compiled without FMA contraction): batch-invariant, and the AVX2 and AVX-512
   VNNI paths are bit for bit the portable one (tested at every level the CPU has).

   Layout, per block of 16 output channels and group of 32 inputs, 320 bytes: 8 steps of 4 inputs x 16 channels
   as nibbles (byte c * 4 + i of a step holds input i of channel c in its low nibble and of channel c + 8 in its
   high one: one 32-byte load gives two vectors of 8 channels x 4 inputs), then d[16] and m[16] as fp16. A block's
   groups follow each other, so a block is one stream.

   Fused around the product (one call where torch ran five to ten small ops), in the same order for every row:
     prologue RMSNORM  x <- (x * (1 / sqrt(mean(x^2) + eps))) * norm_weight   (the layer's norm before it)
     prologue SWIGLU   x <- silu(x[:, :K]) * x[:, K:2K] with silu(g) = g / (1 + exp(-g))   (input [M, 2K])
     epilogue          y <- (acc + bias) + residual                                          (the residual add) */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define Q4_X86 1
#endif

#define Q4_CH 16         /* output channels per block */
#define Q4_GROUP 32      /* inputs per scale */
#define Q4_NIBBLES 256   /* bytes of nibbles per (block, group) */
#define Q4_UNIT 320      /* bytes per (block, group): nibbles, then d[16], m[16] as fp16 */
#define Q4_ROWS 4        /* activation rows sharing one pass over a block */

enum { PRO_NONE = Q4_PRO_NONE, PRO_RMSNORM = Q4_PRO_RMSNORM, PRO_SWIGLU = Q4_PRO_SWIGLU };

typedef struct {
    const int8_t *xq;   /* [M, K] */
    const float *dx;    /* [M, G] */
    const float *sx;    /* [M, G] */
    const uint8_t *w;   /* [N/16][G][320] */
    const float *bias;  /* [N] or NULL */
    const float *res;   /* [M, N] or NULL: added to the output */
    float *y;           /* [M, N] */
    int64_t m, k, n, groups;
} q4_job;

static inline void q4_store(const q4_job *j, int64_t row, int64_t n0, const float *acc) {
    float *y = j->y + row * j->n;
    const float *res = j->res ? j->res + row * j->n : NULL;
    const int64_t count = j->n - n0 < Q4_CH ? j->n - n0 : Q4_CH;
    for (int64_t c = 0; c < count; c++) {
        float v = j->bias ? acc[c] + j->bias[n0 + c] : acc[c];
        y[n0 + c] = res ? v + res[n0 + c] : v;
    }
}

static void q4_block_portable(const q4_job *j, int64_t b) {
    for (int64_t r = 0; r < j->m; r++) {
        float acc[Q4_CH] = {0};
        for (int64_t g = 0; g < j->groups; g++) {
            const uint8_t *unit = j->w + (b * j->groups + g) * Q4_UNIT;
            const uint16_t *scales = (const uint16_t *)(unit + Q4_NIBBLES);
            const int8_t *x = j->xq + r * j->k + g * Q4_GROUP;
            const float dx = j->dx[r * j->groups + g], sx = j->sx[r * j->groups + g];
            for (int c = 0; c < Q4_CH; c++) {
                int32_t sum = 0;
                for (int s = 0; s < 8; s++)
                    for (int i = 0; i < 4; i++) {
                        const uint8_t byte = unit[s * 32 + (c & 7) * 4 + i];
                        const int32_t q = c < 8 ? (byte & 0x0F) : (byte >> 4);
                        sum += q * (int32_t)x[s * 4 + i];
                    }
                const float d = half_to_float(scales[c]), mn = half_to_float(scales[Q4_CH + c]);
                acc[c] = acc[c] + (float)sum * (dx * d);
                acc[c] = acc[c] + mn * sx;
            }
        }
        q4_store(j, r, b * Q4_CH, acc);
    }
}

#ifdef Q4_X86
/* `rows` (1-4) rows from r over one block: each 32-byte step of nibbles is unpacked once for all rows; maddubs
   takes the weights as unsigned (0..15) and the activations as signed (-127..127), so no sign juggling and no
   saturation: a pair sums to at most 2 * 15 * 127 = 3810 in magnitude, so a group's 8 steps add up in int16
   (at most 30480) and are widened to int32 once per group, not once per step: the same exact sums, fewer
   instructions (prefill, where the kernel is compute-bound, measured ~1.3x faster) */
__attribute__((target("avx2,f16c"), always_inline))
static inline void q4_rows_avx2(const q4_job *j, int64_t b, int64_t r, const int rows) {
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[Q4_ROWS][2];
    for (int i = 0; i < rows; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < j->groups; g++) {
        const uint8_t *unit = j->w + (b * j->groups + g) * Q4_UNIT;
        __m256i sum[Q4_ROWS][2];
        for (int i = 0; i < rows; i++) sum[i][0] = sum[i][1] = _mm256_setzero_si256();
        for (int s = 0; s < 8; s++) {  /* int16 sums: see above */
            const __m256i v = _mm256_loadu_si256((const __m256i *)(unit + s * 32));
            const __m256i w0 = _mm256_and_si256(v, low), w1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            for (int i = 0; i < rows; i++) {
                const int8_t *x = j->xq + (r + i) * j->k + g * Q4_GROUP + s * 4;
                const __m256i xb = _mm256_set1_epi32(*(const int32_t *)x);
                sum[i][0] = _mm256_add_epi16(sum[i][0], _mm256_maddubs_epi16(w0, xb));
                sum[i][1] = _mm256_add_epi16(sum[i][1], _mm256_maddubs_epi16(w1, xb));
            }
        }
        for (int i = 0; i < rows; i++) {
            sum[i][0] = _mm256_madd_epi16(sum[i][0], ones);
            sum[i][1] = _mm256_madd_epi16(sum[i][1], ones);
        }
        const uint16_t *scales = (const uint16_t *)(unit + Q4_NIBBLES);
        const __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)scales));
        const __m256 d1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + 8)));
        const __m256 m0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + 16)));
        const __m256 m1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + 24)));
        for (int i = 0; i < rows; i++) {
            const __m256 dx = _mm256_set1_ps(j->dx[(r + i) * j->groups + g]);
            const __m256 sx = _mm256_set1_ps(j->sx[(r + i) * j->groups + g]);
            acc[i][0] = _mm256_add_ps(acc[i][0], _mm256_mul_ps(_mm256_cvtepi32_ps(sum[i][0]), _mm256_mul_ps(dx, d0)));
            acc[i][1] = _mm256_add_ps(acc[i][1], _mm256_mul_ps(_mm256_cvtepi32_ps(sum[i][1]), _mm256_mul_ps(dx, d1)));
            acc[i][0] = _mm256_add_ps(acc[i][0], _mm256_mul_ps(m0, sx));
            acc[i][1] = _mm256_add_ps(acc[i][1], _mm256_mul_ps(m1, sx));
        }
    }
    float out[Q4_CH];
    for (int i = 0; i < rows; i++) {
        _mm256_storeu_ps(out, acc[i][0]);
        _mm256_storeu_ps(out + 8, acc[i][1]);
        q4_store(j, r + i, b * Q4_CH, out);
    }
}

__attribute__((target("avx2,f16c")))
static void q4_block_avx2(const q4_job *j, int64_t b) {
    for (int64_t r = 0; r < j->m; r += Q4_ROWS) {
        switch (j->m - r < Q4_ROWS ? j->m - r : Q4_ROWS) {
            case 4: q4_rows_avx2(j, b, r, 4); break;
            case 3: q4_rows_avx2(j, b, r, 3); break;
            case 2: q4_rows_avx2(j, b, r, 2); break;
            default: q4_rows_avx2(j, b, r, 1); break;
        }
    }
}

/* AVX-512 VNNI: a step's 32 bytes become one vector of 16 channels x 4 inputs (the low nibbles in the lower half,
   the high ones in the upper: channel c's lane is c), and one vpdpbusd per step and row adds its four products
   into the channel's int32 sum, which is the AVX2 path's group sum exactly (no saturation: vpdpbusd, not
   vpdpbusds). The float operations are the AVX2 path's, lane for lane in the same order: bit for bit the same
   results. A group's 8 unpacked steps stay in registers for up to Q4_ROWS_VNNI rows. */
#define Q4_ROWS_VNNI 8
__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,f16c"), always_inline))
static inline void q4_rows_vnni(const q4_job *j, int64_t b, int64_t r, const int rows) {
    const __m512i low = _mm512_set1_epi8(0x0F), shift = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
    __m512 acc[Q4_ROWS_VNNI];
    for (int i = 0; i < rows; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < j->groups; g++) {
        const uint8_t *unit = j->w + (b * j->groups + g) * Q4_UNIT;
        __m512i w[8], sum[Q4_ROWS_VNNI];
        for (int s = 0; s < 8; s++) {
            const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(unit + s * 32)));
            w[s] = _mm512_and_si512(_mm512_srlv_epi64(v, shift), low);
        }
        for (int i = 0; i < rows; i++) sum[i] = _mm512_setzero_si512();
        for (int s = 0; s < 8; s++)
            for (int i = 0; i < rows; i++) {
                const int8_t *x = j->xq + (r + i) * j->k + g * Q4_GROUP + s * 4;
                sum[i] = _mm512_dpbusd_epi32(sum[i], w[s], _mm512_set1_epi32(*(const int32_t *)x));
            }
        const uint16_t *scales = (const uint16_t *)(unit + Q4_NIBBLES);
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)scales));
        const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + Q4_CH)));
        for (int i = 0; i < rows; i++) {
            const __m512 dx = _mm512_set1_ps(j->dx[(r + i) * j->groups + g]);
            const __m512 sx = _mm512_set1_ps(j->sx[(r + i) * j->groups + g]);
            acc[i] = _mm512_add_ps(acc[i], _mm512_mul_ps(_mm512_cvtepi32_ps(sum[i]), _mm512_mul_ps(dx, d)));
            acc[i] = _mm512_add_ps(acc[i], _mm512_mul_ps(mn, sx));
        }
    }
    float out[Q4_CH];
    for (int i = 0; i < rows; i++) {
        _mm512_storeu_ps(out, acc[i]);
        q4_store(j, r + i, b * Q4_CH, out);
    }
}

__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,f16c")))
static void q4_block_vnni(const q4_job *j, int64_t b) {
    for (int64_t r = 0; r < j->m; r += Q4_ROWS_VNNI) {
        switch (j->m - r < Q4_ROWS_VNNI ? j->m - r : Q4_ROWS_VNNI) {
            case 8: q4_rows_vnni(j, b, r, 8); break;
            case 7: q4_rows_vnni(j, b, r, 7); break;
            case 6: q4_rows_vnni(j, b, r, 6); break;
            case 5: q4_rows_vnni(j, b, r, 5); break;
            case 4: q4_rows_vnni(j, b, r, 4); break;
            case 3: q4_rows_vnni(j, b, r, 3); break;
            case 2: q4_rows_vnni(j, b, r, 2); break;
            default: q4_rows_vnni(j, b, r, 1); break;
        }
    }
}
#endif

/* one row's groups to int8: dx = max|x| / 127, xq = round(x * (127 / max|x|)) half to even, sx = dx * sum(xq) */
static void q4_quantize_row(const float *x, int64_t k, int8_t *xq, float *dx, float *sx) {
    for (int64_t g = 0; g < k / Q4_GROUP; g++) {
        const float *v = x + g * Q4_GROUP;
        float amax = 0.0f;
        for (int i = 0; i < Q4_GROUP; i++) {
            const float a = fabsf(v[i]);
            amax = a > amax ? a : amax;
        }
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t total = 0;
        for (int i = 0; i < Q4_GROUP; i++) {
            const float q = nearbyintf(v[i] * inv);
            const int8_t qi = (int8_t)(q > 127.0f ? 127 : (q < -127.0f ? -127 : (int)q));
            xq[g * Q4_GROUP + i] = qi;
            total += qi;
        }
        dx[g] = amax / 127.0f;
        sx[g] = dx[g] * (float)total;
    }
}

/* row r's input after the prologue: `x` itself, or `tmp` filled with the normalised / gated row */
static const float *q4_prologue(const float *x, int64_t r, int64_t k, int mode, const float *norm, float eps,
                                float *tmp) {
    if (mode == PRO_RMSNORM) {
        const float *v = x + r * k;
        float ss = 0.0f;
        for (int64_t i = 0; i < k; i++) ss = ss + v[i] * v[i];
        const float inv = 1.0f / sqrtf(ss / (float)k + eps);
        for (int64_t i = 0; i < k; i++) tmp[i] = (v[i] * inv) * norm[i];
        return tmp;
    }
    if (mode == PRO_SWIGLU) {
        const float *gate = x + r * 2 * k, *up = gate + k;
        for (int64_t i = 0; i < k; i++) tmp[i] = (gate[i] / (1.0f + expf(-gate[i]))) * up[i];
        return tmp;
    }
    return x + r * k;
}

static int q4_best_level(void) {
#ifdef Q4_X86
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("f16c")) return 0;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni"))
        return 2;
    return 1;
#endif
    return 0;
}

int q4_level(void) { return q4_best_level(); }

/* bytes of scratch `q4_run` needs: dx and sx [m, groups], a prologue row [k] per thread, the int8 rows [m, k] */
size_t q4_scratch_bytes(int64_t m, int64_t k, int threads) {
    const int nt = threads > 0 ? threads : 1;
    return ((size_t)2 * m * (k / Q4_GROUP) + (size_t)nt * k) * sizeof(float) + (size_t)m * k + 64;
}

/* one call of the layer; no Python (callable without the GIL). The caller checked the shapes and level. */
void q4_run(const q4_call *c, void *scratch) {
    const int64_t m = c->m, k = c->k, groups = k / Q4_GROUP;
    const int nt = c->threads > 0 ? c->threads : 1;
    float *dx = (float *)scratch, *sx = dx + m * groups, *tmp = sx + m * groups;
    int8_t *xq = (int8_t *)(tmp + (size_t)nt * k);
    q4_job j = {xq, dx, sx, c->w, c->bias, c->res, c->y, m, k, c->n, groups};
    const int64_t blocks = (c->n + Q4_CH - 1) / Q4_CH;
    void (*fn)(const q4_job *, int64_t) = q4_block_portable;
#ifdef Q4_X86
    if (c->level >= 2) fn = q4_block_vnni;
    else if (c->level >= 1) fn = q4_block_avx2;
#endif
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && m >= 16)
    for (int64_t r = 0; r < m; r++) {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        const float *row = q4_prologue(c->x, r, k, c->mode, c->norm, c->eps, tmp + (size_t)t * k);
        q4_quantize_row(row, k, xq + r * k, dx + r * groups, sx + r * groups);
    }
    if (m > 0) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && blocks > 1)
        for (int64_t b = 0; b < blocks; b++) fn(&j, b);
    }
}

PyObject *blink_q4_linear(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long px, pw, pbias, py, pnorm, pres;
    long long m, k, n, threads;
    int level, mode;
    float eps;
    if (!PyArg_ParseTuple(args, "KLLKKKLLiiKfK", &px, &m, &k, &pw, &pbias, &py, &n, &threads, &level, &mode, &pnorm,
                          &eps, &pres))
        return NULL;
    if (m < 0 || k <= 0 || n <= 0 || k % Q4_GROUP != 0) {
        PyErr_SetString(PyExc_ValueError, "bad shapes (inputs must be a multiple of 32)");
        return NULL;
    }
    if (mode < PRO_NONE || mode > PRO_SWIGLU || (mode == PRO_RMSNORM && !pnorm)) {
        PyErr_SetString(PyExc_ValueError, "bad prologue");
        return NULL;
    }
    if (level < 0 || level > q4_best_level()) {
        PyErr_Format(PyExc_ValueError, "instruction level %d is not available for q4 on this CPU", level);
        return NULL;
    }
    const int nt = (int)(threads > 0 ? threads : 1);
    q4_call c = {(const float *)(uintptr_t)px, m, k, (const uint8_t *)(uintptr_t)pw, (const float *)(uintptr_t)pbias,
                 (float *)(uintptr_t)py, n, nt, level, mode, (const float *)(uintptr_t)pnorm, eps,
                 (const float *)(uintptr_t)pres};
    void *buf = malloc(q4_scratch_bytes(m, k, nt));
    if (!buf) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    q4_run(&c, buf);
    Py_END_ALLOW_THREADS
    free(buf);
    Py_RETURN_NONE;
}

PyObject *blink_q4_best_level(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyLong_FromLong(q4_best_level());
}
