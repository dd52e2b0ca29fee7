#include "buffer_cache.h"
#include "shared_state.h"

#include <cstdlib>
#include <mutex>

namespace linclass {
namespace {

constexpr size_t kAlignment = 64;
constexpr size_t kMaxBlocks = 8;

size_t byte_limit() {
  // LINCLASS_CPU_CACHE_MB=0 disables the cache.
  static const size_t limit = [] {
    const char* env = std::getenv("LINCLASS_CPU_CACHE_MB");
    const long long mb = env ? std::atoll(env) : 2048;
    return mb > 0 ? size_t(mb) << 20 : size_t(0);
  }();
  return limit;
}

class BufferCache {
 public:
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t i = 0; i < free_.size(); ++i) {
        if (free_[i].bytes == bytes) {
          void* p = free_[i].ptr;
          cached_bytes_ -= bytes;
          free_.erase(free_.begin() + i);
          ++hits_;
          return p;
        }
      }
      ++misses_;
    }
    void* p = nullptr;
    return posix_memalign(&p, kAlignment, bytes) == 0 ? p : nullptr;
  }

  void give_back(void* p, size_t bytes) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (bytes > byte_limit()) {
        evicted.push_back(p);
      } else {
        free_.push_back({p, bytes});  // newest last
        cached_bytes_ += bytes;
        while (free_.size() > kMaxBlocks || cached_bytes_ > byte_limit()) {
          evicted.push_back(free_.front().ptr);  // oldest first
          cached_bytes_ -= free_.front().bytes;
          free_.erase(free_.begin());
        }
      }
    }
    for (void* q : evicted) std::free(q);
  }

  void clear() {
    std::vector<Block> blocks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      blocks.swap(free_);
      cached_bytes_ = 0;
    }
    for (auto& b : blocks) std::free(b.ptr);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {int64_t(free_.size()), int64_t(cached_bytes_), hits_, misses_};
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };
  std::mutex mu_;
  std::vector<Block> free_;
  size_t cached_bytes_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

// Leaked on purpose: tensors may outlive static destruction at interpreter exit.
BufferCache& cache() {
  static BufferCache* c = new BufferCache();
  return *c;
}

}  // namespace

}  // namespace linclass

extern "C" {
void* linclass_cache_take(size_t bytes) {
  if (linclass::byte_limit() == 0) {
    void* p = nullptr;
    return posix_memalign(&p, linclass::kAlignment, bytes) == 0 ? p : nullptr;
  }
  return linclass::cache().take(bytes);
}
void linclass_cache_give_back(void* block, size_t bytes) {
  if (linclass::byte_limit() == 0) return std::free(block);
  linclass::cache().give_back(block, bytes);
}
}

namespace linclass {

void buffer_cache_clear() { cache().clear(); }

std::vector<int64_t> buffer_cache_stats() { return cache().stats(); }

}  // namespace linclass
