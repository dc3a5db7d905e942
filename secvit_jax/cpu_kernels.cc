// Native kernels for XLA's CPU backend, as XLA FFI custom calls: the depthwise k×k convolution
// (stride 1, 'same' zero padding), the kernel gradient of the stem's dense 3×3 convolutions, and
// the clustering's row-wise stable argsort and token permutation, and the attention inside the
// clusters fused with the rotary embedding and the head split and merge. Loaded and registered by
// cpu_kernels.py, which compiles this file on first use.
//
// Why hand-written: XLA's CPU code for the depthwise kernel gradient, k² reductions over (B, H, W)
// of shifted input × cotangent, materializes each shifted slice in a scalar pad/slice loop; in
// the secvit_s train step (batch 8, 224²) that took about 2 s of 5.5 s. These loops read each
// input row once per tap from cache and accumulate in place (benchmarks/depthwise.py has the
// figures). XLA's CPU sort took 11 ms to argsort secvit_s's (8, 2, 3136) scores at stage 0, a
// stable sort of each row on the intra-op pool 1.5 ms (4-20× faster over the stages). XLA's CPU
// gather of tokens copies element by element, in a loop fusion with whatever surrounds it (in the
// attention's backward pass: the three inverse permutations, the RoPE transpose and the head
// merge); copying whole rows took the stage-0 attention layer of secvit_s from 91 to 74 ms
// forward and backward.
//
// Depthwise layouts, all float32, row-major: x and out (B, H, W, C); taps and the kernel gradient
// (k, k, C).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// 16 floats as one value of GCC's and Clang's vector extension: the compiler lowers its
// arithmetic to one AVX-512 instruction, two AVX2 ones or four SSE ones, whichever the CPU has.
// The loops below keep their accumulators in such values, which auto-vectorization did not (it
// kept them in memory: 2× slower).
typedef float Vec __attribute__((vector_size(64)));
typedef int32_t IntVec __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

struct Geometry {
  int64_t batch, height, width, channels, size, pad;
};

bool SameShape(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// Reads the geometry off x (B, H, W, C) and taps (k, k, C), k odd.
ffi::Error ReadGeometry(const ffi::Buffer<ffi::F32>& x, ffi::Span<const int64_t> taps,
                        Geometry* geometry) {
  auto dims = x.dimensions();
  if (dims.size() != 4 || taps.size() != 3) {
    return ffi::Error::InvalidArgument("depthwise conv: operands of the wrong rank");
  }
  const int64_t size = taps[0];
  if (taps[1] != size || taps[2] != dims[3] || size % 2 == 0) {
    return ffi::Error::InvalidArgument("depthwise conv: taps must be (k, k, C) with k odd");
  }
  *geometry = Geometry{dims[0], dims[1], dims[2], dims[3], size, size / 2};
  return ffi::Error::Success();
}

// Runs body(chunk, begin, end) over [0, n) split into `chunks` parts, on XLA's intra-op thread
// pool and the calling thread. The caller claims chunks too, so it finishes alone if every pool
// thread is busy (no deadlock when the pool's threads are themselves running such calls); a task
// that starts after all chunks are claimed returns without touching `body`.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t chunks, const Body& body) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (chunks <= 1) {
    body(0, 0, n);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mutex;
    std::condition_variable all_done;
  };
  auto state = std::make_shared<State>();
  auto work = [state, chunks, n, &body]() {
    for (int64_t chunk; (chunk = state->next.fetch_add(1)) < chunks;) {
      body(chunk, chunk * n / chunks, (chunk + 1) * n / chunks);
      std::lock_guard<std::mutex> lock(state->mutex);
      if (++state->done == chunks) state->all_done.notify_all();
    }
  };
  for (int64_t t = 1; t < std::min(threads, chunks); ++t) {
    auto task = work;  // Schedule takes ownership of its own copy.
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->all_done.wait(lock, [&] { return state->done == chunks; });
}

// Sums row(r, partial) over rows r in [0, rows) into total (`size` floats): one partial sum per
// chunk of rows, added in chunk order, so the result does not depend on which thread ran which
// chunk (training stays bit-reproducible); 16 chunks keep 2-16 threads busy.
template <typename Row>
void SumOverRowChunks(ffi::ThreadPool& pool, int64_t rows, int64_t size, float* total,
                      const Row& row) {
  const int64_t chunks = std::min<int64_t>(rows, 16);
  if (chunks == 0) {
    std::fill(total, total + size, 0.0f);
    return;
  }
  std::vector<float> partials(chunks * size, 0.0f);
  ParallelFor(pool, rows, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    float* partial = partials.data() + chunk * size;
    for (int64_t r = begin; r < end; ++r) row(r, partial);
  });
  std::copy(partials.begin(), partials.begin() + size, total);
  for (int64_t chunk = 1; chunk < chunks; ++chunk) {
    for (int64_t t = 0; t < size; ++t) total[t] += partials[chunk * size + t];
  }
}

// Channels are processed in blocks of kBlock, each accumulated in registers across the taps (the
// forward pass) or across a row (the kernel gradient) and written once. Block loops of a constant
// trip count vectorize fully; the last, partial block of a channel count that is not a multiple of
// kBlock (none in the released variants) takes the same loop with a variable count.
constexpr int64_t kBlock = 64;

// Calls row(count_constant, c0, count) for each block of channels [c0, c0 + count); the constant
// is kBlock for a full block and 0 (count known only at run time) for the last, partial one.
template <typename Row>
void ForEachChannelBlock(int64_t channels, const Row& row) {
  for (int64_t c0 = 0; c0 < channels; c0 += kBlock) {
    const int64_t count = std::min(kBlock, channels - c0);
    if (count == kBlock) {
      row(std::integral_constant<int64_t, kBlock>(), c0, count);
    } else {
      row(std::integral_constant<int64_t, 0>(), c0, count);
    }
  }
}

template <int64_t kCount>
inline void MultiplyAdd(float* __restrict__ acc, const float* __restrict__ a,
                        const float* __restrict__ b, int64_t count) {
  const int64_t n = kCount > 0 ? kCount : count;
  for (int64_t c = 0; c < n; ++c) acc[c] += a[c] * b[c];
}

// One output row of the forward pass, channels [c0, c0 + count).
template <int64_t kCount>
void ShiftedSumRow(const Geometry& g, const float* input, const float* weight, int64_t b,
                   int64_t h, int64_t c0, int64_t count, float* dst) {
  const int64_t row = g.width * g.channels;
  for (int64_t w = 0; w < g.width; ++w) {
    float acc[kBlock] = {};
    for (int64_t i = 0; i < g.size; ++i) {
      const int64_t source_h = h + i - g.pad;
      if (source_h < 0 || source_h >= g.height) continue;
      const float* src = input + (b * g.height + source_h) * row + c0;
      for (int64_t j = 0; j < g.size; ++j) {
        const int64_t source_w = w + j - g.pad;
        if (source_w < 0 || source_w >= g.width) continue;
        MultiplyAdd<kCount>(acc, src + source_w * g.channels,
                            weight + (i * g.size + j) * g.channels + c0, count);
      }
    }
    std::copy(acc, acc + count, dst + w * g.channels + c0);
  }
}

