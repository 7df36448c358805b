// kiln's CUDA kernels, compiled at start-up with NVRTC (no CUDA headers: f16 conversions are
// inline PTX). Semantics follow crates/model/src/forward.rs (the CPU default path); where the CPU
// sums in f64 (RMSNorm, SwiGLU, RoPE rotation, the softmax denominator) these kernels do too.
//
// Weights stay in their GGUF block formats. Every format is decoded by one function, deq8<T>,
// that produces 8 consecutive weights starting at element e0 (a multiple of 8) of a row, so the
// matrix-vector kernel, the dequantize-to-f16 kernel (batched prompts, cuBLAS) and the embedding
// lookup share one decoder per type.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long usize;

// GGML type ids (gguf ggml_type), used as template arguments.
#define T_F32 0
#define T_F16 1
#define T_Q4_0 2
#define T_Q4_1 3
#define T_Q5_0 6
#define T_Q5_1 7
#define T_Q8_0 8
#define T_Q2_K 10
#define T_Q3_K 11
#define T_Q4_K 12
#define T_Q5_K 13
#define T_Q6_K 14
#define T_IQ4_NL 20
#define T_IQ4_XS 23
#define T_BF16 30
// Layouts repacked at upload for the fast matrix-vector kernel (not GGML ids): rows of Q4_0 / Q8_0
// blocks regrouped 8 blocks at a time as [8 x quants][8 x f16 d], so that each block's quants start
// 16-byte aligned (needs a multiple of 8 blocks per row; row_bytes unchanged).
#define T_Q4_0R 102
#define T_Q8_0R 108

// Positions of a chunk's rows in a paged KV cache. Row t is at position pos[t] of its sequence,
// whose block table starts at bt[tbl[t]]: position s of that sequence lives in row
// bt[tbl[t] + s / KV_BLOCK] * KV_BLOCK + s % KV_BLOCK of each layer's K and V pools. One sequence
// with the identity table is a contiguous cache. KV_BLOCK is set at compile time (-DKV_BLOCK).
#ifndef KV_BLOCK
#define KV_BLOCK 16
#endif
struct KvMap {
    const int* pos;
    const int* tbl;
    const int* bt;
};
__device__ __forceinline__ usize kv_row(const KvMap& m, int t, int s) {
    return (usize)m.bt[m.tbl[t] + s / KV_BLOCK] * KV_BLOCK + (usize)(s % KV_BLOCK);
}

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float bf2f(u16 h) { return __uint_as_float(((u32)h) << 16); }

// Loads of little-endian fields at the alignment the block layout guarantees.
__device__ __forceinline__ u16 ld16(const u8* p) { return *(const u16*)p; }
__device__ __forceinline__ u32 ld32_a2(const u8* p) { return (u32)ld16(p) | ((u32)ld16(p + 2) << 16); }
__device__ __forceinline__ u32 ld32_a4(const u8* p) { return *(const u32*)p; }
__device__ __forceinline__ uint2 ld64_a2(const u8* p) { return make_uint2(ld32_a2(p), ld32_a2(p + 4)); }
__device__ __forceinline__ uint2 ld64_a4(const u8* p) { return make_uint2(ld32_a4(p), ld32_a4(p + 4)); }
__device__ __forceinline__ uint2 ld64_a8(const u8* p) { return *(const uint2*)p; }
__device__ __forceinline__ u32 byte_at(uint2 v, int k) { return ((k < 4 ? v.x : v.y) >> (8 * (k & 3))) & 0xFF; }

// IQ4_NL's 16 non-linear levels, packed as int8 bytes for __byte_perm lookups.
__device__ __forceinline__ int iq4_level(u32 nib) {
    // {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113}
    const u32 t0 = 0xBFAD9881u, t1 = 0xF6EADDCFu, t2 = 0x26190D01u, t3 = 0x71594535u;
    u32 b = nib < 8 ? __byte_perm(t0, t1, nib) : __byte_perm(t2, t3, nib - 8);
    return (int)(signed char)(b & 0xFF);
}

