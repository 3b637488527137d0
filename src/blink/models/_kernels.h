/* What the parts of blink.models._native share: the q4 linear layer (_q4.c) and decode attention (_attention.c)
   as plain C calls that need no Python (no GIL), so the fused decode step (_decode.c) can run a whole layer stack
   in one call with the same arithmetic as the Python-level kernels. */

#ifndef BLINK_KERNELS_H
#define BLINK_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* fp16 <-> fp32 in portable C. half_to_float is exact; float_to_half rounds to nearest even (subnormals, overflow
   to infinity, NaN to 0x7E00), as torch's .to(torch.float16) on the CPU: a K/V row the native decode step writes is
   bit for bit the one the module path writes. */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        exp = 113;
        while (!(mant & 0x400)) {
            mant <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* the float unit does the rounding: |f| scaled so that adding a power of two (2^(exponent + 13), at least 2^-1 for
   subnormals) leaves the half's 10 mantissa bits, rounded to nearest even, in the sum's low bits */
static inline uint16_t float_to_half(float f) {
    uint32_t w;
    memcpy(&w, &f, sizeof w);
    const uint32_t twice = w + w, sign = w & 0x80000000u;
    float mag;
    const uint32_t abs_bits = w & 0x7FFFFFFFu;
    memcpy(&mag, &abs_bits, sizeof mag);
    mag = (mag * 0x1.0p+112f) * 0x1.0p-110f; /* overflows to infinity past the half's range */
    uint32_t bias = twice & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    const uint32_t offset_bits = (bias >> 1) + 0x07800000u;
    float offset;
    memcpy(&offset, &offset_bits, sizeof offset);
    const float sum = offset + mag;
    uint32_t bits;
    memcpy(&bits, &sum, sizeof bits);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (twice > 0xFF000000u ? 0x7E00u : nonsign));
}

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
    const void *k, *v;    /* cache [slots][KVH][D], contiguous: float, or fp16 (uint16_t) where `half` */
    float *out;           /* [rows of the step][H][D] with strides */
    int64_t o_row, o_head;
    const int64_t *rows;  /* [R]: each decode row's index in the step */
    const int64_t *lens;  /* [R]: its number of keys */
    const int64_t *offs;  /* [R]: where its sequence's slots start in `slots` */
    const int64_t *slots;
    int64_t heads, kv_heads, dim;
    float scale;
    int half;
} attn_t;

size_t attend_scratch_floats(const attn_t *a, int64_t r, int threads);
void attend_run(const attn_t *a, int64_t r, int threads, float *scratch);

#endif