// ShiftedSumRow for k = kSize and the 16·V channels from c0, the k² × V tap vectors and the V
// accumulators held in registers (the loop above kept its accumulators in memory and reloaded the
// taps for every pixel). Bit-identical (the same products summed in the same order). Alone, batch
// 8, 2-core CPU: 3×3 at (56, 56, 192) 3.45 -> 1.22 ms, at (14, 14, 768) 0.96 -> 0.37; 5×5 at
// (56, 56, 64) 1.57 -> 1.22.
template <int64_t kSize, int64_t V>
void ShiftedSumRowInRegisters(const Geometry& g, const float* input, const float* weight,
                              int64_t b, int64_t h, int64_t c0, float* dst) {
  constexpr int64_t kPad = kSize / 2;
  Vec taps[kSize * kSize][V];
  for (int64_t t = 0; t < kSize * kSize; ++t) {
    for (int64_t v = 0; v < V; ++v) taps[t][v] = Load(weight + t * g.channels + c0 + v * kLanes);
  }
  const int64_t row = g.width * g.channels;
  for (int64_t w = 0; w < g.width; ++w) {
    Vec acc[V] = {};
    for (int64_t i = 0; i < kSize; ++i) {
      const int64_t source_h = h + i - kPad;
      if (source_h < 0 || source_h >= g.height) continue;
      const float* src = input + (b * g.height + source_h) * row + c0;
      for (int64_t j = 0; j < kSize; ++j) {
        const int64_t source_w = w + j - kPad;
        if (source_w < 0 || source_w >= g.width) continue;
        for (int64_t v = 0; v < V; ++v) {
          acc[v] += Load(src + source_w * g.channels + v * kLanes) * taps[i * kSize + j][v];
        }
      }
    }
    for (int64_t v = 0; v < V; ++v) Store(dst + w * g.channels + c0 + v * kLanes, acc[v]);
  }
}

// out[b, h, w, c] = sum_ij x[b, h + i - p, w + j - p, c] · taps[i, j, c]; taps in (i, j) order.
ffi::Error ShiftedSumImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> taps, ffi::ResultBuffer<ffi::F32> out) {
  Geometry g;
  if (ffi::Error error = ReadGeometry(x, taps.dimensions(), &g); error.failure()) {
    return error;
  }
  const float* input = x.typed_data();
  const float* weight = taps.typed_data();
  float* output = out->typed_data();
  const int64_t rows = g.batch * g.height;
  ParallelFor(pool, rows, std::min<int64_t>(rows, 4 * pool.num_threads()),
              [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / g.height, h = bh % g.height;
      float* dst = output + bh * g.width * g.channels;
      if (g.size == 3 && g.channels % (2 * kLanes) == 0) {
        for (int64_t c0 = 0; c0 < g.channels; c0 += 2 * kLanes) {
          ShiftedSumRowInRegisters<3, 2>(g, input, weight, b, h, c0, dst);
        }
      } else if (g.size == 5 && g.channels % kLanes == 0) {
        for (int64_t c0 = 0; c0 < g.channels; c0 += kLanes) {
          ShiftedSumRowInRegisters<5, 1>(g, input, weight, b, h, c0, dst);
        }
      } else {
        ForEachChannelBlock(g.channels, [&](auto block, int64_t c0, int64_t count) {
          ShiftedSumRow<decltype(block)::value>(g, input, weight, b, h, c0, count, dst);
        });
      }
    }
  });
  return ffi::Error::Success();
}

// Adds to partial[(i, j), c0 : c0 + count] the products of output row (b, h) with its k² shifts.
template <int64_t kCount>
void KernelGradRow(const Geometry& g, const float* input, const float* grad, int64_t b,
                   int64_t h, int64_t c0, int64_t count, float* partial) {
  const int64_t row = g.width * g.channels;
  const float* gr = grad + (b * g.height + h) * row + c0;
  for (int64_t i = 0; i < g.size; ++i) {
    const int64_t source_h = h + i - g.pad;
    if (source_h < 0 || source_h >= g.height) continue;
    const float* src = input + (b * g.height + source_h) * row + c0;
    for (int64_t j = 0; j < g.size; ++j) {
      const int64_t shift = j - g.pad;
      const int64_t w_end = std::min<int64_t>(g.width, g.width - shift);
      float acc[kBlock] = {};
      for (int64_t w = std::max<int64_t>(0, -shift); w < w_end; ++w) {
        MultiplyAdd<kCount>(acc, src + (w + shift) * g.channels, gr + w * g.channels, count);
      }
      float* out = partial + (i * g.size + j) * g.channels + c0;
      for (int64_t c = 0; c < count; ++c) out[c] += acc[c];
    }
  }
}

// KernelGradRow for k = kSize and the 16·V channels from c0, the k products of a tap row
// accumulated in registers at once (each cotangent vector loaded once for them). Bit-identical;
// 3×3 at (56, 56, 192) 1.59 -> 1.20 ms, at (14, 14, 768) 0.56 -> 0.45 (5×5 gained nothing).
template <int64_t kSize, int64_t V>
void KernelGradRowInRegisters(const Geometry& g, const float* input, const float* grad, int64_t b,
                              int64_t h, int64_t c0, float* partial) {
  constexpr int64_t kPad = kSize / 2;
  const int64_t row = g.width * g.channels;
  const float* gr = grad + (b * g.height + h) * row + c0;
  for (int64_t i = 0; i < kSize; ++i) {
    const int64_t source_h = h + i - kPad;
    if (source_h < 0 || source_h >= g.height) continue;
    const float* src = input + (b * g.height + source_h) * row + c0;
    Vec acc[kSize][V] = {};
    for (int64_t w = 0; w < g.width; ++w) {
      Vec grad_w[V];
      for (int64_t v = 0; v < V; ++v) grad_w[v] = Load(gr + w * g.channels + v * kLanes);
      for (int64_t j = 0; j < kSize; ++j) {
        const int64_t source_w = w + j - kPad;
        if (source_w < 0 || source_w >= g.width) continue;
        for (int64_t v = 0; v < V; ++v) {
          acc[j][v] += Load(src + source_w * g.channels + v * kLanes) * grad_w[v];
        }
      }
    }
    for (int64_t j = 0; j < kSize; ++j) {
      float* out = partial + (i * kSize + j) * g.channels + c0;
      for (int64_t v = 0; v < V; ++v) Store(out + v * kLanes, Load(out + v * kLanes) + acc[j][v]);
    }
  }
}

