// Caffe's dense product (caffe::caffe_cpu_gemm) on fastsal's OpenMP threads. OpenBLAS's own thread pool
// and idle OpenMP threads that spin fight for the cores (open_nsfw's convolutions ran 3 to 6 times
// slower with torch's libgomp loaded first). Here each OpenMP thread runs single-threaded OpenBLAS on a
// range of the output's columns: the same kernels and, per element, the same sums in the same order
// as Caffe's own call, so the result is bit for bit Caffe's.
#pragma once

namespace fastsal {

// c (m x n) = alpha op(a) op(b) + beta c, row-major, arguments as caffe::caffe_cpu_gemm's.
void gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, const float* b,
          float beta, float* c);

// The kernels OpenBLAS chose for this CPU ("SkylakeX", "Haswell", or a generic "Prescott" on a model its
// version does not know); null when Caffe uses another BLAS.
const char* blas_core();

}  // namespace fastsal
