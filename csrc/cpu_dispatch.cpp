// The tables of CPU kernels the per-ISA modules linclass._cpu_<isa> offer, and which
// one the CPU ops call (cpu/ops.h says why the kernels live in separate modules).
// Part of linclass._C, compiled for the x86-64 baseline: nothing here is vectorized.
#include "cpu/ops.h"
#include "shared_state.h"

#include <atomic>
#include <mutex>

namespace linclass {
namespace {

constexpr int kMaxTables = 3;  // one per ISA

std::mutex g_mutex;               // guards offers and switches, not calls
CpuKernels g_tables[kMaxTables];  // offered tables; they live as long as the process
int g_offered = 0;
std::atomic<const CpuKernels*> g_active{nullptr};

const CpuKernels* find(const std::string& isa) {
  for (int i = 0; i < g_offered; ++i)
    if (isa == g_tables[i].isa) return &g_tables[i];
  return nullptr;
}

}  // namespace

}  // namespace linclass

extern "C" int linclass_offer_cpu_kernels(const void* offered) {
  using namespace linclass;
  const CpuKernels& kernels = *static_cast<const CpuKernels*>(offered);
  std::lock_guard<std::mutex> lock(g_mutex);
  if (find(kernels.isa)) return 0;  // a module imported twice offers once
  if (g_offered == kMaxTables) return -1;
  g_tables[g_offered] = kernels;
  const CpuKernels* table = &g_tables[g_offered++];
  const CpuKernels* none = nullptr;
  g_active.compare_exchange_strong(none, table);
  return 0;
}

namespace linclass {

const CpuKernels& active_cpu_kernels() {
  const CpuKernels* table = g_active.load(std::memory_order_acquire);
  LINCLASS_CHECK(table, "linclass: no CPU kernel module is loaded (linclass._cpu_<isa>); "
                     "import linclass to load the one this CPU supports");
  return *table;
}

std::string use_cpu_kernels(const std::string& isa) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const CpuKernels* table = find(isa);
  LINCLASS_CHECK(table, "linclass: the CPU kernels for ISA '", isa, "' are not loaded");
  const CpuKernels* old = g_active.exchange(table);
  return old ? old->isa : "";
}

std::string active_cpu_isa() {
  const CpuKernels* table = g_active.load(std::memory_order_acquire);
  return table ? table->isa : "";
}

std::vector<std::string> offered_cpu_isas() {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::vector<std::string> names;
  for (int i = 0; i < g_offered; ++i) names.emplace_back(g_tables[i].isa);
  return names;
}

}  // namespace linclass
