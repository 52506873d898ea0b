// Sequence packing: assign samples of given lengths to fixed-length rows (best-fit decreasing).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace emu2 {

// Rows longer than this are refused: the packer keeps one bucket per remaining capacity
// (0..row_len), so its memory grows with row_len (about 40 bytes per token of row length).
// 4M tokens is far beyond any row length the engine trains with.
constexpr int64_t kMaxRowLen = int64_t{1} << 22;

// Packed rows in CSR form: the samples of row r are
// sample_index[row_offsets[r] : row_offsets[r + 1]], in the order they were placed.
struct PackedRows {
  std::vector<int64_t> row_offsets;   // num_rows + 1 entries, row_offsets[0] == 0
  std::vector<int64_t> sample_index;  // n entries, a permutation of 0..n-1
};

// Best-fit decreasing. Samples are taken longest first (ties: lower index first); each goes
// into the open row with the least remaining space that still holds it (ties: the row opened
// first), or into a new row when none does. Rows are numbered in the order they are opened.
//
// Throws std::invalid_argument (ValueError in Python) when row_len is not in
// [1, kMaxRowLen] or a length is <= 0 or > row_len; the message names the sample.
// O(n log n + row_len) time, O(n + row_len) memory. Touches no Python state, so it may run
// without the GIL.
PackedRows pack_best_fit_decreasing(const int64_t* lengths, std::size_t n, int64_t row_len);

}  // namespace emu2
