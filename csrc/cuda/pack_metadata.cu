// Per-token metadata of packed rows, on the GPU, with a C ABI (no torch).
//
// Input: the packer's rows in CSR form, as the lengths of the documents of each row
// (row r holds doc_lengths[row_offsets[r] : row_offsets[r + 1]], in order).
// Output, both (num_rows, seq_len) int32 row-major:
//   doc_ids[r, t]      index of the document of row r that token t belongs to (0, 1, ... within
//                      the row); -1 on padding after the last document;
//   position_ids[r, t] position of token t inside its document (restarting at 0); 0 on padding.
// This is the `doc_ids` / `position_ids` contract of docs/DESIGN.md for a whole batch.
//
// One thread block per row. The row's documents are taken BLOCK at a time: a block-wide
// exclusive scan of their lengths gives each document's first token, kept in shared memory,
// and then every thread fills token positions (consecutive threads, consecutive tokens, so the
// stores coalesce), finding its document by binary search over those starts. A row whose
// documents add up to more than seq_len is cut at seq_len and reported through `overflow`.

#include <cuda_runtime.h>

#include <cstdint>

#include <cub/block/block_scan.cuh>

namespace {

constexpr int kBlock = 256;

__global__ void __launch_bounds__(kBlock)
pack_metadata_kernel(const int64_t* __restrict__ row_offsets,
                     const int64_t* __restrict__ doc_lengths, int64_t seq_len,
                     int32_t* __restrict__ doc_ids, int32_t* __restrict__ position_ids,
                     int32_t* __restrict__ overflow) {
  using BlockScan = cub::BlockScan<int64_t, kBlock>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ int64_t starts[kBlock];  // first token of each document of the current chunk

  const int64_t row = blockIdx.x;
  const int64_t first_doc = row_offsets[row];
  const int64_t end_doc = row_offsets[row + 1];
  int32_t* row_doc_ids = doc_ids + row * seq_len;
  int32_t* row_positions = position_ids + row * seq_len;

  int64_t filled = 0;  // tokens of the row covered by the chunks done so far
  for (int64_t chunk = first_doc; chunk < end_doc; chunk += kBlock) {
    const int64_t doc = chunk + threadIdx.x;
    const int64_t length = doc < end_doc ? max(doc_lengths[doc], int64_t{0}) : 0;
    int64_t offset;
    int64_t chunk_tokens;
    BlockScan(scan_storage).ExclusiveSum(length, offset, chunk_tokens);
    starts[threadIdx.x] = filled + offset;
    __syncthreads();

    const int docs_in_chunk = static_cast<int>(min(end_doc - chunk, int64_t{kBlock}));
    const int64_t chunk_end = min(filled + chunk_tokens, seq_len);
    for (int64_t t = filled + threadIdx.x; t < chunk_end; t += kBlock) {
      // The last document starting at or before t holds t (empty documents share their
      // start with the next one, so taking the last skips them).
      int lo = 0;
      int hi = docs_in_chunk - 1;
      while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (starts[mid] <= t) {
          lo = mid;
        } else {
          hi = mid - 1;
        }
      }
      row_doc_ids[t] = static_cast<int32_t>(chunk - first_doc + lo);
      row_positions[t] = static_cast<int32_t>(t - starts[lo]);
    }
    filled += chunk_tokens;
    __syncthreads();  // `starts` and `scan_storage` are rewritten by the next chunk
  }

  if (filled > seq_len) {
    if (threadIdx.x == 0 && overflow != nullptr) atomicExch(overflow, 1);
    filled = seq_len;
  }
  for (int64_t t = filled + threadIdx.x; t < seq_len; t += kBlock) {
    row_doc_ids[t] = -1;
    row_positions[t] = 0;
  }
}

}  // namespace

extern "C" {

// Fills doc_ids and position_ids (device pointers, num_rows * seq_len int32 each) from
// row_offsets (num_rows + 1 int64) and doc_lengths (row_offsets[num_rows] int64), all on the
// device. `overflow` (device int32, may be null) is set to 1 if some row's documents exceed
// seq_len; it is never cleared. `stream` is a cudaStream_t (null: the default stream).
// Returns the cudaError_t of the launch as an int (0 = cudaSuccess); asynchronous.
int emu2_pack_metadata(const int64_t* row_offsets, const int64_t* doc_lengths, int64_t num_rows,
                       int64_t seq_len, int32_t* doc_ids, int32_t* position_ids,
                       int32_t* overflow, void* stream) {
  if (num_rows < 0 || seq_len < 0 || num_rows > INT32_MAX) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (num_rows == 0) return static_cast<int>(cudaSuccess);
  pack_metadata_kernel<<<static_cast<unsigned int>(num_rows), kBlock, 0,
                         static_cast<cudaStream_t>(stream)>>>(
      row_offsets, doc_lengths, seq_len, doc_ids, position_ids, overflow);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
