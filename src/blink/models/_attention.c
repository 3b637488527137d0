/* Decode attention over the paged KV cache, part of blink.models._native (see blink/models/native.py).

   For each decode row (one query token) and query head:
     s_t = (q . k_t) * scale over the row's n keys, read in place from the cache through the sequence's slots
     p_t = exp(s_t - max s), o = (sum_t p_t v_t) / (sum_t p_t)
   Each (row, head) is computed alone, in a fixed order: its result does not depend on the other rows of the
   call, their number or lengths, nor on the threads. Dot products go through 16 explicit partial sums (what one
   AVX-512 register, or two AVX2 ones, hold), reduced in a fixed order, and the build forbids FMA contraction,
   so every instruction set the compiler picks (target_clones) computes the same bits. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#define LANES 16

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

typedef struct {
    const float *q;       /* [rows of the step][H][D] with strides */
    int64_t q_row, q_head;
    const float *k, *v;   /* cache [slots][KVH][D], contiguous */
    float *out;           /* [rows of the step][H][D] with strides */
    int64_t o_row, o_head;
    const int64_t *rows;  /* [R]: each decode row's index in the step */
    const int64_t *lens;  /* [R]: its number of keys */
    const int64_t *offs;  /* [R]: where its sequence's slots start in `slots` */
    const int64_t *slots;
    int64_t heads, kv_heads, dim;
    float scale;
} attn_t;

static inline float dot(const float *a, const float *b, int64_t d) {
    float part[LANES] = {0};
    for (int64_t i = 0; i + LANES <= d; i += LANES)
        for (int l = 0; l < LANES; l++) part[l] = part[l] + a[i + l] * b[i + l];
    for (int64_t i = d - d % LANES; i < d; i++) part[i % LANES] = part[i % LANES] + a[i] * b[i];
    for (int w = LANES / 2; w > 0; w /= 2)  /* a fixed tree */
        for (int l = 0; l < w; l++) part[l] = part[l] + part[l + w];
    return part[0];
}

/* one (decode row, query head); `s` is scratch for the row's scores */
CLONES
static void attend_one(const attn_t *a, int64_t r, int64_t h, float *s) {
    const int64_t n = a->lens[r], d = a->dim, kvh = h / (a->heads / a->kv_heads);
    const int64_t stride = a->kv_heads * d;
    const float *q = a->q + a->rows[r] * a->q_row + h * a->q_head;
    const int64_t *slot = a->slots + a->offs[r];
    float mx = -INFINITY;
    for (int64_t t = 0; t < n; t++) {
        s[t] = dot(q, a->k + slot[t] * stride + kvh * d, d) * a->scale;
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
        const float *v = a->v + slot[t] * stride + kvh * d;
        const float p = s[t];
        for (int64_t i = 0; i < d; i++) acc[i] = acc[i] + p * v[i];
    }
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < d; i++) o[i] = acc[i] * inv;
}

/* attend_decode(q, q_row, q_head, k, v, out, o_row, o_head, rows, lens, offs, slots, R, heads, kv_heads, dim,
   scale, threads): pointers as integers, strides in elements */
PyObject *blink_attend_decode(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long pq, pk, pv, pout, prows, plens, poffs, pslots;
    long long q_row, q_head, o_row, o_head, r, heads, kv_heads, dim, threads;
    double scale;
    if (!PyArg_ParseTuple(args, "KLLKKKLLKKKKLLLLdL", &pq, &q_row, &q_head, &pk, &pv, &pout, &o_row, &o_head, &prows,
                          &plens, &poffs, &pslots, &r, &heads, &kv_heads, &dim, &scale, &threads))
        return NULL;
    if (r < 0 || heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0 || dim <= 0 || dim > 256) {
        PyErr_SetString(PyExc_ValueError, "attend_decode: bad shapes (head_dim at most 256)");
        return NULL;
    }
    attn_t a = {(const float *)(uintptr_t)pq, q_row, q_head, (const float *)(uintptr_t)pk,
                (const float *)(uintptr_t)pv, (float *)(uintptr_t)pout, o_row, o_head,
                (const int64_t *)(uintptr_t)prows, (const int64_t *)(uintptr_t)plens,
                (const int64_t *)(uintptr_t)poffs, (const int64_t *)(uintptr_t)pslots, heads, kv_heads, dim,
                (float)scale};
    int64_t longest = 1, keys = 0;
    for (int64_t i = 0; i < r; i++) {
        longest = a.lens[i] > longest ? a.lens[i] : longest;
        keys += a.lens[i];
    }
    const int nt = (int)(threads > 0 ? threads : 1);
    float *scratch = (float *)malloc((size_t)nt * (size_t)longest * sizeof(float));
    if (!scratch) return PyErr_NoMemory();
    const int64_t units = r * heads;
    Py_BEGIN_ALLOW_THREADS
    /* threads only when there is enough to share: a parallel region costs a few microseconds */
#pragma omp parallel num_threads(nt) if (nt > 1 && keys * heads * dim >= 32768)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units; u++) attend_one(&a, u / heads, u % heads, scratch + (size_t)t * longest);
    }
    Py_END_ALLOW_THREADS
    free(scratch);
    Py_RETURN_NONE;
}