// dk[i, j, c] = sum_bhw x[b, h + i - p, w + j - p, c] · cotangent[b, h, w, c].
ffi::Error KernelGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> cotangent, ffi::ResultBuffer<ffi::F32> dk) {
  if (!SameShape(x.dimensions(), cotangent.dimensions())) {
    return ffi::Error::InvalidArgument("depthwise conv: cotangent and x differ in shape");
  }
  Geometry g;
  if (ffi::Error error = ReadGeometry(x, dk->dimensions(), &g); error.failure()) {
    return error;
  }
  const float* input = x.typed_data();
  const float* grad = cotangent.typed_data();
  const int64_t taps = g.size * g.size * g.channels;
  SumOverRowChunks(pool, g.batch * g.height, taps, dk->typed_data(),
                   [&](int64_t bh, float* partial) {
    const int64_t b = bh / g.height, h = bh % g.height;
    if (g.size == 3 && g.channels % (2 * kLanes) == 0) {
      for (int64_t c0 = 0; c0 < g.channels; c0 += 2 * kLanes) {
        KernelGradRowInRegisters<3, 2>(g, input, grad, b, h, c0, partial);
      }
    } else {
      ForEachChannelBlock(g.channels, [&](auto block, int64_t c0, int64_t count) {
        KernelGradRow<decltype(block)::value>(g, input, grad, b, h, c0, count, partial);
      });
    }
  });
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------------
// The kernel gradient of a dense k×k convolution (stride s, zero padding p), NHWC / HWIO:
//   dw[i, j, ci, co] =
//       sum_{b, ho, wo} x[b, s·ho + i - p, s·wo + j - p, ci] · cotangent[b, ho, wo, co].
// XLA's CPU code for it (a convolution whose contraction runs over the batch and the pixels, with
// layout copies around it) took 56.7 ms for the stem's conv_1 (8×112×112×32 -> 32), this 11.9 ms;
// each tap is a sum of outer products accumulated in registers, a tile of kInTile input channels ×
// kOutTile output channels at a time, over one output row. Which convs use it: model.Conv3x3.
// The tile's accumulators are vector values (GCC kept the float array in memory): bit-identical
// and about 1.5× faster alone (batch 8: the stem's conv_1 and conv_2, 32 -> 32 at 112², 10.0 ->
// 6.3 ms each; conv_0 2.5 -> 1.6; stage 0's downsample, 64 -> 128 at stride 2, 6.5 -> 4.4).

constexpr int64_t kInTile = 8;
constexpr int64_t kOutTile = 32;

struct ConvGeometry {
  int64_t batch, height, width, in_channels, out_height, out_width, out_channels, size, stride, pad;
};

// Adds to partial (k, k, Cin, Cout) the products of output row (b, ho) with its k² input windows,
// input channels [ci0, ci0 + kIn or in_count) × output channels [co0, co0 + kOutTile).
template <int64_t kIn>
void ConvKernelGradTile(const ConvGeometry& g, const float* input, const float* grad, int64_t b,
                        int64_t ho, int64_t ci0, int64_t in_count, int64_t co0, float* partial) {
  const int64_t ins = kIn > 0 ? kIn : in_count;
  const float* grad_row = grad + ((b * g.out_height + ho) * g.out_width) * g.out_channels + co0;
  for (int64_t i = 0; i < g.size; ++i) {
    const int64_t hi = g.stride * ho + i - g.pad;
    if (hi < 0 || hi >= g.height) continue;
    const float* input_row = input + ((b * g.height + hi) * g.width) * g.in_channels + ci0;
    for (int64_t j = 0; j < g.size; ++j) {
      // The output columns whose input column s·wo + j - p lies inside the image.
      // (Both numerators are floored: C++ division truncates toward zero.)
      const int64_t before = g.pad - j, span = g.width - 1 - j + g.pad;
      const int64_t first = before <= 0 ? 0 : (before + g.stride - 1) / g.stride;
      const int64_t last = span < 0 ? 0 : std::min<int64_t>(g.out_width, span / g.stride + 1);
      constexpr int64_t V = kOutTile / kLanes;
      Vec acc[kInTile][V] = {};  // In registers: kInTile × V accumulators.
      for (int64_t wo = first; wo < last; ++wo) {
        const float* xv = input_row + (g.stride * wo + j - g.pad) * g.in_channels;
        Vec gv[V];
        for (int64_t v = 0; v < V; ++v) gv[v] = Load(grad_row + wo * g.out_channels + v * kLanes);
        for (int64_t a = 0; a < ins; ++a) {
          const float xa = xv[a];
          for (int64_t v = 0; v < V; ++v) acc[a][v] += xa * gv[v];
        }
      }
      float* out = partial + ((i * g.size + j) * g.in_channels + ci0) * g.out_channels + co0;
      for (int64_t a = 0; a < ins; ++a) {
        for (int64_t v = 0; v < V; ++v) {
          float* o = out + a * g.out_channels + v * kLanes;
          Store(o, Load(o) + acc[a][v]);
        }
      }
    }
  }
}

// x (B, H, W, Cin), cotangent (B, Ho, Wo, Cout), stride s, kernel size k (odd), padding k // 2:
// dw (k, k, Cin, Cout). Cout must be a multiple of kOutTile (every conv that uses this is).
ffi::Error ConvKernelGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> cotangent, ffi::ResultBuffer<ffi::F32> dw,
                              int64_t stride) {
  auto xd = x.dimensions();
  auto gd = cotangent.dimensions();
  auto wd = dw->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 4) {
    return ffi::Error::InvalidArgument("conv kernel grad: operands of the wrong rank");
  }
  const int64_t size = wd[0], pad = size / 2;
  ConvGeometry g{xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], gd[3], size, stride, pad};
  if (wd[1] != size || size % 2 == 0 || wd[2] != g.in_channels || wd[3] != g.out_channels ||
      gd[0] != g.batch || stride < 1 ||
      g.out_height != (g.height + 2 * pad - size) / stride + 1 ||
      g.out_width != (g.width + 2 * pad - size) / stride + 1) {
    return ffi::Error::InvalidArgument("conv kernel grad: shapes of x, cotangent and dw disagree");
  }
  if (g.out_channels % kOutTile) {
    return ffi::Error::InvalidArgument("conv kernel grad: output channels not a multiple of 32");
  }
  const float* input = x.typed_data();
  const float* grad = cotangent.typed_data();
  const int64_t weights = size * size * g.in_channels * g.out_channels;
  SumOverRowChunks(pool, g.batch * g.out_height, weights, dw->typed_data(),
                   [&](int64_t row, float* partial) {
    const int64_t b = row / g.out_height, ho = row % g.out_height;
    for (int64_t co0 = 0; co0 < g.out_channels; co0 += kOutTile) {
      for (int64_t ci0 = 0; ci0 < g.in_channels; ci0 += kInTile) {
        const int64_t count = std::min(kInTile, g.in_channels - ci0);
        if (count == kInTile) {
          ConvKernelGradTile<kInTile>(g, input, grad, b, ho, ci0, count, co0, partial);
        } else {
          ConvKernelGradTile<0>(g, input, grad, b, ho, ci0, count, co0, partial);
        }
      }
    }
  });
  return ffi::Error::Success();
}

