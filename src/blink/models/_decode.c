/* The decode step of a fused q4 Llama-shaped model: every layer in one call, part of blink.models._native (see
   blink/engine/fused_decode.py for when the engine takes it).

   Per layer, for the step's M decode rows, what the Python-level path (llama.py's fused DecoderLayer with
   attention.py's NativeDecodeRows) computes, with the same kernels and the same float operations in the same
   order (compiled without FMA contraction), so the results are bit for bit the same (tested):
     qkv  = q4(rmsnorm(x)) (+ bias)
     q, k = v * cos + roll(v, D/2) * sin       (llama.py's rotary; sin signed)
     cache[slot] = k, v                        (rounded to fp16, nearest even, for an fp16 cache)
     a    = each row's attention over its keys in the cache (_attention.c)
     x    = q4(a) (+ bias) + x
     gu   = q4(rmsnorm(x)) (+ bias)
     x    = q4(silu(gu[:, :I]) * gu[:, I:]) (+ bias) + x
   What it saves is the Python between the kernels: ~10 calls and small torch ops a layer.

   Before each layer below `cut` it reads one byte, the step's interrupt (set from another thread): set, it stops
   there and returns that layer. Nothing outside the step's own cache slots has changed then, and those are
   written again when the step is run again. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_kernels.h"

/* per layer, a row of pointers (as int64) to its tensors; a missing bias is 0 */
enum { T_QKV_W, T_QKV_B, T_NORM1, T_O_W, T_O_B, T_GU_W, T_GU_B, T_NORM2, T_DOWN_W, T_DOWN_B, T_KC, T_VC, T_FIELDS };

#define PTR(type, v) ((type)(uintptr_t)(v))

/* rotary over one row's q and k heads [heads][dim] in place: v <- v * cos + roll(v, dim / 2) * sin */
static void rotate(float *v, int64_t heads, int64_t dim, const float *cos, const float *sin, float *tmp) {
    const int64_t half = dim / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *x = v + h * dim;
        memcpy(tmp, x, (size_t)dim * sizeof(float));
        for (int64_t i = 0; i < dim; i++) {
            const float a = tmp[i] * cos[i];
            const float b = tmp[i < half ? i + half : i - half] * sin[i];
            x[i] = a + b;
        }
    }
}

/* n floats into a cache tensor at element `at`: copied, or rounded to fp16 */
static void store_kv(void *cache, int64_t at, const float *src, int64_t n, int half) {
    if (!half) {
        memcpy((float *)cache + at, src, (size_t)n * sizeof(float));
        return;
    }
    uint16_t *dst = (uint16_t *)cache + at;
    for (int64_t i = 0; i < n; i++) dst[i] = float_to_half(src[i]);
}

/* decode_layers(x, m, hidden, heads, kv_heads, dim, inter, layers, table, eps, cos, sin, positions, slot_mapping,
   rows, lens, offs, slots, scale, threads, level, flag, cut, half) -> the layers run (== layers unless
   interrupted). x [m, hidden] fp32 is updated in place; cos/sin the rotary tables [positions][dim]; the index
   arrays int64; half: the KV cache is fp16. */