// Q4_K / Q5_K 6-bit scale and min of sub-block j (0..8) from the 12 packed bytes at s.
__device__ __forceinline__ void scale_min_k4(int j, const u8* s, int* sc, int* m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// 8 consecutive weights of a row, elements e0..e0+8 (e0 % 8 == 0).
template <int T>
__device__ __forceinline__ void deq8(const u8* __restrict__ row, int e0, float* w) {
    if constexpr (T == T_F32) {
        float4 a = *(const float4*)(row + 4 * (usize)e0);
        float4 b = *(const float4*)(row + 4 * (usize)e0 + 16);
        w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
        w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
    } else if constexpr (T == T_F16 || T == T_BF16) {
        uint4 v = *(const uint4*)(row + 2 * (usize)e0);
        u32 p[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            if constexpr (T == T_F16) {
                w[2 * k] = h2f((u16)(p[k] & 0xFFFF));
                w[2 * k + 1] = h2f((u16)(p[k] >> 16));
            } else {
                w[2 * k] = bf2f((u16)(p[k] & 0xFFFF));
                w[2 * k + 1] = bf2f((u16)(p[k] >> 16));
            }
        }
    } else if constexpr (T == T_Q4_0 || T == T_IQ4_NL) {
        const u8* b = row + (usize)(e0 >> 5) * 18;
        int i = e0 & 31;
        float d = h2f(ld16(b));
        uint2 q = ld64_a2(b + 2 + (i & 15));
        int sh = (i >> 4) * 4;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            u32 nib = (byte_at(q, k) >> sh) & 15;
            if constexpr (T == T_Q4_0) {
                w[k] = d * (float)((int)nib - 8);
            } else {
                w[k] = d * (float)iq4_level(nib);
            }
        }
    } else if constexpr (T == T_Q4_0R) {
        int blk = e0 >> 5, i = e0 & 31;
        const u8* g = row + (usize)(blk >> 3) * 144;
        float d = h2f(ld16(g + 128 + 2 * (blk & 7)));
        uint2 q = ld64_a8(g + 16 * (blk & 7) + (i & 15));
        int sh = (i >> 4) * 4;
#pragma unroll
        for (int k = 0; k < 8; k++) w[k] = d * (float)((int)((byte_at(q, k) >> sh) & 15) - 8);
    } else if constexpr (T == T_Q8_0R) {
        int blk = e0 >> 5, i = e0 & 31;
        const u8* g = row + (usize)(blk >> 3) * 272;
        float d = h2f(ld16(g + 256 + 2 * (blk & 7)));
        uint2 q = ld64_a8(g + 32 * (blk & 7) + i);
#pragma unroll
        for (int k = 0; k < 8; k++) w[k] = d * (float)(signed char)byte_at(q, k);
    } else if constexpr (T == T_Q4_1) {
        const u8* b = row + (usize)(e0 >> 5) * 20;
        int i = e0 & 31;
        float d = h2f(ld16(b)), m = h2f(ld16(b + 2));
        uint2 q = ld64_a4(b + 4 + (i & 15));
        int sh = (i >> 4) * 4;
#pragma unroll
        for (int k = 0; k < 8; k++) w[k] = d * (float)((byte_at(q, k) >> sh) & 15) + m;
    } else if constexpr (T == T_Q5_0) {
        const u8* b = row + (usize)(e0 >> 5) * 22;
        int i = e0 & 31;
        float d = h2f(ld16(b));
        u32 qh = ld32_a2(b + 2);
        uint2 q = ld64_a2(b + 6 + (i & 15));
        int sh = (i >> 4) * 4;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            int v = (int)(((byte_at(q, k) >> sh) & 15) | (((qh >> (i + k)) & 1) << 4)) - 16;
            w[k] = d * (float)v;
        }
    } else if constexpr (T == T_Q5_1) {
        const u8* b = row + (usize)(e0 >> 5) * 24;
        int i = e0 & 31;
        float d = h2f(ld16(b)), m = h2f(ld16(b + 2));
        u32 qh = ld32_a4(b + 4);
        uint2 q = ld64_a8(b + 8 + (i & 15));
        int sh = (i >> 4) * 4;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            u32 v = ((byte_at(q, k) >> sh) & 15) | (((qh >> (i + k)) & 1) << 4);
            w[k] = d * (float)v + m;
        }
    } else if constexpr (T == T_Q8_0) {
        const u8* b = row + (usize)(e0 >> 5) * 34;
        int i = e0 & 31;
        float d = h2f(ld16(b));
        uint2 q = ld64_a2(b + 2 + i);
#pragma unroll
        for (int k = 0; k < 8; k++) w[k] = d * (float)(signed char)byte_at(q, k);
    } else if constexpr (T == T_Q2_K) {
        const u8* b = row + (usize)(e0 >> 8) * 84;
        int ie = e0 & 255, g = ie >> 4;
        u32 sc = b[g];
        float d = h2f(ld16(b + 80)), dmin = h2f(ld16(b + 82));
        float dl = d * (float)(sc & 15), ml = dmin * (float)(sc >> 4);
        int shift = 2 * ((g & 7) >> 1);
        int start = 32 * (ie >> 7) + 16 * (g & 1) + (ie & 15);
        uint2 q = ld64_a4(b + 16 + start);
#pragma unroll
        for (int k = 0; k < 8; k++) w[k] = dl * (float)((byte_at(q, k) >> shift) & 3) - ml;
    } else if constexpr (T == T_Q3_K) {
        const u8* b = row + (usize)(e0 >> 8) * 110;
        int ie = e0 & 255, g = ie >> 4;
        float d = h2f(ld16(b + 108));
        const u8* s = b + 96;
        int lo = g < 8 ? (s[g] & 15) : (s[g - 8] >> 4);
        int hi = (s[8 + (g & 3)] >> (2 * (g >> 2))) & 3;
        float dl = d * (float)((lo | (hi << 4)) - 32);
        int shift = 2 * ((g & 7) >> 1), hbit = g >> 1;
        int start = 16 * (g & 1) + (ie & 15);
        uint2 q = ld64_a2(b + 32 + 32 * (g >> 3) + start);
        uint2 hm = ld64_a2(b + start);
#pragma unroll
        for (int k = 0; k < 8; k++) {
            int v = (int)((byte_at(q, k) >> shift) & 3) - (((byte_at(hm, k) >> hbit) & 1) ? 0 : 4);
            w[k] = dl * (float)v;
        }
    } else if constexpr (T == T_Q4_K || T == T_Q5_K) {
        const int bytes = T == T_Q4_K ? 144 : 176;
        const u8* b = row + (usize)(e0 >> 8) * bytes;
        int ie = e0 & 255, j = ie >> 5;
        int sc, m;
        scale_min_k4(j, b + 4, &sc, &m);
        float d = h2f(ld16(b)), dmin = h2f(ld16(b + 2));
        float dl = d * (float)sc, ml = dmin * (float)m;
        int sh = 4 * (j & 1);
        if constexpr (T == T_Q4_K) {
            uint2 q = ld64_a8(b + 16 + 32 * (j >> 1) + (ie & 31));
#pragma unroll
            for (int k = 0; k < 8; k++) w[k] = dl * (float)((byte_at(q, k) >> sh) & 15) - ml;
        } else {
            uint2 q = ld64_a8(b + 48 + 32 * (j >> 1) + (ie & 31));
            uint2 qh = ld64_a8(b + 16 + (ie & 31));
#pragma unroll
            for (int k = 0; k < 8; k++) {
                u32 v = ((byte_at(q, k) >> sh) & 15) | (((byte_at(qh, k) >> j) & 1) << 4);
                w[k] = dl * (float)v - ml;
            }
        }
    } else if constexpr (T == T_Q6_K) {
        const u8* b = row + (usize)(e0 >> 8) * 210;
        int ie = e0 & 255, n = ie >> 7, r = ie & 127, jj = r >> 5, l = r & 31;
        float d = h2f(ld16(b + 208));
        float dl = d * (float)(signed char)b[192 + 8 * n + 2 * jj + (l >> 4)];
        uint2 ql = ld64_a2(b + 64 * n + 32 * (jj & 1) + l);
        uint2 qh = ld64_a2(b + 128 + 32 * n + l);
        int sh = 4 * (jj >> 1), hs = 2 * jj;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            int v = (int)(((byte_at(ql, k) >> sh) & 15) | (((byte_at(qh, k) >> hs) & 3) << 4)) - 32;
            w[k] = dl * (float)v;
        }
    } else if constexpr (T == T_IQ4_XS) {
        const u8* b = row + (usize)(e0 >> 8) * 136;
        int ie = e0 & 255, j = ie >> 5, r = ie & 31;
        float d = h2f(ld16(b));
        u32 sh_bits = ld16(b + 2);
        int ls = ((b[4 + (j >> 1)] >> (4 * (j & 1))) & 15) | (((sh_bits >> (2 * j)) & 3) << 4);
        float dl = d * (float)(ls - 32);
        uint2 q = ld64_a8(b + 8 + 16 * j + (r & 15));
        int sh = 4 * (r >> 4);
#pragma unroll
        for (int k = 0; k < 8; k++) w[k] = dl * (float)iq4_level((byte_at(q, k) >> sh) & 15);
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Rows per warp in the matrix-vector kernel. Measured on an H100 (TinyLlama Q4_0 tg128): 4 rows
// per warp reuse each activation load but leave 4x fewer warps to hide memory latency, and decode
// fell from 544 to 450 t/s; one row per warp is the faster shape here.
#define MV_ROWS 1

// y[t * ldy + r] (+)= Σ_c W[r, c] · x[t * ldx + c]: each warp computes MV_ROWS rows, token
// t = blockIdx.y. Each lane decodes 8 weights per row and step and reads the matching 8
// activations as two float4 loads (a warp's activation reads are one contiguous 1 KiB span).
// (SwiGLU computed here on the fly was slower: every row's warp recomputed the whole silu vector,
// 177 -> 110 t/s on the 7B shape together with deeper unrolling. It is now fused into the
// epilogue of the fast gate|up kernel instead, see EPI_SWIGLU.)
template <int T>
__device__ __forceinline__ void matvec_impl(const u8* __restrict__ W, long long row_bytes, const float* __restrict__ x,
                                            float* __restrict__ y, int rows, int cols, int ldx, int ldy, int acc) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int r0 = (blockIdx.x * (blockDim.x >> 5) + warp) * MV_ROWS;
    if (r0 >= rows) return;
    const u8* rp[MV_ROWS];
#pragma unroll
    for (int j = 0; j < MV_ROWS; j++) rp[j] = W + (usize)min(r0 + j, rows - 1) * row_bytes;
    const float* xt = x + (usize)blockIdx.y * ldx;
    float sum[MV_ROWS];
#pragma unroll
    for (int j = 0; j < MV_ROWS; j++) sum[j] = 0.f;
    // Unrolled 4 deep (measured on the H100: 8 deep was slower, 544 -> 494 t/s TinyLlama Q4_0 tg128
    // and 177 -> 110 t/s on the 7B shape).
#pragma unroll 4
    for (int e0 = lane * 8; e0 < cols; e0 += 256) {
        float xv[8];
        float4 a = *(const float4*)(xt + e0);
        float4 b = *(const float4*)(xt + e0 + 4);
        xv[0] = a.x; xv[1] = a.y; xv[2] = a.z; xv[3] = a.w;
        xv[4] = b.x; xv[5] = b.y; xv[6] = b.z; xv[7] = b.w;
#pragma unroll
        for (int j = 0; j < MV_ROWS; j++) {
            float w[8];
            deq8<T>(rp[j], e0, w);
            float s = 0.f;
#pragma unroll
            for (int k = 0; k < 8; k++) s += w[k] * xv[k];
            sum[j] += s;
        }
    }
#pragma unroll
    for (int j = 0; j < MV_ROWS; j++) {
        float v = warp_sum(sum[j]);
        if (lane == 0 && r0 + j < rows) {
            float* o = y + (usize)blockIdx.y * ldy + r0 + j;
            *o = acc ? *o + v : v;
        }
    }
}

// ---- Fast matrix-vector kernel (Q4_0 and Q8_0 repacked, Q4_K) ----
//
// Each lane owns "units" of 32 weights of a row (one Q4_0/Q8_0 block, or half of two Q4_K
// sub-blocks: 16 bytes of quants) loaded with 16-byte loads; a warp covers a tile of 1024 columns
// (32 units) per step and computes MVF_R rows, reusing each activation it reads for all of them.
// The activations (optionally RMS-normalised in the prologue, fusing the norm kernel away) are
// staged once per block in shared memory, permuted so that a lane's k-th float4 of a tile sits at
// [tile][k][lane] (conflict-free 16-byte reads). Quants become exact floats without int->float
// conversions (2^23 + q from its bits, minus 2^23); block scales are applied per block, so the
// weights are exactly deq8's and every product and sum is f32.
#ifndef MVF_R
#define MVF_R 2
#endif
#ifndef MVF_WARPS
#define MVF_WARPS 8
#endif
#ifndef MVF_P
#define MVF_P 2
#endif

struct Frag {
    uint4 a, b;
    u32 c;
};

// First element of the k-th float4 (k < 8) of unit u.
template <int T>
__device__ __forceinline__ int unit_elem(int u, int k) {
    if constexpr (T == T_Q4_K) {
        int c = u & 7;
        return 256 * (u >> 3) + 64 * (c >> 1) + 16 * (c & 1) + 4 * (k & 3) + (k >= 4 ? 32 : 0);
    } else {
        return 32 * u + 4 * k;
    }
}