// A key whose signed integer order is the order jnp.argsort gives on XLA's CPU backend: every NaN
// after +inf, and -0.0, +0.0 and the denormals (which XLA's CPU code flushes to zero) all equal.
inline int32_t SortKey(float value) {
  if (value != value) return std::numeric_limits<int32_t>::max();
  if (std::fabs(value) < std::numeric_limits<float>::min()) return 0;
  int32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits ^ ((bits >> 31) & 0x7fffffff);
}

// order[r, :] = the stable ascending argsort of scores[r, :], for every row r of the last axis.
ffi::Error ArgsortImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scores,
                       ffi::ResultBuffer<ffi::S32> order) {
  auto dims = scores.dimensions();
  if (dims.size() == 0 || !SameShape(dims, order->dimensions())) {
    return ffi::Error::InvalidArgument("argsort: scores and order must have one shape");
  }
  const int64_t length = dims.back();
  const int64_t rows = length ? scores.element_count() / length : 0;
  const float* values = scores.typed_data();
  int32_t* indices = order->typed_data();
  ParallelFor(pool, rows, std::min<int64_t>(rows, 4 * pool.num_threads()),
              [&](int64_t, int64_t begin, int64_t end) {
    std::vector<int32_t> keys(length);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = values + r * length;
      for (int64_t i = 0; i < length; ++i) keys[i] = SortKey(row[i]);
      int32_t* out = indices + r * length;
      std::iota(out, out + length, 0);
      std::stable_sort(out, out + length, [&](int32_t a, int32_t b) { return keys[a] < keys[b]; });
    }
  });
  return ffi::Error::Success();
}

// out[n, i, :] = x[n, index[n, i], :] for x and out (N, L, D) (any element type, any number of
// leading axes folded into N) and index (N, L) int32 in [0, L): one memcpy per row of D values.
ffi::Error GatherRowsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> index,
                          ffi::Result<ffi::AnyBuffer> out) {
  auto dims = x.dimensions();
  auto index_dims = index.dimensions();
  if (dims.size() < 2 || !SameShape(dims, out->dimensions()) ||
      !SameShape(dims.first(dims.size() - 1), index_dims) ||
      x.element_type() != out->element_type()) {
    return ffi::Error::InvalidArgument("gather rows: x and out (..., L, D), index (..., L)");
  }
  const int64_t length = dims[dims.size() - 2];
  const int64_t rows = index.element_count();
  const int64_t row_bytes = dims.back() * static_cast<int64_t>(ffi::ByteWidth(x.element_type()));
  const char* source = static_cast<const char*>(x.untyped_data());
  char* destination = static_cast<char*>(out->untyped_data());
  const int32_t* indices = index.typed_data();
  for (int64_t r = 0; r < rows; ++r) {
    if (indices[r] < 0 || indices[r] >= length) {
      return ffi::Error::InvalidArgument("gather rows: an index is out of [0, L)");
    }
  }
  ParallelFor(pool, rows, std::min<int64_t>(rows, 8 * pool.num_threads()),
              [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t base = r - r % length;  // First row of r's sequence.
      std::memcpy(destination + r * row_bytes, source + (base + indices[r]) * row_bytes,
                  row_bytes);
    }
  });
  return ffi::Error::Success();
}


// ------------------------------------------------------------------------------------------------
// Attention inside semantic equitable clusters, fused with what surrounds it (sec.py's
// `fused_cluster_attention`). Per (batch, head, cluster) the forward pass gathers the cluster's T
// tokens straight from the qkv projection's rows, applies the rotary embedding and the key scale,
// runs softmax attention over the cluster and writes each output row back at its token's place,
// heads merged. The backward pass recomputes the weights from each row's saved log-sum-exp
// (nothing of size T × T is kept between the passes) and writes the qkv gradient in the qkv
// layout. XLA's CPU code for the same work (head split and merge transposes, RoPE, row gathers,
// batched (T, d) dots and the softmax) moved every activation several times; the figures are in
// sec.fused_cluster_attention's docstring.
//
// Layouts, float32, row-major: qkv (B, L, 3C), channel m·C + h·d + e being element e of part m
// (q, k, v) of head h; sin, cos (L, d); order (B, heads, L) int32, each row a permutation, cluster
// c of (b, h) holding tokens order[b, h, c·T : min((c+1)·T, L)] (a last cluster shorter than T
// is sec.cluster_attention's cluster with pad slots: their keys masked, their outputs dropped);
// out and its cotangent (B, L, C), channel h·d + e; lse (B, heads, L) by position in `order`.

typedef float HalfVec __attribute__((vector_size(32)));
typedef float QuarterVec __attribute__((vector_size(16)));

// The 16 lanes folded in halves (a tree of vector operations, not 15 scalar ones): sum and max.
template <typename Fold>
inline float Reduce(Vec v, const Fold& fold) {
  HalfVec low, high;
  std::memcpy(&low, &v, sizeof(low));
  std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof(low), sizeof(high));
  const HalfVec half = fold(low, high);
  QuarterVec a, b;
  std::memcpy(&a, &half, sizeof(a));
  std::memcpy(&b, reinterpret_cast<const char*>(&half) + sizeof(a), sizeof(b));
  const QuarterVec quarter = fold(a, b);
  return fold(fold(quarter[0], quarter[1]), fold(quarter[2], quarter[3]));
}

inline float Sum(Vec v) {
  return Reduce(v, [](auto x, auto y) { return x + y; });
}

inline float Max(Vec v) {
  return Reduce(v, [](auto x, auto y) { return x > y ? x : y; });
}

// Rows of a cluster's (T, T) tiles are padded to whole vectors.
inline int64_t PadToTile(int64_t tokens) { return (tokens + kLanes - 1) / kLanes * kLanes; }

// out[r, 0:16·V] = sum_{i < n} a[r·row_stride + i·inner_stride] · b[i·b_stride + 0:16·V] for
// r < R: R rows of one cluster's products, the R × V accumulators in registers.
template <int64_t R, int64_t V>
inline void TileRows(const float* a, int64_t row_stride, int64_t inner_stride, const float* b,
                     int64_t b_stride, int64_t n, float* out, int64_t out_stride) {
  Vec acc[R][V] = {};
  for (int64_t i = 0; i < n; ++i) {
    Vec bi[V];
    for (int64_t v = 0; v < V; ++v) bi[v] = Load(b + i * b_stride + v * kLanes);
    for (int64_t r = 0; r < R; ++r) {
      const float ar = a[r * row_stride + i * inner_stride];
      for (int64_t v = 0; v < V; ++v) acc[r][v] += ar * bi[v];
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t v = 0; v < V; ++v) Store(out + r * out_stride + v * kLanes, acc[r][v]);
  }
}

