// The sparse decode and the sparse backward for XLA:CPU, called through the XLA FFI
// (sae_jax/kernels/native.py builds and registers them). In XLA these are gathers that write
// [rows, k, d] blocks out, batched dots of 1 x k by k x d, and sorted scatter-adds whose updates
// are built in memory first; here each row or latent is summed in registers and L1 and written
// once, the rows or latents spread over XLA's intra-op thread pool.
//
// Shapes: every operand may carry the same leading batch axes G (a vmapped bank), which are
// looped over. Indices follow jnp's `table[idx]` and `.at[idx].add`: a negative index counts from
// the end, then one still outside [0, W) is clamped when gathering and dropped when scattering. Each output element is a float32 sum in a fixed order, so a result
// does not depend on the number of threads:
//   GatherSum   out[r, :] = sum_s values[r, s] * table[idx[r, s], :]         (s ascending)
//   GatherDots  out[r, s] = <table[idx[r, s], :], src[r, :]>                 (16 lanes, then the lanes)
//   ScatterRows out[j, :] = sum over slots (r, s), idx[r, s] = j, of coef[r, s] * src[r, :]
//               (slots in row-major order: a counting sort by latent, stable), or out^T [D, W]
//               with `transposed`; latents without slots get zeros.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 64;  // latents per ScatterRows work unit

inline int64_t Batch(int64_t count, int64_t inner) { return inner == 0 ? 0 : count / inner; }

inline int64_t Wrap(int32_t j, int64_t w) { return j < 0 ? j + w : j; }
inline int64_t Clamped(int32_t j, int64_t w) { return std::clamp<int64_t>(Wrap(j, w), 0, w - 1); }

inline void Axpy(float c, const float* __restrict t, float* __restrict o, int64_t d) {
  for (int64_t i = 0; i < d; ++i) o[i] += c * t[i];
}

inline float Dot(const float* __restrict a, const float* __restrict b, int64_t d) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  float tail = 0.f;
  for (; i < d; ++i) tail += a[i] * b[i];
  float sum = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) sum += acc[l];
  return sum + tail;
}

ffi::Error BadShapes(const char* what) { return ffi::Error::InvalidArgument(what); }