template <int T>
__device__ __forceinline__ void frag_load(const u8* __restrict__ row, int u, Frag& f) {
    if constexpr (T == T_Q4_0R) {
        const u8* g = row + (usize)(u >> 3) * 144;
        f.a = *(const uint4*)(g + 16 * (u & 7));
        f.c = ld16(g + 128 + 2 * (u & 7));
    } else if constexpr (T == T_Q8_0R) {
        const u8* g = row + (usize)(u >> 3) * 272;
        f.a = *(const uint4*)(g + 32 * (u & 7));
        f.b = *(const uint4*)(g + 32 * (u & 7) + 16);
        f.c = ld16(g + 256 + 2 * (u & 7));
    } else {
        const u8* b = row + (usize)(u >> 3) * 144;
        int c = u & 7;
        f.a = *(const uint4*)b;
        f.b = *(const uint4*)(b + 16 + 32 * (c >> 1) + 16 * (c & 1));
    }
}

// 2^23 + byte i of n (n's bytes < 2^8), as a float.
__device__ __forceinline__ float magic_byte(u32 n, int i) { return __uint_as_float(__byte_perm(n, 0x4B000000u, 0x7440 + i)); }

__device__ __forceinline__ float dot4(u32 n, float4 x, float bias, float s) {
    s = fmaf(magic_byte(n, 0) - bias, x.x, s);
    s = fmaf(magic_byte(n, 1) - bias, x.y, s);
    s = fmaf(magic_byte(n, 2) - bias, x.z, s);
    s = fmaf(magic_byte(n, 3) - bias, x.w, s);
    return s;
}

// Position in a warp's stream of (row group, tile) steps (see matvec_fast_impl).
struct StreamPos {
    int t, r0;  // tile, first row of the warp in the current group
    __device__ __forceinline__ void next(int nt, int group_stride) {
        if (++t == nt) {
            t = 0;
            r0 += group_stride;
        }
    }
};

// Loads the warp's MVF_R rows' units of the step at p.
template <int T>
__device__ __forceinline__ void stream_load(const u8* __restrict__ W, long long rb, int rows, int nu, StreamPos p,
                                            int lane, Frag* f) {
    const int u = p.t * 32 + lane;
    if (u >= nu) return;
#pragma unroll
    for (int j = 0; j < MVF_R; j++) frag_load<T>(W + (usize)min(p.r0 + j, rows - 1) * rb, u, f[j]);
}

// s += Σ q·x over the weights of the unit's k-th float4 of activations (quants only, offset by
// the type's zero point; the block scales come in frag_finish). k is a compile-time constant.
template <int T>
__device__ __forceinline__ void frag_acc(const Frag& f, int k, float4 x, float& s) {
    if constexpr (T == T_Q8_0R) {
        const uint4 v = k < 4 ? f.a : f.b;
        const int i = k & 3;
        const u32 w = i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
        s = dot4(w ^ 0x80808080u, x, 8388736.f, s);
    } else {
        const uint4 v = T == T_Q4_0R ? f.a : f.b;
        const int i = k & 3;
        const u32 w = i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
        const u32 n = k < 4 ? (w & 0x0F0F0F0Fu) : ((w >> 4) & 0x0F0F0F0Fu);
        s = dot4(n, x, T == T_Q4_0R ? 8388616.f : 8388608.f, s);
    }
}

// The Q4_K super-block scales d, dmin and the 6-bit scale/min pairs (scale_min_k4) of the unit's
// sub-blocks j and j + 1 (j = 2 · ((u & 7) / 2)) from f.a: d | dmin in .x, the 12 scale bytes in
// .y, .z, .w.
__device__ __forceinline__ void q4k_unit_scales(const Frag& f, int u, float& d, float& dmin, int sc[2], int m[2]) {
    d = h2f((u16)(f.a.x & 0xFFFF));
    dmin = h2f((u16)(f.a.x >> 16));
    int j = 2 * ((u & 7) >> 1);
#pragma unroll
    for (int t = 0; t < 2; t++) {
        int jj = j + t, sh = 8 * (jj & 3);
        u32 y = (f.a.y >> sh) & 0xFF, z = (f.a.z >> sh) & 0xFF, wv = (f.a.w >> sh) & 0xFF;
        if (jj < 4) {
            sc[t] = y & 63;
            m[t] = z & 63;
        } else {
            sc[t] = (wv & 0xF) | ((y >> 6) << 4);
            m[t] = (wv >> 4) | ((z >> 6) << 4);
        }
    }
}

// Σ w·x over the unit's 32 weights from the quant sums s0 / s1 of its float4s 0..4 / 4..8 and
// xs0 / xs1 = Σ x over the same.
template <int T>
__device__ __forceinline__ float frag_finish(const Frag& f, int u, float s0, float s1, float xs0, float xs1) {
    if constexpr (T == T_Q4_0R || T == T_Q8_0R) {
        return h2f((u16)f.c) * (s0 + s1);
    } else {
        int sc[2], m[2];
        float d, dmin;
        q4k_unit_scales(f, u, d, dmin, sc, m);
        float dl0 = d * (float)sc[0], ml0 = dmin * (float)m[0];
        float dl1 = d * (float)sc[1], ml1 = dmin * (float)m[1];
        return (dl0 * s0 - ml0 * xs0) + (dl1 * s1 - ml1 * xs1);
    }
}

// Σ w·x over the unit's 32 weights, all at once (Q4_0 / Q8_0 repacked; frag_acc + frag_finish
// for Q4_K); xs0 / xs1 = Σ x over its float4s 0..4 / 4..8.
template <int T>
__device__ __forceinline__ float frag_dot(const Frag& f, int u, const float4* xv, float xs0, float xs1) {
    if constexpr (T == T_Q4_0R) {
        const u32 w[4] = {f.a.x, f.a.y, f.a.z, f.a.w};
        float s0 = 0.f, s1 = 0.f;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            s0 = dot4(w[k] & 0x0F0F0F0Fu, xv[k], 8388616.f, s0);
            s1 = dot4((w[k] >> 4) & 0x0F0F0F0Fu, xv[k + 4], 8388616.f, s1);
        }
        return h2f((u16)f.c) * (s0 + s1);
    } else if constexpr (T == T_Q8_0R) {
        const u32 w[8] = {f.a.x, f.a.y, f.a.z, f.a.w, f.b.x, f.b.y, f.b.z, f.b.w};
        float s0 = 0.f, s1 = 0.f;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            s0 = dot4(w[k] ^ 0x80808080u, xv[k], 8388736.f, s0);
            s1 = dot4(w[k + 4] ^ 0x80808080u, xv[k + 4], 8388736.f, s1);
        }
        return h2f((u16)f.c) * (s0 + s1);
    } else {
        int sc[2], m[2];
        float d, dmin;
        q4k_unit_scales(f, u, d, dmin, sc, m);
        const u32 w[4] = {f.b.x, f.b.y, f.b.z, f.b.w};
        float s0 = 0.f, s1 = 0.f;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            s0 = dot4(w[k] & 0x0F0F0F0Fu, xv[k], 8388608.f, s0);
            s1 = dot4((w[k] >> 4) & 0x0F0F0F0Fu, xv[k + 4], 8388608.f, s1);
        }
        float dl0 = d * (float)sc[0], ml0 = dmin * (float)m[0];
        float dl1 = d * (float)sc[1], ml1 = dmin * (float)m[1];
        return (dl0 * s0 - ml0 * xs0) + (dl1 * s1 - ml1 * xs1);
    }
}

// What the fast kernel does with pairs of adjacent output rows (r even, both computed by one warp:
// needs MVF_R even), fusing away a kernel launch per layer of a decode step:
// EPI_SWIGLU: rows interleaved as (gate_i, up_i) at upload; writes y[i] = silu(gate) · up in f64,
//   exactly as the swiglu kernel;
// EPI_ROPE_KV: rows [q | k | v] of width qd + 2·kvd; rotates the q and k pairs of the first n_rot
//   dims of each head by the angles of row t's position (f64, exactly as rope_kv), writes them
//   to y and stores k and v into the caches at that position (KvMap).
#define EPI_PLAIN 0
#define EPI_SWIGLU 1
#define EPI_ROPE_KV 2
struct Epi {
    int mode;
    const float2* cs;
    KvMap map;
    float* kc;
    float* vc;
    int qd, kvd, d, half;
};

