// Best-fit-decreasing sequence packer; see packer.h for the contract.
//
// Remaining capacities are integers in 1..row_len, so instead of an ordered tree of rows the
// packer keeps one bucket per capacity (a min-heap of row ids, so ties go to the row opened
// first) and a hierarchical bitset of the non-empty buckets: "the least remaining space that
// still holds a sample of length l" is the first set bit >= l. Samples are ordered by a
// counting sort on length, which is stable, so equal lengths keep index order.
// 1M samples of 16..2048 tokens into rows of 2048: 26-40 ms on one core of the 2-core AMD
// EPYC development machine (benchmarks/results/cpu-packer.json); with an std::set of
// (remaining, row) instead, the placement loop alone took ~80 ms, and std::stable_sort ~57 ms
// against ~5 ms for the counting sort.

#include "packer.h"

#include <algorithm>
#include <functional>
#include <stdexcept>
#include <string>

namespace emu2 {
namespace {

// A set of integers in [0, size) with insert, erase and "smallest member >= x", each in
// O(log64 size) word operations. Level 0 has one bit per value; level k + 1 has one bit per
// word of level k, set while that word is non-zero.
class NextSetBits {
 public:
  explicit NextSetBits(std::size_t size) {
    do {
      size = (size + 63) / 64;
      levels_.emplace_back(size, 0);
    } while (size > 1);
  }

  void insert(std::size_t x) {
    for (auto& level : levels_) {
      uint64_t& word = level[x >> 6];
      const bool was_empty = word == 0;
      word |= bit(x & 63);
      if (!was_empty) break;  // the levels above already mark this word
      x >>= 6;
    }
  }

  void erase(std::size_t x) {
    for (auto& level : levels_) {
      uint64_t& word = level[x >> 6];
      word &= ~bit(x & 63);
      if (word != 0) break;  // the word still has members: the levels above stay set
      x >>= 6;
    }
  }

  // The smallest member >= x, or -1 when there is none.
  int64_t next(std::size_t x) const {
    std::size_t level = 0;
    // Climb until a word holds a member at or after x's position on that level.
    for (;; ++level) {
      if (level == levels_.size()) return -1;
      const std::size_t w = x >> 6;
      if (w >= levels_[level].size()) return -1;
      const uint64_t rest = levels_[level][w] & (~uint64_t{0} << (x & 63));
      if (rest != 0) {
        x = (w << 6) + static_cast<std::size_t>(__builtin_ctzll(rest));
        break;
      }
      x = w + 1;  // the first word after w on this level is bit w + 1 one level up
    }
    // Descend along the lowest set bit: a set bit on level k names a non-empty word below.
    while (level > 0) {
      --level;
      x = (x << 6) + static_cast<std::size_t>(__builtin_ctzll(levels_[level][x]));
    }
    return static_cast<int64_t>(x);
  }

 private:
  static uint64_t bit(std::size_t i) { return uint64_t{1} << i; }
  std::vector<std::vector<uint64_t>> levels_;
};

void check_inputs(const int64_t* lengths, std::size_t n, int64_t row_len) {
  if (row_len <= 0 || row_len > kMaxRowLen) {
    throw std::invalid_argument("row_len must be in [1, " + std::to_string(kMaxRowLen) +
                                "], got " + std::to_string(row_len));
  }
  for (std::size_t i = 0; i < n; ++i) {
    if (lengths[i] <= 0) {
      throw std::invalid_argument("sample " + std::to_string(i) + " has length " +
                                  std::to_string(lengths[i]) +
                                  "; every sample needs at least one token");
    }
    if (lengths[i] > row_len) {
      throw std::invalid_argument("sample " + std::to_string(i) + " has length " +
                                  std::to_string(lengths[i]) + ", longer than the row length " +
                                  std::to_string(row_len) + "; truncate or drop it first");
    }
  }
}

// Indices 0..n-1 by length, longest first, equal lengths in index order (a stable counting
// sort; lengths are already known to lie in 1..row_len).
std::vector<int64_t> longest_first(const int64_t* lengths, std::size_t n, int64_t row_len) {
  std::vector<int64_t> start(static_cast<std::size_t>(row_len) + 1, 0);  // key: row_len - length
  for (std::size_t i = 0; i < n; ++i) ++start[row_len - lengths[i]];
  int64_t sum = 0;
  for (auto& s : start) {
    const int64_t count = s;
    s = sum;
    sum += count;
  }
  std::vector<int64_t> order(n);
  for (std::size_t i = 0; i < n; ++i) order[start[row_len - lengths[i]]++] = static_cast<int64_t>(i);
  return order;
}

}  // namespace

PackedRows pack_best_fit_decreasing(const int64_t* lengths, std::size_t n, int64_t row_len) {
  check_inputs(lengths, n, row_len);
  const std::vector<int64_t> order = longest_first(lengths, n, row_len);

  // Rows with room left, bucketed by remaining capacity. Full rows are dropped: every
  // length is >= 1, so they can take nothing more.
  std::vector<std::vector<int64_t>> rows_with_room(static_cast<std::size_t>(row_len) + 1);
  NextSetBits capacities(static_cast<std::size_t>(row_len) + 1);
  const std::greater<int64_t> min_heap;
  std::vector<int64_t> row_of(n);
  int64_t num_rows = 0;

  for (const int64_t i : order) {
    const int64_t length = lengths[i];
    const int64_t best = capacities.next(static_cast<std::size_t>(length));
    int64_t row;
    int64_t remaining;
    if (best < 0) {
      row = num_rows++;
      remaining = row_len;
    } else {
      auto& bucket = rows_with_room[best];
      std::pop_heap(bucket.begin(), bucket.end(), min_heap);
      row = bucket.back();
      bucket.pop_back();
      if (bucket.empty()) capacities.erase(static_cast<std::size_t>(best));
      remaining = best;
    }
    row_of[i] = row;
    remaining -= length;
    if (remaining > 0) {
      auto& bucket = rows_with_room[remaining];
      if (bucket.empty()) capacities.insert(static_cast<std::size_t>(remaining));
      bucket.push_back(row);
      std::push_heap(bucket.begin(), bucket.end(), min_heap);
    }
  }

  // CSR, each row's samples in placement order.
  PackedRows out;
  out.row_offsets.assign(static_cast<std::size_t>(num_rows) + 1, 0);
  for (std::size_t i = 0; i < n; ++i) ++out.row_offsets[row_of[i] + 1];
  for (int64_t r = 0; r < num_rows; ++r) out.row_offsets[r + 1] += out.row_offsets[r];
  std::vector<int64_t> cursor(out.row_offsets.begin(), out.row_offsets.end() - 1);
  out.sample_index.resize(n);
  for (const int64_t i : order) out.sample_index[cursor[row_of[i]]++] = i;
  return out;
}

}  // namespace emu2
