// Work split over XLA's intra-op thread pool for the native CPU kernels.
#ifndef SAE_JAX_PARALLEL_H_
#define SAE_JAX_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace sae_jax {

// Calls fn(begin, end) over [0, n) in chunks of at least `min_chunk` (a few chunks per thread),
// on the caller and on tasks scheduled on `pool`. Chunks are claimed from an atomic counter and
// the caller waits only for claimed chunks, so a pool task that starts late finds no work (the
// shared state outlives the call through the tasks' shared_ptr) and a busy pool cannot
// deadlock the call.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, int64_t min_chunk, const Fn& fn) {
  if (n <= 0) return;
  struct Work {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk = std::max<int64_t>(std::max<int64_t>(1, min_chunk), (n + 4 * threads - 1) / (4 * threads));
  const int64_t chunks = (n + chunk - 1) / chunk;
  auto work = std::make_shared<Work>();
  const Fn* f = &fn;
  auto run = [n, chunk, chunks, f](Work& w) {
    int64_t c;
    while ((c = w.next.fetch_add(1)) < chunks) {
      (*f)(c * chunk, std::min(n, (c + 1) * chunk));
      if (w.done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(w.mu);
        w.cv.notify_all();
      }
    }
  };
  for (int64_t t = 0, helpers = std::min(threads, chunks) - 1; t < helpers; ++t)
    pool.Schedule([work, run]() { run(*work); });
  run(*work);
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done.load() == chunks; });
}

}  // namespace sae_jax

#endif  // SAE_JAX_PARALLEL_H_