__device__ __forceinline__ void epilogue_pair(const Epi& ep, float* yt, int r, float a, float b, int tok) {
    if (ep.mode == EPI_SWIGLU) {
        double g = a, u = b;
        yt[r >> 1] = (float)(g / (1.0 + exp(-g)) * u);
        return;
    }
    const int pos = ep.map.pos[tok];
    const int kvr = r - ep.qd;
    if (kvr >= ep.kvd) {
        const int vr = kvr - ep.kvd;
        const usize at = kv_row(ep.map, tok, pos) * ep.kvd + vr;
        yt[r] = a;
        yt[r + 1] = b;
        ep.vc[at] = a;
        ep.vc[at + 1] = b;
        return;
    }
    const int jd = (kvr >= 0 ? kvr : r) % ep.d;
    float o0 = a, o1 = b;
    if (jd < 2 * ep.half) {
        const float2 c = ep.cs[(usize)pos * ep.half + (jd >> 1)];
        double x0 = a, x1 = b, cc = c.x, ss = c.y;
        o0 = (float)(x0 * cc - x1 * ss);
        o1 = (float)(x0 * ss + x1 * cc);
    }
    yt[r] = o0;
    yt[r + 1] = o1;
    if (kvr >= 0) {
        const usize at = kv_row(ep.map, tok, pos) * ep.kvd + kvr;
        ep.kc[at] = o0;
        ep.kc[at + 1] = o1;
    }
}

#ifndef MVF_PF
#define MVF_PF 0
#endif

// Programmatic dependent launch (sm_90+; the host launches the decode chain's mat-vec and attention
// kernels with it when `Kernels::pdl` is on): a kernel lets the next one start as soon as all its
// blocks are running, and waits here until the kernel before it has finished and its writes are
// visible. Only reads of data that no kernel writes (the weights) may come before the wait; a
// kernel launched without the attribute passes straight through both instructions.
__device__ __forceinline__ void pdl_release_then_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// y[t * ldy + r] (+)= Σ_c W[r, c] · xn_t[c] for the block's tokens t = blockIdx.y · TM ..
// (at most TM, fewer at the end of `ntok`), xn_t = x[t * ldx ..] or, when g is not null,
// RMSNorm(x_t) · g computed here exactly as the rms_norm kernel (mean in f64); ep: see Epi.
// Each weight fragment is loaded once and applied to the block's TM tokens; every token's sums
// run in the order of the one-token kernel (same steps, same expressions), so a row's result does
// not depend on TM or on the other tokens: batches get the bits of one-token steps.
// Dynamic shared memory: TM · ceil(cols / 1024) · (4096 + 256) bytes.
template <int T, int TM>
__device__ __forceinline__ void matvec_fast_impl(const u8* __restrict__ W, long long rb, const float* __restrict__ x,
                                                 const float* __restrict__ g, double eps, float* __restrict__ y,
                                                 int rows, int cols, int ldx, int ldy, int acc, int ntok,
                                                 const Epi& ep) {
    extern __shared__ float4 xs_all[];
    __shared__ double red[32];
    const int nt = (cols + 1023) >> 10, nu = cols >> 5;
    // Per token: its activations (nt · 256 float4s), then its unit sums (nt · 64 floats).
    const int per_tok = nt * 272;
    const int t0 = (int)blockIdx.y * TM;
    const int tcount = min(TM, ntok - t0);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // The block's work: row groups blockIdx.x, blockIdx.x + gridDim.x, ... (MVF_WARPS * MVF_R rows
    // each), one stream of (group, tile) steps per warp, weights requested MVF_P steps ahead
    // (across group boundaries) from a register ring. The first steps are requested before the
    // prologue, to overlap it.
    const int ngroups = (rows + MVF_WARPS * MVF_R - 1) / (MVF_WARPS * MVF_R);
    const int total = (ngroups - (int)blockIdx.x + (int)gridDim.x - 1) / (int)gridDim.x * nt;
    const int gstride = (int)gridDim.x * MVF_WARPS * MVF_R;
    StreamPos cp = {0, ((int)blockIdx.x * MVF_WARPS + warp) * MVF_R}, lp = cp;
    Frag buf[MVF_P][MVF_R];
#pragma unroll
    for (int p = 0; p < MVF_P; p++) {
        if (p < total) stream_load<T>(W, rb, rows, nu, lp, lane, buf[p]);
        lp.next(nt, gstride);
    }
#if MVF_PF > 0
    // The next MVF_PF steps' quants requested into L2 as well (no registers held), so that a
    // short matrix (few steps per warp) has most of its weights on the way before the wait.
    {
        StreamPos pp = lp;
        for (int p = MVF_P; p < MVF_P + MVF_PF && p < total; p++) {
            const int u = pp.t * 32 + lane;
            if (u < nu) {
#pragma unroll
                for (int j = 0; j < MVF_R; j++) {
                    const u8* row = W + (usize)min(pp.r0 + j, rows - 1) * rb;
                    const u8* at = T == T_Q8_0R ? row + (usize)(u >> 3) * 272 + 32 * (u & 7)
                                 : T == T_Q4_0R ? row + (usize)(u >> 3) * 144 + 16 * (u & 7)
                                                : row + (usize)(u >> 3) * 144 + 16 + 32 * ((u & 7) >> 1);
                    asm volatile("prefetch.global.L2 [%0];" ::"l"(at));
                }
            }
            pp.next(nt, gstride);
        }
    }
#endif
    // Everything below reads what earlier kernels wrote; the weight loads above are in flight.
    pdl_release_then_wait();
    // Prologue, token by token: stage x (item = tile, half, lane: 4 float4s).
    const int items = nt * 64;
    for (int k = 0; k < tcount; k++) {
        float4* xs = xs_all + k * per_tok;
        float* xsum = (float*)(xs + nt * 256);
        const float* xt = x + (usize)(t0 + k) * ldx;
        double ss = 0.0;
        for (int it = threadIdx.x; it < items; it += blockDim.x) {
            int tile = it >> 6, half = (it >> 5) & 1, l = it & 31, u = tile * 32 + l;
            if (u >= nu) continue;
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                int q = half * 4 + kk;
                float4 v = *(const float4*)(xt + unit_elem<T>(u, q));
                ss += (double)v.x * v.x + (double)v.y * v.y + (double)v.z * v.z + (double)v.w * v.w;
                xs[(tile * 8 + q) * 32 + l] = v;
            }
        }
        double scale = 1.0;
        if (g) {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
            if (lane == 0) red[warp] = ss;
            __syncthreads();
            if (warp == 0) {
                ss = lane < MVF_WARPS ? red[lane] : 0.0;
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
                if (lane == 0) red[0] = ss;
            }
            __syncthreads();
            scale = 1.0 / sqrt(red[0] / (double)cols + eps);
            // red[0] is read by every thread before the next token's warps overwrite red.
            __syncthreads();
        }
        for (int it = threadIdx.x; it < items; it += blockDim.x) {
            int tile = it >> 6, half = (it >> 5) & 1, l = it & 31, u = tile * 32 + l;
            if (u >= nu) continue;
            float sum = 0.f;
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                int q = half * 4 + kk;
                float4 v = xs[(tile * 8 + q) * 32 + l];
                if (g) {
                    float4 gv = *(const float4*)(g + unit_elem<T>(u, q));
                    v.x = (float)(((double)v.x * scale) * (double)gv.x);
                    v.y = (float)(((double)v.y * scale) * (double)gv.y);
                    v.z = (float)(((double)v.z * scale) * (double)gv.z);
                    v.w = (float)(((double)v.w * scale) * (double)gv.w);
                    xs[(tile * 8 + q) * 32 + l] = v;
                }
                sum += (v.x + v.y) + (v.z + v.w);
            }
            xsum[(tile * 2 + half) * 32 + l] = sum;
        }
    }
    __syncthreads();
    float accs[TM][MVF_R];
#pragma unroll
    for (int k = 0; k < TM; k++)
