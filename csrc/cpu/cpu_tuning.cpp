// Reads the CPU's cache sizes once and derives the cache-size decisions of the CPU kernels from them.
#include "cpu_tuning.h"

#include <c10/util/Exception.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace fastattn {
namespace cpu {
namespace {

// What the kernels assume when neither sysfs nor sysconf answers (e.g. some containers): the cache
// sizes of the machine the fractions below were measured on, so the tiles are the measured ones.
constexpr int64_t kDefaultL1 = 48 << 10, kDefaultL2 = 2 << 20, kDefaultL3 = 32 << 20;

// "32K", "1M", "1024", "2G" -> bytes; -1 if not a size
int64_t parse_size(const std::string& text) {
  size_t used = 0;
  long long value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    return -1;
  }
  std::string suffix = text.substr(used);
  if (!suffix.empty() && (suffix.back() == 'B' || suffix.back() == 'b')) suffix.pop_back();  // "32KB"
  int64_t scale = 1;
  if (suffix == "K" || suffix == "k") scale = int64_t(1) << 10;
  else if (suffix == "M" || suffix == "m") scale = int64_t(1) << 20;
  else if (suffix == "G" || suffix == "g") scale = int64_t(1) << 30;
  else if (!suffix.empty()) return -1;
  return value > 0 ? value * scale : -1;
}

std::string read_line(const std::string& path) {
  std::ifstream file(path);
  std::string line;
  std::getline(file, line);
  return line;
}

// The kernel's view of cpu0's caches (what lscpu prints): /sys/devices/system/cpu/cpu0/cache/index*.
void read_sysfs(int64_t* l1, int64_t* l2, int64_t* l3) {
  for (int index = 0; index < 16; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    const std::string level = read_line(dir + "level"), type = read_line(dir + "type");
    const int64_t size = parse_size(read_line(dir + "size"));
    if (level.empty() || size <= 0 || type == "Instruction") continue;
    if (level == "1") *l1 = size;
    if (level == "2") *l2 = size;
    if (level == "3") *l3 = size;
  }
}

int64_t read_sysconf(int name) {
  const long value = sysconf(name);
  return value > 0 ? int64_t(value) : -1;
}

CacheSizes read_cache_sizes() {
  CacheSizes c{-1, -1, -1, "", "", ""};
  int64_t* sizes[3] = {&c.l1, &c.l2, &c.l3};
  std::string* sources[3] = {&c.l1_source, &c.l2_source, &c.l3_source};
  if (const char* raw = std::getenv("FASTATTN_CPU_CACHE"); raw != nullptr && *raw != '\0') {
    std::stringstream items(raw);
    std::string item;
    while (std::getline(items, item, ',')) {
      const size_t eq = item.find('=');
      const std::string key = item.substr(0, std::min(eq, item.size()));
      const int level = key == "l1" ? 0 : key == "l2" ? 1 : key == "l3" ? 2 : -1;
      const int64_t size = eq == std::string::npos ? -1 : parse_size(item.substr(eq + 1));
      TORCH_CHECK(level >= 0 && size > 0, "FASTATTN_CPU_CACHE must read like \"l1=32K,l2=1M,l3=32M\" ",
                  "(any subset; sizes in bytes with an optional K/M/G suffix), got \"", raw, "\" (item \"", item,
                  "\")");
      *sizes[level] = size;
      *sources[level] = "FASTATTN_CPU_CACHE";
    }
  }
  // sysfs before sysconf: glibc's sysconf answers from CPUID, which a VM may report oddly (an AMD
  // EPYC guest here: L3 320 MiB by sysconf, 32 MiB by sysfs and lscpu)
  int64_t from_sysfs[3] = {-1, -1, -1};
  read_sysfs(&from_sysfs[0], &from_sysfs[1], &from_sysfs[2]);
  int64_t from_sysconf[3] = {-1, -1, -1};
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE) && defined(_SC_LEVEL3_CACHE_SIZE)
  from_sysconf[0] = read_sysconf(_SC_LEVEL1_DCACHE_SIZE);
  from_sysconf[1] = read_sysconf(_SC_LEVEL2_CACHE_SIZE);
  from_sysconf[2] = read_sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
  const int64_t defaults[3] = {kDefaultL1, kDefaultL2, kDefaultL3};
  for (int level = 0; level < 3; ++level) {
    if (*sizes[level] > 0) continue;
    if (from_sysfs[level] > 0) {
      *sizes[level] = from_sysfs[level];
      *sources[level] = "sysfs";
    } else if (from_sysconf[level] > 0) {
      *sizes[level] = from_sysconf[level];
      *sources[level] = "sysconf";
    } else {
      *sizes[level] = defaults[level];
      *sources[level] = "default";
    }
  }
  return c;
}

int64_t round_down(int64_t value, int64_t multiple) { return value / multiple * multiple; }

}  // namespace

const CacheSizes& cache_sizes() {
  static const CacheSizes sizes = read_cache_sizes();
  return sizes;
}

// Each tile is a fraction of the cache it must stay in; the fractions are those measured best at
// ResNet-50 CBAM shapes on a machine with a 48 KiB L1d and a 2 MiB L2, which they reproduce exactly.
// The floors keep tiny (forced) caches working; the ceilings are compile-time array sizes.
CpuTiling derive_tiling(const CacheSizes& caches) {
  const int64_t l1 = caches.l1, l2 = caches.l2;
  CpuTiling t;
  // a lane holds 4 float accumulators (16 B) and is read from kRowBlock = 8 rows per pass (32 B of
  // float x): 48 B per lane, and the tile takes half of L1, the other half is for the rows prefetched
  // ahead. Multiples of 64 lanes: whole vectors and cache lines for every dtype.
  t.lane_tile = std::clamp<int64_t>(round_down(l1 / 96, 64), 64, kLaneTileCapacity);
  // the second pass (ties, first index of the max) re-reads the piece of the row and of its float
  // gate: 4 + 4 B per element of float x, a third of L1; multiples of 256 elements
  t.scan_piece = std::max<int64_t>(round_down(l1 / 24, 256), 256);
  // a quarter of L2: the block is re-read by the second pass while the output and the other
  // operands stream through the rest
  t.l2_block = std::max<int64_t>(l2 / 4, 16 << 10);
  // 3/32 of L2 of x per band: the band, the conv's reach pooled ahead of it and the band's share of
  // y stay in L2 beside the next band being prefetched
  t.eval_band = std::max<int64_t>(l2 / 32 * 3, 8 << 10);
  // an attention operand tile of an eighth of L2 (brgemm slows down threefold when the B tile
  // outgrows L2's share), and a score tile of a sixteenth
  t.panel_floats = std::max<int64_t>(l2 / 8 / int64_t(sizeof(float)), 1024);
  t.score_tile_floats = std::max<int64_t>(l2 / 16 / int64_t(sizeof(float)), 1024);
  return t;
}

const CpuTiling& cpu_tiling() {
  static const CpuTiling tiling = derive_tiling(cache_sizes());
  return tiling;
}

}  // namespace cpu
}  // namespace fastattn
