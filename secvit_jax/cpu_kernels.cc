// Native kernels for XLA's CPU backend, as XLA FFI custom calls: the depthwise k×k convolution
// (stride 1, 'same' zero padding), the kernel gradient of the stem's dense 3×3 convolutions, and
// the clustering's row-wise stable argsort and token permutation. Loaded and registered by
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
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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
      ForEachChannelBlock(g.channels, [&](auto block, int64_t c0, int64_t count) {
        ShiftedSumRow<decltype(block)::value>(g, input, weight, b, h, c0, count, dst);
      });
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
    ForEachChannelBlock(g.channels, [&](auto block, int64_t c0, int64_t count) {
      KernelGradRow<decltype(block)::value>(g, input, grad, b, h, c0, count, partial);
    });
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
      float acc[kInTile][kOutTile] = {};
      for (int64_t wo = first; wo < last; ++wo) {
        const float* xv = input_row + (g.stride * wo + j - g.pad) * g.in_channels;
        const float* gv = grad_row + wo * g.out_channels;
        for (int64_t a = 0; a < ins; ++a) {
          const float xa = xv[a];
          for (int64_t c = 0; c < kOutTile; ++c) acc[a][c] += xa * gv[c];
        }
      }
      float* out = partial + ((i * g.size + j) * g.in_channels + ci0) * g.out_channels + co0;
      for (int64_t a = 0; a < ins; ++a) {
        for (int64_t c = 0; c < kOutTile; ++c) out[a * g.out_channels + c] += acc[a][c];
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