#pragma unroll
        for (int j = 0; j < MVF_R; j++) accs[k][j] = 0.f;
    for (int s0 = 0; s0 < total; s0 += MVF_P) {
#pragma unroll
        for (int p = 0; p < MVF_P; p++) {
            const int s = s0 + p;
            if (s >= total) break;
            const int t = cp.t, u = t * 32 + lane;
            if (u < nu) {
#pragma unroll
                for (int k = 0; k < TM; k++) {
                    if (k >= tcount) break;
                    const float4* xs = xs_all + k * per_tok;
                    const float* xsum = (const float*)(xs + nt * 256);
                    if constexpr (T == T_Q4_K) {
                        // One float4 of activations at a time, used by all rows: fewer live
                        // registers (80 with 3 blocks per SM; the order below needs 100, 2 blocks
                        // per SM), which measured faster for Q4_K and slower for the others (H100,
                        // TinyLlama shape).
                        float sq[MVF_R][2];
#pragma unroll
                        for (int j = 0; j < MVF_R; j++) sq[j][0] = sq[j][1] = 0.f;
#pragma unroll
                        for (int q = 0; q < 8; q++) {
                            const float4 xv = xs[(t * 8 + q) * 32 + lane];
#pragma unroll
                            for (int j = 0; j < MVF_R; j++) frag_acc<T>(buf[p][j], q, xv, sq[j][q >> 2]);
                        }
                        const float x0 = xsum[(t * 2) * 32 + lane], x1 = xsum[(t * 2 + 1) * 32 + lane];
#pragma unroll
                        for (int j = 0; j < MVF_R; j++)
                            accs[k][j] += frag_finish<T>(buf[p][j], u, sq[j][0], sq[j][1], x0, x1);
                    } else {
                        float4 xv[8];
#pragma unroll
                        for (int q = 0; q < 8; q++) xv[q] = xs[(t * 8 + q) * 32 + lane];
                        const float x0 = xsum[(t * 2) * 32 + lane], x1 = xsum[(t * 2 + 1) * 32 + lane];
#pragma unroll
                        for (int j = 0; j < MVF_R; j++) accs[k][j] += frag_dot<T>(buf[p][j], u, xv, x0, x1);
                    }
                }
            }
            if (s + MVF_P < total) stream_load<T>(W, rb, rows, nu, lp, lane, buf[p]);
            lp.next(nt, gstride);
            if (t == nt - 1) {
                const int r0 = cp.r0;
#pragma unroll
                for (int k = 0; k < TM; k++) {
                    if (k >= tcount) break;
                    float v[MVF_R];
#pragma unroll
                    for (int j = 0; j < MVF_R; j++) {
                        v[j] = warp_sum(accs[k][j]);
                        accs[k][j] = 0.f;
                    }
                    if (lane == 0) {
                        const int tok = t0 + k;
                        float* yt = y + (usize)tok * ldy;
                        if (ep.mode == EPI_PLAIN) {
#pragma unroll
                            for (int j = 0; j < MVF_R; j++) {
                                if (r0 + j < rows) yt[r0 + j] = acc ? yt[r0 + j] + v[j] : v[j];
                            }
                        } else {
#pragma unroll
                            for (int j = 0; j + 1 < MVF_R; j += 2) {
                                if (r0 + j < rows) epilogue_pair(ep, yt, r0 + j, v[j], v[j + 1], tok);
                            }
                        }
                    }
                }
            }
            cp.next(nt, gstride);
        }
    }
}

// The launch bounds: a minimum of resident blocks per SM changes ptxas's register budget (even
// a minimum of 1: 113 registers for Q4_0 where none gives 80).
// Variants by tokens per block (TM): 1 (one-token steps), 4 and 8 (generation steps of many
// sequences: each weight fragment read once per 4 or 8 rows).
#define KILN_FAST_KERNEL(name, T, TM, ...)                                                                            \
    extern "C" __global__ void __launch_bounds__(__VA_ARGS__)                                                          \
        matvec_fast_##name(const u8* W, long long rb, const float* x, const float* g, double eps, float* y, int rows,  \
                           int cols, int ldx, int ldy, int acc, int ntok, int epi, const float2* cs, const int* pos,   \
                           const int* tbl, const int* bt, float* kc, float* vc, int qd, int kvd, int d, int half) {    \
        const Epi ep = {epi, cs, {pos, tbl, bt}, kc, vc, qd, kvd, d, half};                                            \
        matvec_fast_impl<T, TM>(W, rb, x, g, eps, y, rows, cols, ldx, ldy, acc, ntok, ep);                             \
    }

KILN_FAST_KERNEL(q4_0r, T_Q4_0R, 1, MVF_WARPS * 32)
KILN_FAST_KERNEL(q8_0r, T_Q8_0R, 1, MVF_WARPS * 32)
// Q4_K: 24 resident warps per SM (80 registers per thread).
KILN_FAST_KERNEL(q4_k, T_Q4_K, 1, MVF_WARPS * 32, (24 / MVF_WARPS > 0 ? 24 / MVF_WARPS : 1))
KILN_FAST_KERNEL(q4_0r_t4, T_Q4_0R, 4, MVF_WARPS * 32)
KILN_FAST_KERNEL(q8_0r_t4, T_Q8_0R, 4, MVF_WARPS * 32)
KILN_FAST_KERNEL(q4_k_t4, T_Q4_K, 4, MVF_WARPS * 32)
KILN_FAST_KERNEL(q4_0r_t8, T_Q4_0R, 8, MVF_WARPS * 32)
KILN_FAST_KERNEL(q8_0r_t8, T_Q8_0R, 8, MVF_WARPS * 32)
KILN_FAST_KERNEL(q4_k_t8, T_Q4_K, 8, MVF_WARPS * 32)

// out[r * cols + c] = f16(W[r, c]) for the batched (cuBLAS) path.
template <int T>
__device__ __forceinline__ void dequant_f16_impl(const u8* __restrict__ W, long long row_bytes, u16* __restrict__ out,
                                                 int rows, int cols) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    int per_row = cols >> 3;
    if (idx >= (long long)rows * per_row) return;
    int r = (int)(idx / per_row), e0 = (int)(idx % per_row) * 8;
    float w[8];
    deq8<T>(W + (usize)r * row_bytes, e0, w);
    uint4 v;
    v.x = (u32)f2h(w[0]) | ((u32)f2h(w[1]) << 16);
    v.y = (u32)f2h(w[2]) | ((u32)f2h(w[3]) << 16);
    v.z = (u32)f2h(w[4]) | ((u32)f2h(w[5]) << 16);
    v.w = (u32)f2h(w[6]) | ((u32)f2h(w[7]) << 16);
    *(uint4*)(out + (usize)r * cols + e0) = v;
}

// Generation rows of many sequences on the tensor cores: y[t * ldy + r] (+)= Σ_c f16(W[r, c]) x[t, c]
// for t < n, x given as f16 planes (hi, and lo = hi's rounding error when non-null), f32 sums.
// The weights take the batched prompt path's rounding (one f16 per dequantized weight); what
// changes from the mat-vec kernels is that each weight is read once for up to 64 rows, and the
// products run on the tensor cores instead of as f32 FMAs (a 7B-shape step of 64 rows was
// arithmetic-bound there: ~75 ms where reading the weights takes ~1 ms).
//
// Batch invariance: a block takes 16 weight rows and up to MMA_TOK tokens; its warps split the
// columns into MMA_WARPS fixed ranges (by the matrix width alone), walk them in order and are
// summed in warp order. Every output element (r, t) is the same chain of mma instructions on
// row r and token t alone (an mma's element depends only on its row of A and column of B), so its
// bits do not depend on n, on the other tokens or on where t sits in the block.
//
// Fragment layout (m16n8k16, A row-major, B column-major): lane (g = lane / 4, q = lane % 4)
// decodes 8 consecutive weights at column c0 = 32 s + 8 q of rows g and g + 8 and loads the same 8
// columns of token g's activations, one 16-byte load per plane. The 32 columns of step s are
// assigned to two mma's k slots so that A and B agree: weights 0-1 -> k 2q..2q+1 and 2-3 -> k
// 2q+8..2q+9 of the first, 4-7 likewise of the second. Needs cols % 32 == 0.
#ifndef MMA_WARPS
#define MMA_WARPS 8
#endif
#define MMA_TOK 64
#define MMA_UNROLL 4
#ifndef MMA_UNROLL_FEW
#define MMA_UNROLL_FEW 8
#endif

__device__ __forceinline__ u32 pack_h2(float a, float b) { return (u32)f2h(a) | ((u32)f2h(b) << 16); }

__device__ __forceinline__ void mma_f16_16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if __CUDA_ARCH__ < 800
    // m16n8k16 needs sm_80; the host takes this path only on such devices (CudaModel::mma_rows).
    __trap();
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// The A fragments of one 32-column step: [0..4) for the first mma, [4..8) for the second.
template <int T>
__device__ __forceinline__ void mma_a_frags(const u8* __restrict__ wa, const u8* __restrict__ wb, int c0, u32* a) {
    float w[8], u[8];
    deq8<T>(wa, c0, w);
    deq8<T>(wb, c0, u);
    a[0] = pack_h2(w[0], w[1]);
    a[1] = pack_h2(u[0], u[1]);
    a[2] = pack_h2(w[2], w[3]);
    a[3] = pack_h2(u[2], u[3]);
    a[4] = pack_h2(w[4], w[5]);
    a[5] = pack_h2(u[4], u[5]);
    a[6] = pack_h2(w[6], w[7]);
    a[7] = pack_h2(u[6], u[7]);
}