ffi::Error GatherSumImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> idx,
                         ffi::Buffer<ffi::F32> table, ffi::ResultBuffer<ffi::F32> out) {
  const auto td = table.dimensions();
  const auto id = idx.dimensions();
  if (td.size() < 2 || id.size() < 2) return BadShapes("sae_jax gather_sum: table [..., W, D] and idx [..., R, K]");
  const int64_t w = td[td.size() - 2], d = td[td.size() - 1], k = id[id.size() - 1];
  const int64_t groups = Batch(table.element_count(), w * d);
  const int64_t rows = Batch(idx.element_count(), k);
  if (values.element_count() != idx.element_count() || groups < 1 || rows % groups ||
      static_cast<int64_t>(out->element_count()) != rows * d || w < 1)
    return BadShapes("sae_jax gather_sum: values and idx [G, R, K], table [G, W, D], out [G, R, D]");
  const int64_t per = rows / groups;
  const float* v = values.typed_data();
  const int32_t* ix = idx.typed_data();
  const float* tb = table.typed_data();
  float* o = out->typed_data();
  sae_jax::ParallelFor(pool, rows, 16, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const float* t = tb + (q / per) * w * d;
      float* oq = o + q * d;
      std::fill(oq, oq + d, 0.f);
      for (int64_t s = 0; s < k; ++s) {
        const int64_t j = Clamped(ix[q * k + s], w);
        Axpy(v[q * k + s], t + j * d, oq, d);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error GatherDotsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::F32> src,
                          ffi::Buffer<ffi::S32> idx, ffi::ResultBuffer<ffi::F32> out) {
  const auto td = table.dimensions();
  const auto id = idx.dimensions();
  if (td.size() < 2 || id.size() < 2) return BadShapes("sae_jax gather_dots: table [..., W, D] and idx [..., R, K]");
  const int64_t w = td[td.size() - 2], d = td[td.size() - 1], k = id[id.size() - 1];
  const int64_t groups = Batch(table.element_count(), w * d);
  const int64_t rows = Batch(idx.element_count(), k);
  if (static_cast<int64_t>(src.element_count()) != rows * d || groups < 1 || rows % groups ||
      out->element_count() != idx.element_count() || w < 1)
    return BadShapes("sae_jax gather_dots: table [G, W, D], src [G, R, D], idx and out [G, R, K]");
  const int64_t per = rows / groups;
  const float* tb = table.typed_data();
  const float* sr = src.typed_data();
  const int32_t* ix = idx.typed_data();
  float* o = out->typed_data();
  sae_jax::ParallelFor(pool, rows, 16, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const float* t = tb + (q / per) * w * d;
      for (int64_t s = 0; s < k; ++s) {
        const int64_t j = Clamped(ix[q * k + s], w);
        o[q * k + s] = Dot(t + j * d, sr + q * d, d);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error ScatterRowsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> src, ffi::Buffer<ffi::F32> coef,
                           ffi::Buffer<ffi::S32> idx, ffi::ResultBuffer<ffi::F32> out, bool transposed) {
  const auto sd = src.dimensions();
  const auto id = idx.dimensions();
  const auto od = out->dimensions();
  if (sd.size() < 2 || id.size() < 2 || od.size() < 2)
    return BadShapes("sae_jax scatter_rows: src [..., R, D], idx [..., R, K], out [..., W, D]");
  const int64_t d = sd[sd.size() - 1], k = id[id.size() - 1];
  const int64_t w = transposed ? od[od.size() - 1] : od[od.size() - 2];
  const int64_t rows = Batch(idx.element_count(), k);
  const int64_t groups = Batch(out->element_count(), w * d);
  if (coef.element_count() != idx.element_count() || static_cast<int64_t>(src.element_count()) != rows * d ||
      groups < 1 || rows % groups || (transposed ? od[od.size() - 2] : od[od.size() - 1]) != d)
    return BadShapes("sae_jax scatter_rows: src [G, R, D], coef and idx [G, R, K], out [G, W, D] (or [G, D, W])");
  const int64_t per = rows / groups, slots = per * k;
  std::vector<int64_t> start(w + 1);
  std::vector<int32_t> order(slots);
  for (int64_t g = 0; g < groups; ++g) {
    const int32_t* ix = idx.typed_data() + g * slots;
    const float* cf = coef.typed_data() + g * slots;
    const float* sr = src.typed_data() + g * per * d;
    float* o = out->typed_data() + g * w * d;
    // counting sort of the slots by latent, stable (slot order within a latent)
    std::fill(start.begin(), start.end(), 0);
    for (int64_t p = 0; p < slots; ++p) {
      const int64_t j = Wrap(ix[p], w);
      if (j >= 0 && j < w) ++start[j + 1];
    }
    for (int64_t j = 0; j < w; ++j) start[j + 1] += start[j];
    {
      std::vector<int64_t> fill(start.begin(), start.end() - 1);
      for (int64_t p = 0; p < slots; ++p) {
        const int64_t j = Wrap(ix[p], w);
        if (j >= 0 && j < w) order[fill[j]++] = static_cast<int32_t>(p);
      }
    }
    // latents in blocks of kBlock, summed into a block buffer [kBlock, d] (in L2); transposed,
    // the block is written as d runs of kBlock contiguous floats, so each of the d output rows
    // (a page apart at large W) is visited once per block, not once per latent
    sae_jax::ParallelFor(pool, (w + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> blk(kBlock * d);
      for (int64_t j0 = b0 * kBlock; j0 < std::min(w, b1 * kBlock); j0 += kBlock) {
        const int64_t nb = std::min(kBlock, w - j0);
        for (int64_t l = 0; l < nb; ++l) {
          float* acc = blk.data() + l * d;
          std::fill(acc, acc + d, 0.f);
          for (int64_t e = start[j0 + l]; e < start[j0 + l + 1]; ++e) {
            const int64_t p = order[e];
            Axpy(cf[p], sr + (p / k) * d, acc, d);
          }
        }
        if (transposed) {
          for (int64_t i = 0; i < d; ++i)
            for (int64_t l = 0; l < nb; ++l) o[i * w + j0 + l] = blk[l * d + i];
        } else {
          std::copy(blk.begin(), blk.begin() + nb * d, o + j0 * d);
        }
      }
    });
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeJaxGatherSum, GatherSumImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeJaxGatherDots, GatherDotsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeJaxScatterRows, ScatterRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed"));