// TileRows over `rows` rows: R at a time, then one at a time.
template <int64_t R, int64_t V>
inline void TileProduct(const float* a, int64_t row_stride, int64_t inner_stride, const float* b,
                        int64_t b_stride, int64_t n, int64_t rows, float* out,
                        int64_t out_stride) {
  int64_t r = 0;
  for (; r + R <= rows; r += R) {
    TileRows<R, V>(a + r * row_stride, row_stride, inner_stride, b, b_stride, n,
                   out + r * out_stride, out_stride);
  }
  for (; r < rows; ++r) {
    TileRows<1, V>(a + r * row_stride, row_stride, inner_stride, b, b_stride, n,
                   out + r * out_stride, out_stride);
  }
}

// Rows per tile of a product of 16·V columns: 8 vector accumulators.
template <int64_t V>
constexpr int64_t RowsFor() { return V >= 8 ? 1 : 8 / V; }

// exp(x), x clamped to [-87, 88]: Cephes' single-precision polynomial (within 2 ulp of expf).
inline Vec Exp(Vec x) {
  const Vec low = Vec{} - 87.0f, high = Vec{} + 88.0f;
  x = x < low ? low : x;
  x = x > high ? high : x;
  const Vec y = x * 1.44269504088896341f + 0.5f;  // n = floor(y), from truncation toward zero.
  IntVec n = __builtin_convertvector(y, IntVec);
  n += __builtin_convertvector(n, Vec) > y;  // -1 where truncation rounded a negative y up.
  const Vec nf = __builtin_convertvector(n, Vec);
  const Vec r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  Vec p = Vec{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * reinterpret_cast<Vec>((n + 127) << 23);
}

struct ClusterGeometry {
  int64_t batch, length, channels, heads, tokens;  // tokens: T, per cluster.
  float scale;                                     // The key scale, d^-0.5.
};

// One cluster's scratch, floats: q, k, v, a (T, d) row buffer; kᵀ, vᵀ (d, padded); two
// (T, padded) tiles; the row sums.
template <int64_t kDim>
int64_t ClusterScratchSize(int64_t tokens) {
  const int64_t padded = PadToTile(tokens);
  return 4 * tokens * kDim + 2 * kDim * padded + 2 * tokens * padded + tokens;
}

// Transposes rows (T, kDim) into columns (kDim, padded), zero past T.
template <int64_t kDim>
void TransposeRows(int64_t tokens, const float* rows, float* columns) {
  const int64_t padded = PadToTile(tokens);
  std::fill(columns, columns + kDim * padded, 0.0f);
  for (int64_t i = 0; i < tokens; ++i) {
    for (int64_t e = 0; e < kDim; ++e) columns[e * padded + i] = rows[i * kDim + e];
  }
}

// The cluster's tokens are scattered over the feature map, so each row gathered is a cache miss:
// rows are prefetched this many tokens ahead (stage 0 of secvit_t at batch 8, forward and backward
// kernels: 12.2 and 21.1 ms without, 9.8 and 16.7 with; 12 ahead was no better).
constexpr int64_t kPrefetchAhead = 6;

// Prefetches head h's kDim floats of each of the `parts` parts of token t's row.
template <int64_t kDim>
inline void PrefetchHeadRows(const float* rows, int64_t t, int64_t parts, int64_t channels,
                             int64_t head) {
  for (int64_t m = 0; m < parts; ++m) {
    const float* segment = rows + (t * parts + m) * channels + head * kDim;
    for (int64_t e = 0; e < kDim; e += kLanes) __builtin_prefetch(segment + e);
  }
}

// The rotary embedding of the pair (x[e], x[e+1]) of a row: x·cos + rot(x)·sin, rot mapping
// (x[e], x[e+1]) to (-x[e+1], x[e]); s and c are the token's sin and cos rows.
inline void RotatePair(const float* x, const float* s, const float* c, int64_t e, float* y0,
                       float* y1) {
  *y0 = x[e] * c[e] - x[e + 1] * s[e];
  *y1 = x[e + 1] * c[e + 1] + x[e] * s[e + 1];
}

// Gathers head h's q, k (rotary embedding applied, k scaled) and v of the cluster's tokens from
// qkv rows: q, k, v (n, kDim) for the n tokens of the cluster.
template <int64_t kDim>
void LoadCluster(const ClusterGeometry& g, const float* qkv, const float* sin, const float* cos,
                 const int32_t* tokens, int64_t n, int64_t head, float* q, float* k, float* v) {
  for (int64_t i = 0; i < n; ++i) {
    if (i + kPrefetchAhead < n) PrefetchHeadRows<kDim>(qkv, tokens[i + kPrefetchAhead], 3,
                                                       g.channels, head);
    const int64_t t = tokens[i];
    const float* row = qkv + t * 3 * g.channels + head * kDim;
    const float* s = sin + t * kDim;
    const float* c = cos + t * kDim;
    for (int64_t e = 0; e < kDim; e += 2) {
      RotatePair(row, s, c, e, &q[i * kDim + e], &q[i * kDim + e + 1]);
      float k0, k1;
      RotatePair(row + g.channels, s, c, e, &k0, &k1);
      k[i * kDim + e] = k0 * g.scale;
      k[i * kDim + e + 1] = k1 * g.scale;
    }
    std::copy(row + 2 * g.channels, row + 2 * g.channels + kDim, v + i * kDim);
  }
}

// logits (T, padded) = q kᵀ from q (T, kDim) and kᵀ (kDim, padded).
template <int64_t kDim>
void ClusterLogits(int64_t tokens, const float* q, const float* kt, float* logits) {
  const int64_t padded = PadToTile(tokens);
  for (int64_t j0 = 0; j0 < padded; j0 += kLanes) {
    TileProduct<RowsFor<1>(), 1>(q, kDim, 1, kt + j0, padded, kDim, tokens, logits + j0, padded);
  }
}

template <int64_t kDim>
void ClusterForward(const ClusterGeometry& g, const float* qkv, const float* sin,
                    const float* cos, const int32_t* tokens, int64_t n, int64_t head, float* out,
                    float* lse, float* scratch) {
  const int64_t padded = PadToTile(n);
  float* q = scratch;
  float* k = q + n * kDim;
  float* v = k + n * kDim;
  float* o = v + n * kDim;
  float* kt = o + n * kDim;
  float* weights = kt + 2 * kDim * padded;
  float* sums = weights + 2 * n * padded;
  LoadCluster<kDim>(g, qkv, sin, cos, tokens, n, head, q, k, v);
  TransposeRows<kDim>(n, k, kt);
  ClusterLogits<kDim>(n, q, kt, weights);
  for (int64_t i = 0; i < n; ++i) {  // exp(logit - row max), unnormalized, and the row sums.
    float* row = weights + i * padded;
    std::fill(row + n, row + padded, -std::numeric_limits<float>::infinity());
    Vec max = Load(row);
    for (int64_t j = kLanes; j < padded; j += kLanes) max = max > Load(row + j) ? max : Load(row + j);
    const float row_max = Max(max);
    Vec sum = {};
    for (int64_t j = 0; j < padded; j += kLanes) {
      const Vec w = Exp(Load(row + j) - row_max);
      Store(row + j, w);
      sum += w;
    }
    std::fill(row + n, row + padded, 0.0f);
    sums[i] = Sum(sum);  // The pad columns added exp(-87) each: nothing, next to the max's 1.
    lse[i] = row_max + std::log(sums[i]);
  }
  TileProduct<RowsFor<kDim / kLanes>(), kDim / kLanes>(weights, padded, 1, v, kDim, n, n, o,
                                                     kDim);
  for (int64_t i = 0; i < n; ++i) {  // The output divided by the row sum, at the token's place.
    if (i + kPrefetchAhead < n) PrefetchHeadRows<kDim>(out, tokens[i + kPrefetchAhead], 1,
                                                       g.channels, head);
    float* destination = out + tokens[i] * g.channels + head * kDim;
    for (int64_t e = 0; e < kDim; ++e) destination[e] = o[i * kDim + e] / sums[i];
  }
}

template <int64_t kDim>
void ClusterBackward(const ClusterGeometry& g, const float* qkv, const float* sin,
                     const float* cos, const int32_t* tokens, int64_t n, int64_t head,
                     const float* lse, const float* cotangent, float* dqkv, float* scratch) {
  const int64_t padded = PadToTile(n);
  float* q = scratch;
  float* k = q + n * kDim;
  float* v = k + n * kDim;
  float* dout = v + n * kDim;
  float* kt = dout + n * kDim;
  float* vt = kt + kDim * padded;
  float* weights = vt + kDim * padded;
  float* dlogits = weights + n * padded;
  LoadCluster<kDim>(g, qkv, sin, cos, tokens, n, head, q, k, v);
  TransposeRows<kDim>(n, k, kt);
  TransposeRows<kDim>(n, v, vt);
  for (int64_t i = 0; i < n; ++i) {
    if (i + kPrefetchAhead < n) PrefetchHeadRows<kDim>(cotangent, tokens[i + kPrefetchAhead], 1,
                                                       g.channels, head);
    const float* source = cotangent + tokens[i] * g.channels + head * kDim;
    std::copy(source, source + kDim, dout + i * kDim);
  }
  ClusterLogits<kDim>(n, q, kt, weights);
  ClusterLogits<kDim>(n, dout, vt, dlogits);  // dP = dO vᵀ.
  // P = exp(logit - lse); dS = P ∘ (dP - rowsum(P ∘ dP)), rowsum(P ∘ dP) being dO · O.
  for (int64_t i = 0; i < n; ++i) {
    float* p = weights + i * padded;
    float* dp = dlogits + i * padded;
    Vec dot = {};
    for (int64_t j = 0; j < padded; j += kLanes) {
      const Vec w = Exp(Load(p + j) - lse[i]);
      Store(p + j, w);
      dot += w * Load(dp + j);
    }
    std::fill(p + n, p + padded, 0.0f);  // dP is 0 in the pad columns (vᵀ is), so is their dot.
    const Vec total = Vec{} + Sum(dot);
    for (int64_t j = 0; j < padded; j += kLanes) {
      Store(dp + j, Load(p + j) * (Load(dp + j) - total));
    }
  }
  // dV = Pᵀ dO, dQ = dS k, dK = dSᵀ q: rows (T, kDim), reusing q's, k's and v's buffers in an
  // order that reads each before it is overwritten (dq goes to `dout`'s buffer, read by dV first).
  constexpr int64_t V = kDim / kLanes, R = RowsFor<V>();
  float* dv = vt;  // vᵀ is no longer needed; (kDim, padded) holds (T, kDim).
  TileProduct<R, V>(weights, 1, padded, dout, kDim, n, n, dv, kDim);
  float* dq = dout;
  TileProduct<R, V>(dlogits, padded, 1, k, kDim, n, n, dq, kDim);
  float* dk = kt;  // kᵀ is no longer needed either.
  TileProduct<R, V>(dlogits, 1, padded, q, kDim, n, n, dk, kDim);
  // Back through the key scale and the rotary embedding (its transpose maps (g[e], g[e+1]) to
  // (g[e]·cos[e] + g[e+1]·sin[e+1], g[e+1]·cos[e+1] - g[e]·sin[e])), into the qkv rows.
  for (int64_t i = 0; i < n; ++i) {
    if (i + kPrefetchAhead < n) PrefetchHeadRows<kDim>(dqkv, tokens[i + kPrefetchAhead], 3,
                                                       g.channels, head);
    const int64_t t = tokens[i];
    float* row = dqkv + t * 3 * g.channels + head * kDim;
    const float* s = sin + t * kDim;
    const float* c = cos + t * kDim;
    for (int64_t e = 0; e < kDim; e += 2) {
      const float q0 = dq[i * kDim + e], q1 = dq[i * kDim + e + 1];
      row[e] = q0 * c[e] + q1 * s[e + 1];
      row[e + 1] = q1 * c[e + 1] - q0 * s[e];
      const float k0 = dk[i * kDim + e] * g.scale, k1 = dk[i * kDim + e + 1] * g.scale;
      row[g.channels + e] = k0 * c[e] + k1 * s[e + 1];
      row[g.channels + e + 1] = k1 * c[e + 1] - k0 * s[e];
    }
    std::copy(dv + i * kDim, dv + (i + 1) * kDim, row + 2 * g.channels);
  }
}

// Reads and checks the shapes shared by the forward and backward passes.
ffi::Error ReadClusterGeometry(const ffi::Buffer<ffi::F32>& qkv, const ffi::Buffer<ffi::F32>& sin,
                               const ffi::Buffer<ffi::F32>& cos,
                               const ffi::Buffer<ffi::S32>& order, int64_t heads,
                               int64_t cluster, ClusterGeometry* g) {
  auto dims = qkv.dimensions();
  auto order_dims = order.dimensions();
  if (dims.size() != 3 || dims[2] % (3 * heads) || order_dims.size() != 3) {
    return ffi::Error::InvalidArgument("cluster attention: qkv (B, L, 3C), order (B, heads, L)");
  }
  const int64_t batch = dims[0], length = dims[1], channels = dims[2] / 3;
  const int64_t dim = channels / heads;
  if (order_dims[0] != batch || order_dims[1] != heads || order_dims[2] != length ||
      cluster <= 0) {
    return ffi::Error::InvalidArgument(
        "cluster attention: order must be (B, heads, L) and the cluster size positive");
  }
  if (sin.element_count() != length * dim || cos.element_count() != length * dim) {
    return ffi::Error::InvalidArgument("cluster attention: sin and cos must be (L, d)");
  }
  *g = ClusterGeometry{batch, length, channels, heads, cluster,
                       1.0f / std::sqrt(static_cast<float>(dim))};
  return ffi::Error::Success();
}

// Runs run(kDim constant) for the head dims the kernels are compiled for (sec.FUSED_HEAD_DIMS);
// an error naming `op` for any other.
template <typename Run>
ffi::Error WithHeadDim(int64_t dim, const char* op, const Run& run) {
  switch (dim) {
    case 16: run(std::integral_constant<int64_t, 16>()); break;
    case 32: run(std::integral_constant<int64_t, 32>()); break;
    case 64: run(std::integral_constant<int64_t, 64>()); break;
    default:
      return ffi::Error::InvalidArgument(std::string(op) + ": head dim not 16, 32 or 64");
  }
  return ffi::Error::Success();
}

// Runs cluster(kDim constant, b, h, first token position, tokens, scratch) for every (b, h,
// cluster) on the pool: ceil(L / T) clusters per (b, h), the last holding the L - (its position)
// tokens left when T does not divide L.
template <typename Cluster>
ffi::Error ForEachCluster(ffi::ThreadPool& pool, const ClusterGeometry& g, const Cluster& cluster) {
  const int64_t per_head = (g.length + g.tokens - 1) / g.tokens;
  const int64_t units = g.batch * g.heads * per_head;
  return WithHeadDim(g.channels / g.heads, "cluster attention", [&](auto dim_constant) {
    constexpr int64_t kDim = decltype(dim_constant)::value;
    ParallelFor(pool, units, std::min<int64_t>(units, 8 * pool.num_threads()),
                [&](int64_t, int64_t begin, int64_t end) {
      std::vector<float> scratch(ClusterScratchSize<kDim>(g.tokens));
      for (int64_t u = begin; u < end; ++u) {
        const int64_t bh = u / per_head, position = (u % per_head) * g.tokens;
        cluster(dim_constant, bh / g.heads, bh % g.heads, position,
                std::min(g.tokens, g.length - position), scratch.data());
      }
    });
  });
}

ffi::Error ClusterAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                                ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::F32> cos,
                                ffi::Buffer<ffi::S32> order, ffi::ResultBuffer<ffi::F32> out,
                                ffi::ResultBuffer<ffi::F32> lse, int64_t heads, int64_t cluster) {
  ClusterGeometry g;
  if (auto error = ReadClusterGeometry(qkv, sin, cos, order, heads, cluster, &g);
      error.failure()) {
    return error;
  }
  if (out->element_count() != g.batch * g.length * g.channels ||
      lse->element_count() != order.element_count()) {
    return ffi::Error::InvalidArgument("cluster attention: out (B, L, C), lse (B, heads, L)");
  }
  return ForEachCluster(pool, g, [&](auto dim_constant, int64_t b, int64_t h, int64_t position,
                                     int64_t tokens, float* scratch) {
    constexpr int64_t kDim = decltype(dim_constant)::value;
    const int64_t sequence = (b * g.heads + h) * g.length + position;
    ClusterForward<kDim>(g, qkv.typed_data() + b * g.length * 3 * g.channels, sin.typed_data(),
                         cos.typed_data(), order.typed_data() + sequence, tokens, h,
                         out->typed_data() + b * g.length * g.channels,
                         lse->typed_data() + sequence, scratch);
  });
}