PyObject *blink_decode_layers(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long px, ptable, pcos, psin, ppos, pslot, prows, plens, poffs, pslots, pflag;
    long long m, hidden, heads, kv_heads, dim, inter, layers, threads, cut;
    int level, half;
    float eps;
    double scale;
    if (!PyArg_ParseTuple(args, "KLLLLLLLKfKKKKKKKKdLiKLp", &px, &m, &hidden, &heads, &kv_heads, &dim, &inter,
                          &layers, &ptable, &eps, &pcos, &psin, &ppos, &pslot, &prows, &plens, &poffs, &pslots, &scale,
                          &threads, &level, &pflag, &cut, &half))
        return NULL;
    if (m <= 0 || layers < 0 || heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0 || dim <= 0 || dim > 256 ||
        dim % 2 != 0 || hidden % 32 != 0 || (heads * dim) % 32 != 0 || inter % 32 != 0) {
        PyErr_SetString(PyExc_ValueError, "decode_layers: bad shapes");
        return NULL;
    }
    if (level < 0 || level > q4_level()) {
        PyErr_Format(PyExc_ValueError, "instruction level %d is not available for q4 on this CPU", level);
        return NULL;
    }
    const int nt = (int)(threads > 0 ? threads : 1);
    const int64_t width = (heads + 2 * kv_heads) * dim, qk = heads + kv_heads, row_kv = kv_heads * dim;
    float *x = PTR(float *, px);
    const int64_t(*table)[T_FIELDS] = PTR(const int64_t(*)[T_FIELDS], ptable);
    const float *cos = PTR(const float *, pcos), *sin = PTR(const float *, psin);
    const int64_t *positions = PTR(const int64_t *, ppos), *slot = PTR(const int64_t *, pslot);
    volatile const uint8_t *flag = PTR(volatile const uint8_t *, pflag);
    attn_t a = {NULL, width, dim, NULL, NULL, NULL, heads * dim, dim, PTR(const int64_t *, prows),
                PTR(const int64_t *, plens), PTR(const int64_t *, poffs), PTR(const int64_t *, pslots), heads,
                kv_heads, dim, (float)scale, half};
    /* one buffer: qkv [m, width], attention [m, heads * dim], gate/up [m, 2 * inter], a rotary row [dim], the
       attention's scratch, then the q4 layers' (sized for the widest input) */
    const int64_t widest = inter > hidden ? (inter > heads * dim ? inter : heads * dim) : (hidden > heads * dim ? hidden : heads * dim);
    const size_t floats = (size_t)m * (width + heads * dim + 2 * inter) + (size_t)dim + attend_scratch_floats(&a, m, nt);
    char *buf = (char *)malloc(floats * sizeof(float) + q4_scratch_bytes(m, widest, nt));
    if (!buf) return PyErr_NoMemory();
    float *qkv = (float *)buf, *att = qkv + m * width, *gu = att + m * heads * dim, *tmp = gu + m * 2 * inter;
    float *scores = tmp + dim;
    void *q4s = buf + floats * sizeof(float);
    a.q = qkv;
    a.out = att;
    long long done = layers;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t l = 0; l < layers; l++) {
        if (flag && l < cut && *flag) {
            done = l;
            break;
        }
        const int64_t *t = table[l];
        const q4_call c_qkv = {x, m, hidden, PTR(const uint8_t *, t[T_QKV_W]), PTR(const float *, t[T_QKV_B]), qkv,
                               width, nt, level, Q4_PRO_RMSNORM, PTR(const float *, t[T_NORM1]), eps, NULL};
        q4_run(&c_qkv, q4s);
        void *kc = PTR(void *, t[T_KC]), *vc = PTR(void *, t[T_VC]);
        for (int64_t r = 0; r < m; r++) {
            float *v = qkv + r * width;
            rotate(v, qk, dim, cos + positions[r] * dim, sin + positions[r] * dim, tmp);
            store_kv(kc, slot[r] * row_kv, v + heads * dim, row_kv, half);
            store_kv(vc, slot[r] * row_kv, v + qk * dim, row_kv, half);
        }
        a.k = kc;
        a.v = vc;
        attend_run(&a, m, nt, scores);
        const q4_call c_o = {att, m, heads * dim, PTR(const uint8_t *, t[T_O_W]), PTR(const float *, t[T_O_B]), x,
                             hidden, nt, level, Q4_PRO_NONE, NULL, 0.0f, x};
        q4_run(&c_o, q4s);
        const q4_call c_gu = {x, m, hidden, PTR(const uint8_t *, t[T_GU_W]), PTR(const float *, t[T_GU_B]), gu,
                              2 * inter, nt, level, Q4_PRO_RMSNORM, PTR(const float *, t[T_NORM2]), eps, NULL};
        q4_run(&c_gu, q4s);
        const q4_call c_down = {gu, m, inter, PTR(const uint8_t *, t[T_DOWN_W]), PTR(const float *, t[T_DOWN_B]), x,
                                hidden, nt, level, Q4_PRO_SWIGLU, NULL, 0.0f, x};
        q4_run(&c_down, q4s);
    }
    Py_END_ALLOW_THREADS
    free(buf);
    return PyLong_FromLongLong(done);
}