// NT: 8-token tiles a block holds (MMA_TOK / 8 for the many-sequence kernel, 1 for `mma_rows8_*`,
// the kernel of steps of at most 8 tokens); U: 32-column steps whose weights are decoded before
// their products (their loads in flight together). Neither changes an element's chain of mma
// instructions (same columns, same order, same warp split), so both kernels give the same bits;
// the small one holds fewer registers, so more blocks run per SM and more loads are in flight
// when a step is a few tokens and reading the weights is all it does.
template <int T, int NT, int U>
__device__ __forceinline__ void mma_rows_impl(const u8* __restrict__ W, long long row_bytes, const u16* __restrict__ xhi,
                                              const u16* __restrict__ xlo, float* __restrict__ y, int rows, int cols,
                                              int ldy, int acc, int n) {
    __shared__ float part[MMA_WARPS][NT][4][32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    const int r0 = blockIdx.x * 16;
    const int tok0 = blockIdx.y * (8 * NT);
    const int ntile = min(NT, (n - tok0 + 7) / 8);
    // Rows past the matrix read its last row (their sums are not stored).
    const u8* wa = W + (usize)min(r0 + g, rows - 1) * row_bytes;
    const u8* wb = W + (usize)min(r0 + g + 8, rows - 1) * row_bytes;
    // Token g of each 8-token tile; tiles past n read the last token (not stored).
    const u16* xh[NT];
    const u16* xl[NT];
#pragma unroll
    for (int j = 0; j < NT; j++) {
        usize t = (usize)min(tok0 + 8 * j + g, n - 1);
        xh[j] = xhi + t * cols;
        xl[j] = xlo ? xlo + t * cols : xlo;
    }
    float c[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
    const int steps = cols >> 5;
    const int s0 = (int)((long long)steps * warp / MMA_WARPS), s1 = (int)((long long)steps * (warp + 1) / MMA_WARPS);
    int s = s0;
    for (; s + U <= s1; s += U) {
        u32 a[U][8];
#pragma unroll
        for (int u = 0; u < U; u++) mma_a_frags<T>(wa, wb, 32 * (s + u) + 8 * q, a[u]);
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c0 = 32 * (s + u) + 8 * q;
#pragma unroll
            for (int j = 0; j < NT; j++) {
                if (j < ntile) {
                    uint4 v = *(const uint4*)(xh[j] + c0);
                    mma_f16_16816(c[j], a[u][0], a[u][1], a[u][2], a[u][3], v.x, v.y);
                    mma_f16_16816(c[j], a[u][4], a[u][5], a[u][6], a[u][7], v.z, v.w);
                    if (xlo) {
                        uint4 l = *(const uint4*)(xl[j] + c0);
                        mma_f16_16816(c[j], a[u][0], a[u][1], a[u][2], a[u][3], l.x, l.y);
                        mma_f16_16816(c[j], a[u][4], a[u][5], a[u][6], a[u][7], l.z, l.w);
                    }
                }
            }
        }
    }
    for (; s < s1; s++) {
        u32 a[8];
        const int c0 = 32 * s + 8 * q;
        mma_a_frags<T>(wa, wb, c0, a);
#pragma unroll
        for (int j = 0; j < NT; j++) {
            if (j < ntile) {
                uint4 v = *(const uint4*)(xh[j] + c0);
                mma_f16_16816(c[j], a[0], a[1], a[2], a[3], v.x, v.y);
                mma_f16_16816(c[j], a[4], a[5], a[6], a[7], v.z, v.w);
                if (xlo) {
                    uint4 l = *(const uint4*)(xl[j] + c0);
                    mma_f16_16816(c[j], a[0], a[1], a[2], a[3], l.x, l.y);
                    mma_f16_16816(c[j], a[4], a[5], a[6], a[7], l.z, l.w);
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < NT; j++) {
        if (j < ntile) {
#pragma unroll
            for (int i = 0; i < 4; i++) part[warp][j][i][lane] = c[j][i];
        }
    }
    __syncthreads();
    // The warps' partial sums in warp order; element i of lane l: row g + 8 (i / 2), token 2 q + i % 2.
    for (int idx = threadIdx.x; idx < ntile * 128; idx += blockDim.x) {
        const int j = idx >> 7, i = (idx >> 5) & 3, l = idx & 31;
        float v = part[0][j][i][l];
#pragma unroll
        for (int w = 1; w < MMA_WARPS; w++) v += part[w][j][i][l];
        const int r = r0 + (l >> 2) + 8 * (i >> 1);
        const int t = tok0 + 8 * j + 2 * (l & 3) + (i & 1);
        if (r < rows && t < n) {
            float* yp = y + (usize)t * ldy + r;
            *yp = acc ? *yp + v : v;
        }
    }
}

// out[t * cols ..] = row tokens[t] of W, dequantized (the embedding lookup). Block t.
template <int T>
__device__ __forceinline__ void get_rows_impl(const u8* __restrict__ W, long long row_bytes, const int* __restrict__ toks,
                                              float* __restrict__ out, int cols) {
    int t = blockIdx.x;
    const u8* row = W + (usize)toks[t] * row_bytes;
    for (int e0 = threadIdx.x * 8; e0 < cols; e0 += blockDim.x * 8) {
        float w[8];
        deq8<T>(row, e0, w);
#pragma unroll
        for (int k = 0; k < 8; k++) out[(usize)t * cols + e0 + k] = w[k];
    }
}

#define KILN_TYPE_KERNELS(name, T)                                                                                    \
    extern "C" __global__ void matvec_##name(const u8* W, long long rb, const float* x, float* y, int rows, int cols,   \
                                             int ldx, int ldy, int acc) {                                              \
        matvec_impl<T>(W, rb, x, y, rows, cols, ldx, ldy, acc);                                                 \
    }                                                                                                                  \
    extern "C" __global__ void dequant_f16_##name(const u8* W, long long rb, u16* out, int rows, int cols) {           \
        dequant_f16_impl<T>(W, rb, out, rows, cols);                                                                   \
    }                                                                                                                  \
    extern "C" __global__ void get_rows_##name(const u8* W, long long rb, const int* toks, float* out, int cols) {     \
        get_rows_impl<T>(W, rb, toks, out, cols);                                                                      \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32)                                                       \
        mma_rows_##name(const u8* W, long long rb, const u16* xhi, const u16* xlo, float* y, int rows, int cols,       \
                        int ldy, int acc, int n) {                                                                     \
        mma_rows_impl<T, MMA_TOK / 8, MMA_UNROLL>(W, rb, xhi, xlo, y, rows, cols, ldy, acc, n);                        \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32)                                                       \
        mma_rows8_##name(const u8* W, long long rb, const u16* xhi, const u16* xlo, float* y, int rows, int cols,      \
                         int ldy, int acc, int n) {                                                                    \
        mma_rows_impl<T, 1, MMA_UNROLL_FEW>(W, rb, xhi, xlo, y, rows, cols, ldy, acc, n);                              \
    }

KILN_TYPE_KERNELS(f32, T_F32)
KILN_TYPE_KERNELS(f16, T_F16)
KILN_TYPE_KERNELS(bf16, T_BF16)
KILN_TYPE_KERNELS(q4_0, T_Q4_0)
KILN_TYPE_KERNELS(q4_1, T_Q4_1)
KILN_TYPE_KERNELS(q5_0, T_Q5_0)
KILN_TYPE_KERNELS(q5_1, T_Q5_1)
KILN_TYPE_KERNELS(q8_0, T_Q8_0)
KILN_TYPE_KERNELS(q2_k, T_Q2_K)
KILN_TYPE_KERNELS(q3_k, T_Q3_K)
KILN_TYPE_KERNELS(q4_k, T_Q4_K)
KILN_TYPE_KERNELS(q5_k, T_Q5_K)
KILN_TYPE_KERNELS(q6_k, T_Q6_K)
KILN_TYPE_KERNELS(iq4_nl, T_IQ4_NL)
KILN_TYPE_KERNELS(iq4_xs, T_IQ4_XS)
KILN_TYPE_KERNELS(q4_0r, T_Q4_0R)
KILN_TYPE_KERNELS(q8_0r, T_Q8_0R)

// x ≈ hi + lo as two f16 planes at element i (lo = the rounding error of hi), for f16
// tensor-core products that keep ~22 bits of each activation; nothing when hi is null, no lo
// when lo is null. Producers of batched-path activations write these themselves (ncu: the
// separate split_f16 pass was ~6% of a TinyLlama-shape pp512).
__device__ __forceinline__ void store_planes(u16* __restrict__ hi, u16* __restrict__ lo, usize i, float v) {
    if (!hi) return;
    u16 h = f2h(v);
    hi[i] = h;
    if (lo) lo[i] = f2h(v - h2f(h));
}

// out = x / sqrt(mean(x²) + eps) * g, one block per row; the mean in f64 as on the CPU; also as
// f16 planes (store_planes).
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ g, float* __restrict__ out,
                                    int e, double eps, u16* __restrict__ hi, u16* __restrict__ lo) {
    __shared__ double part[32];
    const float* xr = x + (usize)blockIdx.x * e;
    float* orow = out + (usize)blockIdx.x * e;
    double ss = 0.0;
    for (int i = threadIdx.x; i < e; i += blockDim.x) ss += (double)xr[i] * (double)xr[i];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    if (lane == 0) part[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        ss = lane < nw ? part[lane] : 0.0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (lane == 0) part[0] = ss;
    }
    __syncthreads();
    double scale = 1.0 / sqrt(part[0] / (double)e + eps);
    for (int i = threadIdx.x; i < e; i += blockDim.x) {
        float v = (float)(((double)xr[i] * scale) * (double)g[i]);
        orow[i] = v;
        store_planes(hi, lo, (usize)blockIdx.x * e + i, v);
    }
}