ffi::Error ClusterAttentionGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                                    ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::F32> cos,
                                    ffi::Buffer<ffi::S32> order, ffi::Buffer<ffi::F32> lse,
                                    ffi::Buffer<ffi::F32> cotangent,
                                    ffi::ResultBuffer<ffi::F32> dqkv, int64_t heads,
                                    int64_t cluster) {
  ClusterGeometry g;
  if (auto error = ReadClusterGeometry(qkv, sin, cos, order, heads, cluster, &g);
      error.failure()) {
    return error;
  }
  if (cotangent.element_count() != g.batch * g.length * g.channels ||
      lse.element_count() != order.element_count() ||
      !SameShape(qkv.dimensions(), dqkv->dimensions())) {
    return ffi::Error::InvalidArgument(
        "cluster attention grad: cotangent (B, L, C), lse (B, heads, L), dqkv as qkv");
  }
  return ForEachCluster(pool, g, [&](auto dim_constant, int64_t b, int64_t h, int64_t position,
                                     int64_t tokens, float* scratch) {
    constexpr int64_t kDim = decltype(dim_constant)::value;
    const int64_t sequence = (b * g.heads + h) * g.length + position;
    ClusterBackward<kDim>(g, qkv.typed_data() + b * g.length * 3 * g.channels, sin.typed_data(),
                          cos.typed_data(), order.typed_data() + sequence, tokens, h,
                          lse.typed_data() + sequence,
                          cotangent.typed_data() + b * g.length * g.channels,
                          dqkv->typed_data() + b * g.length * 3 * g.channels, scratch);
  });
}


