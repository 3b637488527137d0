/* What the parts of blink.models._native share: the q4 linear layer (_q4.c) and decode attention (_attention.c)
   as plain C calls that need no Python (no GIL), so the fused decode step (_decode.c) can run a whole layer stack
   in one call with the same arithmetic as the Python-level kernels. */

#ifndef BLINK_KERNELS_H
#define BLINK_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* q4: y [m, n] = prologue(x) W^T (+ bias) (+ res); x [m, k] ([m, 2k] for the SwiGLU prologue); see _q4.c */
enum { Q4_PRO_NONE = 0, Q4_PRO_RMSNORM = 1, Q4_PRO_SWIGLU = 2 };

typedef struct {
    const float *x;
    int64_t m, k;
    const uint8_t *w;
    const float *bias;  /* [n] or NULL */
    float *y;
    int64_t n;
    int threads, level, mode;
    const float *norm;  /* [k]: the RMSNorm prologue's weight */
    float eps;
    const float *res;   /* [m, n] or NULL; may be y itself */
} q4_call;

int q4_level(void);
size_t q4_scratch_bytes(int64_t m, int64_t k, int threads);
void q4_run(const q4_call *c, void *scratch);

/* decode attention: each row's query attends to its keys read in place from the paged cache; see _attention.c */
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

size_t attend_scratch_floats(const attn_t *a, int64_t r, int threads);
void attend_run(const attn_t *a, int64_t r, int threads, float *scratch);

#endif