// The f16 planes of x (store_planes), where its producer did not write them.
extern "C" __global__ void split_f16(const float* __restrict__ x, u16* __restrict__ hi, u16* __restrict__ lo, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    store_planes(hi, lo, (usize)i, x[i]);
}

// RoPE on q and k of each token (adjacent pairs of the first n_rot dims of every head, angles
// from the f32 table cs[pos][i] = (cos, sin) computed in f64 on the host), then k and v are
// stored into the caches at row t's position (KvMap). Blocks (t, i): the blocks of token t share its
// elements (one block per token took ~20 us on the 7B shape: 2 x 4096 elements in f64); qkv rows
// are [q | k | v].
extern "C" __global__ void rope_kv(float* __restrict__ qkv, int stride, const float2* __restrict__ cs,
                                   const int* __restrict__ pos_, const int* __restrict__ tbl, const int* __restrict__ bt,
                                   float* __restrict__ kc, float* __restrict__ vc, int n_head, int n_head_kv, int d,
                                   int half, int kv_stride) {
    const KvMap map = {pos_, tbl, bt};
    int t = blockIdx.x;
    int pos = pos_[t];
    float* q = qkv + (usize)t * stride;
    int qd = n_head * d, kvd = n_head_kv * d;
    float* k = q + qd;
    const float* v = k + kvd;
    const float2* c = cs + (usize)pos * half;
    const int tid = blockIdx.y * blockDim.x + threadIdx.x, nthr = gridDim.y * blockDim.x;
    for (int idx = tid; idx < n_head * half; idx += nthr) {
        int h = idx / half, i = idx % half;
        float2 a = c[i];
        double x0 = q[h * d + 2 * i], x1 = q[h * d + 2 * i + 1], cc = a.x, ss = a.y;
        q[h * d + 2 * i] = (float)(x0 * cc - x1 * ss);
        q[h * d + 2 * i + 1] = (float)(x0 * ss + x1 * cc);
    }
    float* kd = kc + kv_row(map, t, pos) * kv_stride;
    float* vd = vc + kv_row(map, t, pos) * kv_stride;
    for (int idx = tid; idx < kvd; idx += nthr) {
        int h = idx / d, j = idx % d;
        float out;
        if (j < 2 * half) {
            int i = j >> 1;
            float2 a = c[i];
            double x0 = k[h * d + 2 * i], x1 = k[h * d + 2 * i + 1], cc = a.x, ss = a.y;
            out = (j & 1) ? (float)(x0 * ss + x1 * cc) : (float)(x0 * cc - x1 * ss);
        } else {
            out = k[idx];
        }
        kd[idx] = out;
        vd[idx] = v[idx];
    }
}


// Causal attention of row t (blockIdx.y) and head h (blockIdx.x) over its sequence's cache
// positions 0 ..= pos[t] (KvMap: rows of one step may belong to different sequences). Scores: one thread per position (16-byte loads of its key row, independent
// across threads, so the loads of a block are all in flight at once); softmax with the
// denominator summed in f64 (as the CPU's default path); values: threads split as
// (position slice, 4-dim column), each accumulating a float4, then summed over the slices.
// Shared memory: red[4 * blockDim] | q[d] | scores[len].
// ATTN_BATCH: loads a thread keeps in flight. attention_b8 (decode; H100 tg128: 7B shape 318 -> 344
// t/s, TinyLlama 983 -> 1016, 16 was slower) and attention (prompts, where the extra registers
// halved occupancy and cost ~4% of pp512) compute the same sums in the same order.
template <int ATTN_BATCH>
__device__ __forceinline__ void attention_impl(const float* __restrict__ qkv, int stride, const float* __restrict__ kc,
                                               const float* __restrict__ vc, float* __restrict__ out,
                                               const KvMap map, int n_head, int n_head_kv, int d,
                                               int kv_stride, float scale) {
    extern __shared__ float sm[];
    __shared__ double dred[32];
    __shared__ float fred[32];
    pdl_release_then_wait();
    int h = blockIdx.x, t = blockIdx.y;
    int len = map.pos[t] + 1;
    int kh = h / (n_head / n_head_kv);
    float4* red = (float4*)sm;
    float* qs = sm + 4 * blockDim.x;
    float* sc = qs + d;
    const float* q = qkv + (usize)t * stride + h * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) qs[i] = q[i];
    __syncthreads();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    int nq = d >> 2;
    const float4* q4 = (const float4*)qs;
    for (int s = threadIdx.x; s < len; s += blockDim.x) {
        const float4* kr = (const float4*)(kc + kv_row(map, t, s) * kv_stride + kh * d);
        float p = 0.f;
        // The row's loads are issued ATTN_BATCH at a time (one at a time left each thread waiting
        // on memory nq times); the sum runs in the same order.
        for (int i0 = 0; i0 < nq; i0 += ATTN_BATCH) {
            float4 a[ATTN_BATCH];
#pragma unroll
            for (int k = 0; k < ATTN_BATCH; k++) {
                if (i0 + k < nq) a[k] = kr[i0 + k];
            }
#pragma unroll
            for (int k = 0; k < ATTN_BATCH; k++) {
                if (i0 + k < nq) {
                    float4 b = q4[i0 + k];
                    p += a[k].x * b.x + a[k].y * b.y + a[k].z * b.z + a[k].w * b.w;
                }
            }
        }
        sc[s] = p * scale;
    }
    __syncthreads();
    float mx = __int_as_float(0xff800000);
    for (int s = threadIdx.x; s < len; s += blockDim.x) mx = fmaxf(mx, sc[s]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (lane == 0) fred[warp] = mx;
    __syncthreads();
    mx = fred[0];
    for (int i = 1; i < nw; i++) mx = fmaxf(mx, fred[i]);
    double sum = 0.0;
    for (int s = threadIdx.x; s < len; s += blockDim.x) {
        float e = expf(sc[s] - mx);
        sc[s] = e;
        sum += (double)e;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) dred[warp] = sum;
    __syncthreads();
    sum = 0.0;
    for (int i = 0; i < nw; i++) sum += dred[i];
    float inv = (float)(1.0 / sum);
    int parts = blockDim.x / nq;
    int c4 = threadIdx.x % nq, part = threadIdx.x / nq;
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
    if (part < parts) {
        const float* vb = vc + kh * d;
        // ATTN_BATCH positions' loads in flight at a time, summed in position order.
        for (int s0 = part; s0 < len; s0 += ATTN_BATCH * parts) {
            float4 v[ATTN_BATCH];
#pragma unroll
            for (int k = 0; k < ATTN_BATCH; k++) {
                int s = s0 + k * parts;
                if (s < len) v[k] = ((const float4*)(vb + kv_row(map, t, s) * kv_stride))[c4];
            }
#pragma unroll
            for (int k = 0; k < ATTN_BATCH; k++) {
                int s = s0 + k * parts;
                if (s < len) {
                    float p = sc[s] * inv;
                    a.x += p * v[k].x;
                    a.y += p * v[k].y;
                    a.z += p * v[k].z;
                    a.w += p * v[k].w;
                }
            }
        }
    }
    red[threadIdx.x] = a;
    __syncthreads();
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float* rf = (const float*)red;
        float o = 0.f;
        for (int p = 0; p < parts; p++) o += rf[4 * (p * nq + (i >> 2)) + (i & 3)];
        out[(usize)t * n_head * d + h * d + i] = o;
    }
}

extern "C" __global__ void attention(const float* qkv, int stride, const float* kc, const float* vc, float* out,
                                     const int* pos, const int* tbl, const int* bt, int n_head, int n_head_kv, int d,
                                     int kv_stride, float scale) {
    attention_impl<1>(qkv, stride, kc, vc, out, {pos, tbl, bt}, n_head, n_head_kv, d, kv_stride, scale);
}
extern "C" __global__ void attention_b8(const float* qkv, int stride, const float* kc, const float* vc, float* out,
                                        const int* pos, const int* tbl, const int* bt, int n_head, int n_head_kv,
                                        int d, int kv_stride, float scale) {
    attention_impl<8>(qkv, stride, kc, vc, out, {pos, tbl, bt}, n_head, n_head_kv, d, kv_stride, scale);
}