// The semantic sort's scores straight from the qkv rows: per (b, h), the cosine similarity of each
// token's key (rotary embedding applied, scaled by d^-0.5, as the attention uses it) to the mean
// key. In XLA the same took a strided slice, a transpose, the embedding and several passes over
// the keys: with the argsort, 4.4 ms against 2.5 here at stage 0 of secvit_t, batch 8. The keys
// are float32 as the attention's, their sums and products double: the scores are the float64
// ones rounded once (XLA's float32 sums ordered 6 of 50,176 near-tied tokens the other way).
// scores: (B, heads, L).
template <int64_t kDim>
void KeyRow(const float* row, const float* s, const float* c, float scale, double* key) {
  for (int64_t e = 0; e < kDim; e += 2) {
    float k0, k1;
    RotatePair(row, s, c, e, &k0, &k1);
    key[e] = static_cast<double>(k0) * scale;
    key[e + 1] = static_cast<double>(k1) * scale;
  }
}

ffi::Error SortScoresImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                          ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::F32> cos,
                          ffi::ResultBuffer<ffi::F32> scores, int64_t heads) {
  auto dims = qkv.dimensions();
  if (dims.size() != 3 || dims[2] % (3 * heads)) {
    return ffi::Error::InvalidArgument("sort scores: qkv must be (B, L, 3C), C a multiple of heads");
  }
  const int64_t batch = dims[0], length = dims[1], channels = dims[2] / 3;
  const int64_t dim = channels / heads;
  if (sin.element_count() != length * dim || cos.element_count() != length * dim ||
      scores->element_count() != batch * heads * length) {
    return ffi::Error::InvalidArgument("sort scores: sin, cos (L, d), scores (B, heads, L)");
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  return WithHeadDim(dim, "sort scores", [&](auto dim_constant) {
    constexpr int64_t kDim = decltype(dim_constant)::value;
    ParallelFor(pool, batch * heads, batch * heads, [&](int64_t, int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / heads, h = bh % heads;
        const float* rows = qkv.typed_data() + b * length * 3 * channels + channels + h * kDim;
        double key[kDim], center[kDim] = {};
        for (int64_t t = 0; t < length; ++t) {
          KeyRow<kDim>(rows + t * 3 * channels, sin.typed_data() + t * kDim,
                       cos.typed_data() + t * kDim, scale, key);
          for (int64_t e = 0; e < kDim; ++e) center[e] += key[e];
        }
        double norm = 0.0;  // normalize(v) = v / max(|v|, 1e-12), as the release's.
        for (int64_t e = 0; e < kDim; ++e) norm += center[e] * center[e];
        norm = std::max(std::sqrt(norm) / length, 1e-12);
        for (int64_t e = 0; e < kDim; ++e) center[e] /= length * norm;
        float* out = scores->typed_data() + bh * length;
        for (int64_t t = 0; t < length; ++t) {
          KeyRow<kDim>(rows + t * 3 * channels, sin.typed_data() + t * kDim,
                       cos.typed_data() + t * kDim, scale, key);
          double dot = 0.0, squares = 0.0;
          for (int64_t e = 0; e < kDim; ++e) {
            dot += key[e] * center[e];
            squares += key[e] * key[e];
          }
          out[t] = static_cast<float>(dot / std::max(std::sqrt(squares), 1e-12));
        }
      }
    });
  });
}


// ------------------------------------------------------------------------------------------------
// LayerNorm over the last axis (`model.NativeLayerNorm`): each row read once per pass while it is in
// cache, where XLA's CPU code made separate passes for the mean, the variance and the output
// (and more in the backward). x, y, dy, dx (N, C); scale, bias (C); mean, rstd (N); float32.
//   y = (x - mean) · rstd · scale + bias,  rstd = 1 / sqrt(mean((x - mean)²) + eps)
//   dx = rstd · (g - mean(g) - x̂ · mean(g · x̂)),  g = dy · scale,  x̂ = (x - mean) · rstd
//   dscale = sum over rows of dy · x̂,  dbias = sum over rows of dy

ffi::Error LayerNormImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                         ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                         ffi::ResultBuffer<ffi::F32> rstd, float epsilon) {
  const int64_t channels = x.dimensions().back();
  const int64_t rows = channels ? x.element_count() / channels : 0;
  if (channels % kLanes || scale.element_count() != channels ||
      bias.element_count() != channels || y->element_count() != x.element_count() ||
      mean->element_count() != rows || rstd->element_count() != rows) {
    return ffi::Error::InvalidArgument(
        "layer norm: x, y (N, C), C a multiple of 16, scale, bias (C), mean, rstd (N)");
  }
  const float* gamma = scale.typed_data();
  const float* beta = bias.typed_data();
  ParallelFor(pool, rows, std::min<int64_t>(rows, 8 * pool.num_threads()),
              [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* in = x.typed_data() + r * channels;
      float* out = y->typed_data() + r * channels;
      Vec sum = {};
      for (int64_t c = 0; c < channels; c += kLanes) sum += Load(in + c);
      const float mu = Sum(sum) / channels;
      Vec squares = {};
      for (int64_t c = 0; c < channels; c += kLanes) {
        const Vec d = Load(in + c) - mu;
        squares += d * d;
      }
      const float inverse = 1.0f / std::sqrt(Sum(squares) / channels + epsilon);
      for (int64_t c = 0; c < channels; c += kLanes) {
        Store(out + c, (Load(in + c) - mu) * inverse * Load(gamma + c) + Load(beta + c));
      }
      mean->typed_data()[r] = mu;
      rstd->typed_data()[r] = inverse;
    }
  });
  return ffi::Error::Success();
}

ffi::Error LayerNormGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> mean,
                             ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy,
                             ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                             ffi::ResultBuffer<ffi::F32> dbias) {
  const int64_t channels = x.dimensions().back();
  const int64_t rows = channels ? x.element_count() / channels : 0;
  if (channels % kLanes || scale.element_count() != channels || mean.element_count() != rows ||
      rstd.element_count() != rows || dy.element_count() != x.element_count() ||
      dx->element_count() != x.element_count() || dscale->element_count() != channels ||
      dbias->element_count() != channels) {
    return ffi::Error::InvalidArgument(
        "layer norm grad: x, dy, dx (N, C), scale, dscale, dbias (C), mean, rstd (N)");
  }
  const float* gamma = scale.typed_data();
  std::vector<float> sums(2 * channels);
  SumOverRowChunks(pool, rows, 2 * channels, sums.data(), [&](int64_t r, float* partial) {
    const float* in = x.typed_data() + r * channels;
    const float* grad = dy.typed_data() + r * channels;
    float* out = dx->typed_data() + r * channels;
    const float mu = mean.typed_data()[r], inverse = rstd.typed_data()[r];
    Vec g_sum = {}, gx_sum = {};
    for (int64_t c = 0; c < channels; c += kLanes) {
      const Vec normalized = (Load(in + c) - mu) * inverse;
      const Vec dy_c = Load(grad + c);
      const Vec g = dy_c * Load(gamma + c);
      g_sum += g;
      gx_sum += g * normalized;
      Store(partial + c, Load(partial + c) + dy_c * normalized);
      Store(partial + channels + c, Load(partial + channels + c) + dy_c);
    }
    const float g_mean = Sum(g_sum) / channels, gx_mean = Sum(gx_sum) / channels;
    for (int64_t c = 0; c < channels; c += kLanes) {
      const Vec normalized = (Load(in + c) - mu) * inverse;
      Store(out + c, inverse * (Load(grad + c) * Load(gamma + c) - g_mean - normalized * gx_mean));
    }
  });
  std::copy(sums.begin(), sums.begin() + channels, dscale->typed_data());
  std::copy(sums.begin() + channels, sums.end(), dbias->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SecvitGatherRows, GatherRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SecvitDepthwiseShiftedSum, ShiftedSumImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SecvitDepthwiseKernelGrad, KernelGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SecvitConvKernelGrad, ConvKernelGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SecvitArgsort, ArgsortImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SecvitClusterAttention, ClusterAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("cluster"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SecvitClusterAttentionGrad, ClusterAttentionGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("cluster"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SecvitSortScores, SortScoresImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("heads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SecvitLayerNorm, LayerNormImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SecvitLayerNormGrad, LayerNormGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