// Causal attention of a prompt chunk, tiled (flash-attention style, f32 on the CUDA cores).
// ncu of TinyLlama-shape pp512 showed the one-block-per-(head, token) kernel above at 60% of the
// GPU time: every block re-read its head's whole K/V prefix (8x more for grouped heads). Here a
// block takes FA_BQ query rows of one KV head — rows are (token, head of the group) pairs, so
// the heads sharing a K/V head read each K/V tile once — and walks the keys in tiles of BK
// (staged in shared memory), keeping a running max, denominator and output per row (online
// softmax). Scores are f32 dot products scaled as in `attention`; masked keys (s > pos) are -inf.
// Blocks run the longest (latest) query tiles first, the KV heads interleaved (grid: one dimension,
// tiles x KV heads), so that each SM pairs a long tile with a short one (ncu, TinyLlama-shape
// pp512: heavy-first within each head only left the SMs unevenly loaded). 256 threads: thread (ty, tx) owns rows
// 4·ty .. 4·ty+3 of the tile, score columns tx + 16·j and output columns 4·tx + 64·c.
// Shared memory (floats): Q [FA_BQ][D+4] | K [BK][D+4] | V [BK][D] | P [FA_BQ][BK+4].
#define FA_BQ 64
template <int D, int BK>
__device__ __forceinline__ void attention_tiled_impl(const float* __restrict__ qkv, int stride,
                                                     const float* __restrict__ kc, const float* __restrict__ vc,
                                                     float* __restrict__ out, const KvMap map, int n,
                                                     int n_head, int n_head_kv, int kv_stride, float scale,
                                                     u16* __restrict__ hi, u16* __restrict__ lo) {
    constexpr int DP = D + 4, PP = BK + 4, JN = BK / 16, CO = D / 64, D4 = D / 4;
    extern __shared__ float4 fa_sm4[];
    float* Qs = (float*)fa_sm4;
    float* Ks = Qs + FA_BQ * DP;
    float* Vs = Ks + BK * DP;
    float* Ps = Vs + BK * D;
    const int G = n_head / n_head_kv, rows = n * G;
    const int kh = (int)blockIdx.x % n_head_kv;
    const int row0 = ((int)gridDim.x / n_head_kv - 1 - (int)blockIdx.x / n_head_kv) * FA_BQ;
    // The chunk's rows are consecutive positions of one sequence.
    const int start = map.pos[0];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    for (int i = tid; i < FA_BQ * D4; i += blockDim.x) {
        int r = i / D4, c4 = i % D4, fr = row0 + r;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (fr < rows) v = *(const float4*)(qkv + (usize)(fr / G) * stride + (kh * G + fr % G) * D + 4 * c4);
        *(float4*)(Qs + r * DP + 4 * c4) = v;
    }
    // Last key each of this thread's rows may see (rows past the chunk repeat the last one).
    int lim[4];
#pragma unroll
    for (int i = 0; i < 4; i++) lim[i] = start + min(row0 + 4 * ty + i, rows - 1) / G;
    const int kv_len = start + (min(row0 + FA_BQ, rows) - 1) / G + 1;
    float m[4], l[4];
    float4 o[4][CO];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        m[i] = __int_as_float(0xff800000);
        l[i] = 0.f;
#pragma unroll
        for (int c = 0; c < CO; c++) o[i][c] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    const float* kb = kc + kh * D;
    const float* vb = vc + kh * D;
    for (int k0 = 0; k0 < kv_len; k0 += BK) {
        __syncthreads();
        for (int i = tid; i < BK * D4; i += blockDim.x) {
            int r = i / D4, c4 = i % D4, s = k0 + r;
            float4 kv = make_float4(0.f, 0.f, 0.f, 0.f), vv = kv;
            if (s < kv_len) {
                const usize row = kv_row(map, 0, s);
                kv = *(const float4*)(kb + row * kv_stride + 4 * c4);
                vv = *(const float4*)(vb + row * kv_stride + 4 * c4);
            }
            *(float4*)(Ks + r * DP + 4 * c4) = kv;
            *(float4*)(Vs + r * D + 4 * c4) = vv;
        }
        __syncthreads();
        float sc[4][JN];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < JN; j++) sc[i][j] = 0.f;
#pragma unroll 4
        for (int k = 0; k < D4; k++) {
            float4 q[4], kk[JN];
#pragma unroll
            for (int i = 0; i < 4; i++) q[i] = *(const float4*)(Qs + (4 * ty + i) * DP + 4 * k);
#pragma unroll
            for (int j = 0; j < JN; j++) kk[j] = *(const float4*)(Ks + (tx + 16 * j) * DP + 4 * k);
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < JN; j++)
                    sc[i][j] += q[i].x * kk[j].x + q[i].y * kk[j].y + q[i].z * kk[j].z + q[i].w * kk[j].w;
        }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float mx = m[i];
#pragma unroll
            for (int j = 0; j < JN; j++) {
                int s = k0 + tx + 16 * j;
                sc[i][j] = s <= lim[i] ? sc[i][j] * scale : __int_as_float(0xff800000);
                mx = fmaxf(mx, sc[i][j]);
            }
#pragma unroll
            for (int o2 = 8; o2 > 0; o2 >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o2));
            // Key 0 is in the first tile and visible to every row, so mx is finite from here on.
            float corr = expf(m[i] - mx), rs = 0.f;
            m[i] = mx;
#pragma unroll
            for (int j = 0; j < JN; j++) {
                float p = expf(sc[i][j] - mx);
                rs += p;
                Ps[(4 * ty + i) * PP + tx + 16 * j] = p;
            }
#pragma unroll
            for (int o2 = 8; o2 > 0; o2 >>= 1) rs += __shfl_xor_sync(0xffffffffu, rs, o2);
            l[i] = l[i] * corr + rs;
#pragma unroll
            for (int c = 0; c < CO; c++) {
                o[i][c].x *= corr;
                o[i][c].y *= corr;
                o[i][c].z *= corr;
                o[i][c].w *= corr;
            }
        }
        __syncthreads();
        const int kend = min(BK, kv_len - k0);
        for (int c0 = 0; c0 < kend; c0 += 4) {
            float4 p[4];
#pragma unroll
            for (int i = 0; i < 4; i++) p[i] = *(const float4*)(Ps + (4 * ty + i) * PP + c0);
#pragma unroll
            for (int cc = 0; cc < 4; cc++) {
#pragma unroll
                for (int c = 0; c < CO; c++) {
                    float4 v = *(const float4*)(Vs + (c0 + cc) * D + 4 * tx + 64 * c);
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        float pi = cc == 0 ? p[i].x : cc == 1 ? p[i].y : cc == 2 ? p[i].z : p[i].w;
                        o[i][c].x += pi * v.x;
                        o[i][c].y += pi * v.y;
                        o[i][c].z += pi * v.z;
                        o[i][c].w += pi * v.w;
                    }
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int fr = row0 + 4 * ty + i;
        if (fr >= rows) continue;
        float inv = 1.f / l[i];
        const usize base = (usize)(fr / G) * n_head * D + (kh * G + fr % G) * D;
#pragma unroll
        for (int c = 0; c < CO; c++) {
            float4 v = o[i][c];
            v = make_float4(v.x * inv, v.y * inv, v.z * inv, v.w * inv);
            const usize at = base + 4 * tx + 64 * c;
            *(float4*)(out + at) = v;
            store_planes(hi, lo, at, v.x);
            store_planes(hi, lo, at + 1, v.y);
            store_planes(hi, lo, at + 2, v.z);
            store_planes(hi, lo, at + 3, v.w);
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
    attention_tiled64(const float* qkv, int stride, const float* kc, const float* vc, float* out, const int* pos,
                      const int* tbl, const int* bt, int n, int n_head, int n_head_kv, int kv_stride, float scale,
                      u16* hi, u16* lo) {
    attention_tiled_impl<64, 64>(qkv, stride, kc, vc, out, {pos, tbl, bt}, n, n_head, n_head_kv, kv_stride, scale, hi,
                                 lo);
}
extern "C" __global__ void __launch_bounds__(256)
    attention_tiled128(const float* qkv, int stride, const float* kc, const float* vc, float* out, const int* pos,
                       const int* tbl, const int* bt, int n, int n_head, int n_head_kv, int kv_stride, float scale,
                       u16* hi, u16* lo) {
    attention_tiled_impl<128, 32>(qkv, stride, kc, vc, out, {pos, tbl, bt}, n, n_head, n_head_kv, kv_stride, scale,
                                  hi, lo);
}

// out[t][i] = silu(gate) * up, from rows [gate | up] of width 2·ff (interleaved: rows
// [g0 u0 g1 u1 ...], the layout of a fused gate|up matrix); in f64 as on the CPU; also as f16
// planes (store_planes).
// Grid (ceil(ff / blockDim), n): no 64-bit index division (ncu: the 1-D version took 21 us for
// 512 x 5632 elements).
extern "C" __global__ void swiglu(const float* __restrict__ gu, float* __restrict__ out, int ff, int n, int interleaved,
                                  u16* __restrict__ hi, u16* __restrict__ lo) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
    if (j >= ff) return;
    const usize i = (usize)t * ff + j;
    const float* row = gu + (usize)t * 2 * ff;
    double g = interleaved ? row[2 * j] : row[j], u = interleaved ? row[2 * j + 1] : row[ff + j];
    float v = (float)(g / (1.0 + exp(-g)) * u);
    out[i] = v;
    store_planes(hi, lo, i, v);
}
